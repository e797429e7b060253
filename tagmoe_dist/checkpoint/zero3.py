"""ZeRO-3 checkpoints of models with tagmoe_dist experts (integrations/zero3.py): read them whole,
re-lay them out for ZeRO 0-2 tools, and load whole weights into a ZeRO-3 engine.

What the engine writes in `<ckpt_dir>/<tag>/` for ZeRO-3 (model parallel size 1, W ranks):

    zero_pp_rank_<r>_mp_rank_00_model_states.pt   every rank: 'param_shapes' (per optimizer
        sub-group, name -> this rank's whole shape; experts: its expert-parallel share),
        'module' (buffers; parameters as empty placeholders), and our client state
        'tagmoe_zero3' = {ep_size, ep_rank, tied: {name: name it is tied to}}
    [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   every rank: per sub-group, the flat fp32
        master partition, Adam moments, and 'ds_zero_partition_groups' (partition count, this
        rank's index in it, the group's global ranks, 'autoep_expert' for expert sub-groups)

Algorithm of `consolidate`:
  1. Each sub-group's parameters lie in its flat partition in `param_shapes` order, each taking
     ceil(numel / count) values (the last partition padded), as in DeepSpeed's ds_to_universal.
  2. A dense parameter is the concatenation of its pieces over partition ranks 0..count-1 (the
     whole data-parallel group). An expert parameter is the same over its expert-data-parallel
     group, which yields that group's expert-parallel share; the shares are stacked in
     expert-parallel rank order into [E, ...] (MoELayer.full_state_dict's naming).
  3. Buffers come from rank 0's 'module'; tied names are filled in from 'tied'.
Values are the fp32 master weights: exact for fp32 and for 16-bit training alike.
Files are read with torch.load(weights_only=True), allowing by name only the DeepSpeed objects
its checkpoints hold (tagmoe_dist/checkpoint/loading.py).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

CLIENT_KEY = "tagmoe_zero3"
_MODEL = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_EXPERT = "autoep_expert"
_DS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
UNIVERSAL_DIR = "zero"

PathLike = Union[str, Path]


def is_zero3(tag_dir: PathLike) -> bool:
    return (Path(tag_dir) / _MODEL.format(0)).is_file()


def is_universal(tag_dir: PathLike) -> bool:
    """A DeepSpeed universal checkpoint (`to_universal`, or `reshard` of a ZeRO-3 checkpoint):
    whole parameters and Adam moments under zero/<name>/, for any EP and world size."""
    return (Path(tag_dir) / UNIVERSAL_DIR).is_dir() and is_zero3(tag_dir)


def _universal_param(tag_dir: Path, name: str, state: str = "fp32"):
    path = tag_dir / UNIVERSAL_DIR / name / f"{state}.pt"
    if not path.is_file():
        raise ValueError(f"{tag_dir}: universal checkpoint lacks {path.relative_to(tag_dir)}")
    got = _load(path)
    return got if isinstance(got, dict) else {"param": got}


def _consolidate_universal(tag_dir: Path, with_optimizer: bool) -> Dict[str, torch.Tensor]:
    first = _load(tag_dir / _MODEL.format(0))
    out: Dict[str, torch.Tensor] = {}
    for group in first["param_shapes"]:
        for name, shape in group.items():
            for state in ("fp32", "exp_avg", "exp_avg_sq") if with_optimizer else ("fp32",):
                entry = _universal_param(tag_dir, name, state)
                t = entry["param"].detach().float()
                # experts are whole [E, ...] (is_expert_param); the rest flat, shaped here
                out[_key(name, state)] = t if entry.get("is_expert_param") else t.view(tuple(shape))
    return _with_buffers_and_ties(out, first)


def _load(path: Path):
    # weights_only, with the DeepSpeed objects its files hold allowed by name (checkpoint/loading.py)
    from tagmoe_dist.checkpoint import loading
    return loading.load(path, mmap=True, deepspeed_objects=True)


def _files(tag_dir: Path) -> Tuple[Dict[int, Path], Dict[int, Path]]:
    models, optims = {}, {}
    for p in tag_dir.iterdir():
        for regex, into in ((_MODEL_RE, models), (_OPTIM_RE, optims)):
            m = regex.match(p.name)
            if m:
                if int(m.group(2)) != 0:
                    raise ValueError(f"{p}: ZeRO-3 checkpoints with model (tensor) parallel "
                                     "size > 1 are not supported")
                into[int(m.group(1))] = p
    world = len(models)
    if sorted(models) != list(range(world)) or sorted(optims) != list(range(world)):
        raise ValueError(f"{tag_dir}: ZeRO-3 model files for ranks {sorted(models)} and optimizer "
                         f"files for ranks {sorted(optims)}; expected 0..{world - 1} of both "
                         "(was the checkpoint written by every rank?)")
    return models, optims


def _ep_size(meta: List[dict]) -> Optional[int]:
    sizes = {int(n[len("ep_size_"):]) for m in meta if _EXPERT in m.get("families", ())
             for n in m.get("group_names", ()) if n.startswith("ep_size_")}
    if len(sizes) > 1:
        raise ValueError(f"expert sub-groups of several EP sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def rank0_model_state(tag_dir: PathLike) -> dict:
    """Rank 0's model-states file (memory-mapped): step counters, buffers, parameter placeholders."""
    return _load(Path(tag_dir) / _MODEL.format(0))


def trained_dtype(model_state: dict) -> Optional[torch.dtype]:
    """The dtype the engine trained in: that of the parameter placeholders in 'module' (the
    optimizer's masters are fp32 whatever it was), None if it holds no floating tensor."""
    buffers = set(model_state.get("buffer_names") or [])
    return next((t.dtype for k, t in (model_state.get("module") or {}).items()
                 if k not in buffers and torch.is_tensor(t) and t.is_floating_point()), None)


def saved_layout(tag_dir: PathLike) -> Dict[str, Optional[int]]:
    """{'world_size', 'ep_size'} of a ZeRO-3 checkpoint (reads rank 0's files, memory-mapped)."""
    tag_dir = Path(tag_dir)
    model = _load(tag_dir / _MODEL.format(0))
    optim = _load(next(p for p in tag_dir.iterdir() if _OPTIM_RE.match(p.name)
                       and int(_OPTIM_RE.match(p.name).group(1)) == 0))
    meta = optim["optimizer_state_dict"].get("ds_zero_partition_groups") or []
    return {"world_size": int(model.get("dp_world_size", 1)), "ep_size": _ep_size(meta)}


def consolidate(tag_dir: PathLike, with_optimizer: bool = False) -> Dict[str, torch.Tensor]:
    """The global fp32 state dict of a ZeRO-3 checkpoint directory (see the module docstring),
    or of a universal one (`is_universal`).
    with_optimizer: also `<name>.exp_avg` / `<name>.exp_avg_sq` (Adam moments), same layout."""
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        return _consolidate_universal(tag_dir, with_optimizer)
    models, optims = _files(tag_dir)
    world = len(models)
    # (name, state, ep_rank or None) -> {partition rank: (piece, shape, count)}
    pieces: Dict[Tuple[str, str, Optional[int]], Dict[int, tuple]] = {}
    ep_size = None
    first = None
    for r in range(world):
        model, osd = _load(models[r]), _load(optims[r])["optimizer_state_dict"]
        first = first if first is not None else model
        if int(osd.get("zero_stage", 3)) != 3:
            raise ValueError(f"{optims[r]} is not a ZeRO-3 optimizer file")
        shapes = model["param_shapes"]
        meta = osd.get("ds_zero_partition_groups") or [{} for _ in shapes]
        info = model.get(CLIENT_KEY) or {}
        ep = _ep_size(meta)
        ep_size = ep if ep_size is None else ep_size
        if ep is not None and ep != ep_size:
            raise ValueError(f"{tag_dir}: ranks disagree on the EP size ({ep_size} vs {ep})")
        for i, group_shapes in enumerate(shapes):
            m = meta[i]
            count, prank = int(m.get("partition_count", world)), int(m.get("partition_rank", r))
            expert = _EXPERT in m.get("families", ())
            # DeepSpeed's layout: expert-parallel groups are blocks of consecutive ranks
            ep_rank = (int(info.get("ep_rank", r % ep)) if expert else None)
            flats = {"fp32": osd["fp32_flat_groups"][i]}
            if with_optimizer:
                state = osd["optimizer_state_dict"]["state"].get(i, {})
                flats.update({k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state})
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / count)
                valid = max(0, min(part, numel - prank * part))
                for key, flat in flats.items():
                    slot = pieces.setdefault((name, key, ep_rank), {})
                    slot[prank] = (flat.narrow(0, offset, valid), tuple(shape), count)
                offset += part
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[Tuple[str, str], Dict[int, torch.Tensor]] = {}
    for (name, key, ep_rank), parts in pieces.items():
        shape, count = next(iter(parts.values()))[1:]
        if sorted(parts) != list(range(count)):
            raise ValueError(f"{tag_dir}: {name} has partitions {sorted(parts)} of {count}; the "
                             "checkpoint is incomplete")
        whole = torch.cat([parts[i][0] for i in range(count)]).detach().float().view(shape)
        if ep_rank is None:
            out[_key(name, key)] = whole
        else:
            experts.setdefault((name, key), {})[ep_rank] = whole
    for (name, key), shares in experts.items():
        if sorted(shares) != list(range(ep_size)):
            raise ValueError(f"{tag_dir}: expert parameter {name} has expert-parallel shares "
                             f"{sorted(shares)} of {ep_size}")
        out[_key(name, key)] = torch.cat([shares[e] for e in range(ep_size)])
    return _with_buffers_and_ties(out, first)


def _with_buffers_and_ties(out: Dict[str, torch.Tensor], first: dict) -> Dict[str, torch.Tensor]:
    """Buffers from rank 0's 'module', tied names filled in, in the model's order."""
    for name in first.get("buffer_names") or []:
        if name in first["module"]:
            out[name] = first["module"][name].float() if first["module"][name].is_floating_point() \
                else first["module"][name]
    for name, src in ((first.get(CLIENT_KEY) or {}).get("tied") or {}).items():
        out[name] = out[src]
    order = {k: i for i, k in enumerate(first["module"])}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0].rsplit(".exp_avg", 1)[0],
                                                              len(order)), kv[0])))


def _key(name: str, state: str) -> str:
    return name if state == "fp32" else f"{name}.{state}"


def expert_names(tag_dir: PathLike) -> List[str]:
    """Parameter names of the expert sub-groups (rank 0's files)."""
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        shapes = _load(tag_dir / _MODEL.format(0))["param_shapes"]
        return [n for g in shapes for n in g
                if _universal_param(tag_dir, n).get("is_expert_param")]
    models, optims = _files(tag_dir)
    shapes = _load(models[0])["param_shapes"]
    meta = _load(optims[0])["optimizer_state_dict"].get("ds_zero_partition_groups") or []
    return [n for i, g in enumerate(shapes) if i < len(meta) and _EXPERT in meta[i].get("families", ())
            for n in g]


def write_zero2_weights(tag_dir: PathLike, out_tag: PathLike) -> Dict[str, int]:
    """Re-lay a ZeRO-3 checkpoint's weights out as the files of a ZeRO 0-2 checkpoint of
    tagmoe_dist (mp_rank_00_model_states.pt with the dense weights, one file per expert), so
    that `tagmoe_dist.checkpoint.consolidate`, `tagmoe_dist.reshard` and DeepSpeed's ZeRO 0-2
    loader read them. Weights only. Returns {'world_size', 'ep_size'} of the source."""
    tag_dir, out_tag = Path(tag_dir), Path(out_tag)
    sd = consolidate(tag_dir)
    names = expert_names(tag_dir)
    layout = saved_layout(tag_dir)
    first = _load(tag_dir / _MODEL.format(0))
    prefixes = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))   # model order
    module = {k: v for k, v in sd.items() if k not in names}
    num_experts = []
    out_tag.mkdir(parents=True, exist_ok=True)
    for layer, prefix in enumerate(prefixes):
        stacked = {n.rsplit(".", 1)[1]: sd[n] for n in names if n.rsplit(".", 1)[0] == prefix}
        E = next(iter(stacked.values())).shape[0]
        num_experts.append(E)
        for e in range(E):
            torch.save({f"{prefix}.{_DS_PREFIX}{e}.{w}": t[e].clone() for w, t in stacked.items()},
                       out_tag / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
    main = {"module": module, "buffer_names": first.get("buffer_names"), "optimizer": None,
            "param_shapes": None, "num_experts": num_experts,
            "dp_world_size": layout["world_size"], "mp_world_size": 1,
            "global_steps": first.get("global_steps"), "global_samples": first.get("global_samples"),
            "skipped_steps": first.get("skipped_steps"), "ds_version": first.get("ds_version"),
            "step": first.get("step")}
    torch.save(main, out_tag / "mp_rank_00_model_states.pt")
    return layout


# ---------------------------------------------------------------------------- live engines
def client_state(model) -> Dict[str, dict]:
    """What our ZeRO-3 checkpoints add to DeepSpeed's client state (per rank): EP size and rank,
    and tied parameter names (ZeRO-3's param_shapes list a tied parameter once)."""
    from tagmoe_dist.layer import MoELayer
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    first: Dict[int, str] = {}
    tied = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    g = layers[0].groups if layers else None
    state = {CLIENT_KEY: {"ep_size": g.ep_size if g else 1, "ep_rank": g.ep_rank if g else 0,
                          "tied": tied}}
    return state


def autoep_layers(model, layers) -> Dict[str, list]:
    """DeepSpeed AutoEP's ZeRO-3 checkpoint metadata ('ds_autoep_layers', one entry per MoE
    layer, as engine._save_moe_checkpoint writes it for AutoEP layers), for our layers. Not
    written into our checkpoints: DeepSpeed's ds_to_universal then demands the three tensors
    `experts.w1/w2/w3` of AutoEP's SwiGLU layout in every layer and stops (see
    tools/repro_universal_expert_layout.py); `to_universal` below is the working path."""
    import torch.distributed as dist
    from deepspeed.checkpoint import constants as C
    names = {id(m): n for n, m in model.named_modules()}
    entries = []
    for i, layer in enumerate(layers):
        g, E = layer.groups, layer.cfg.num_experts
        L = E // g.ep_size
        path = names[id(layer)]
        entries.append({
            "moe_layer_id": i, "module_path": path, "num_experts": E, "num_local_experts": L,
            "ep_size": g.ep_size, "expert_key_prefix": f"{path}.experts" if path else "experts",
            C.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY: C.AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT,
            C.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_VERSION_KEY: C.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_VERSION,
            "ep_group_name": f"ep_size_{g.ep_size}", "ep_rank": g.ep_rank,
            "expert_data_parallel_rank": dist.get_rank(g.edp_group) if g.edp_group else 0,
            "expert_data_parallel_world_size": g.edp_size,
            "global_expert_start": g.ep_rank * L, "global_expert_end": (g.ep_rank + 1) * L,
        })
    return {C.AUTOEP_LAYERS_KEY: entries}


def load_weights(engine, sd: Dict[str, torch.Tensor]) -> None:
    """Load whole weights (e.g. `consolidate()` of any EP size, or a resharded / upcycled
    checkpoint) into a ZeRO-3 engine; the fp32 master partitions are refreshed from them, the
    optimizer moments are left as they are (zero for a fresh engine)."""
    import deepspeed
    from tagmoe_dist.layer import MoELayer
    model = engine.module
    local: Dict[int, slice] = {}
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            ids = layer.experts.global_ids
            for p in layer.experts.parameters():
                local[id(p)] = slice(ids[0], ids[-1] + 1)
    missing = [n for n, _ in model.named_parameters() if n not in sd]
    if missing:
        raise ValueError(f"load_weights: the state dict lacks {missing[:5]} "
                         f"({len(missing)} parameter(s)); was it saved from the same model config?")
    for name, p in model.named_parameters():
        src = sd[name][local[id(p)]] if id(p) in local else sd[name]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(src.shape) != shape:
            raise ValueError(f"load_weights: {name} has shape {tuple(src.shape)} in the state "
                             f"dict, {shape} in the model")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            with torch.no_grad():
                p.data.copy_(src.to(p.dtype))
    for name, buf in model.named_buffers():
        if name in sd:
            buf.copy_(sd[name].to(buf.dtype))
    engine.optimizer.refresh_fp32_params()


def to_universal(tag_dir: PathLike, out_dir: PathLike) -> Path:
    """A DeepSpeed universal checkpoint of a ZeRO-3 checkpoint of ours, loadable at any EP size
    by DeepSpeed's own loader (`"checkpoint": {"load_universal": true}`).

    1. DeepSpeed's ds_to_universal converts the checkpoint (dense parameters, optimizer
       hyper-parameters and step, model-state files).
    2. It cannot know our expert layout (it takes expert partitions for data-parallel ones), so
       every expert parameter's fp32 / exp_avg / exp_avg_sq is rewritten from `consolidate`
       whole [E, ...], with AutoEP's marks (`ep_is_expert_param`, `ep_num_experts`): ZeRO-3's
       universal loader then cuts each rank's expert-parallel share and its expert-data-parallel
       partition (stage3.py `_slice_autoep_universal_expert_param`)."""
    import argparse
    from deepspeed.checkpoint import constants as C
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists; choose a new output directory")
    # its step-by-step prints and progress bars name our temporary directories: kept for an error
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal(argparse.Namespace(
                input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=False))
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    sd = consolidate(tag_dir, with_optimizer=True)
    for name in expert_names(tag_dir):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            t = sd[_key(name, state)]
            path = out_dir / "zero" / name / f"{state}.pt"
            tmp = path.with_name(path.name + ".tmp")
            torch.save({C.PARAM: t.contiguous(), C.CAT_DIM: 0, C.EP_IS_EXPERT_PARAM: True,
                        C.EP_NUM_EXPERTS: t.shape[0]}, tmp)
            tmp.replace(path)
    return out_dir


def load_universal(engine, load_dir: PathLike, tag: Optional[str] = None):
    """engine.load_checkpoint of a universal checkpoint (the engine's config must set
    `"checkpoint": {"load_universal": true}`), undoing two defects of DeepSpeed 0.19.8's ZeRO-3
    universal loader (stage3.py `load_hp_checkpoint_state_from_checkpoint_dir_stage3`) that hit
    every model with more than one optimizer group:
      1. it copies group 0's hyper-parameters into every group: the decayed group's weight_decay
         lands on the no-decay group (norms, biases) and on the experts. Each group's own are
         put back.
      2. it gives every sub-group the *same* `step` tensor, which torch's Adam/AdamW increment in
         place: after one step the second group's bias correction uses step + 2, and so on.
         Each state gets its own copy."""
    opt = engine.optimizer.optimizer
    keep = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    out = engine.load_checkpoint(str(load_dir), tag=tag)
    for g, hyper in zip(opt.param_groups, keep):
        g.update(hyper)
    for state in opt.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    return out
