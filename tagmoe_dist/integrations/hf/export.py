"""`python -m tagmoe_dist.checkpoint export --format hf`: a DeepSpeed checkpoint of a Hugging Face
model trained here -> a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads
as the source family (dense Llama / Mistral become Mixtral, Qwen2 becomes Qwen2-MoE).

  1. Read the run's model_config.yaml (`hf:` source, moe, upcycle) and check that the target
     family can express the trained router (softmax scores, no selection bias, no task term in
     the logits, dropless...); refuse naming the blocking option before anything is written.
  2. Plan every output tensor (name, shape, dtype) from the main file's header (memory-mapped)
     and the MoE config; open the shards (upcycle.hf.ShardedWriter).
  3. Stream: non-expert tensors one by one from the mapped main file, then one expert file at a
     time (`layer_<L>_expert_<e>_...`, named by global expert id, so any EP size and resharded
     checkpoints read the same), split into the family's per-expert classic names. A ZeRO-3
     checkpoint is gathered whole first (checkpoint/zero3.consolidate) and written in the dtype
     it was trained in.
  4. config.json, the source's tokenizer / generation files, tagmoe_metadata.json; the alignment
     head (W_tag, predictor: train-only) goes to `<out>.tagmoe_alignment.safetensors` beside the
     directory. Written in a temporary directory, renamed onto --out (--force to replace).

Dropped at export (docs/hf.md): the alignment head (side file), routing statistics buffers.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import yaml

from tagmoe_dist.checkpoint import loading
from tagmoe_dist.config import MoEConfig
from tagmoe_dist.integrations.hf import families

METADATA = "tagmoe_metadata.json"
_PREFIX = "lm."                              # HFCausalLM's state-dict prefix
_HEAD = "tagmoe_alignment."
_MOE_KEY = re.compile(r"^(?P<pre>.*layers\.(?P<i>\d+)\.)mlp\.moe\.(?P<rest>.+)$")


def side_file(out: Path) -> Path:
    return out.parent / f"{out.name}.tagmoe_alignment.safetensors"


def tied_router_rows(w_ED: torch.Tensor) -> List[List[int]]:
    """Groups of experts whose router rows are exactly equal (fine-grained upcycling copies a
    dense expert's row to each of its segments; rows an optimizer never separated stay equal)."""
    groups: Dict[bytes, List[int]] = {}
    for e, row in enumerate(w_ED.detach().float().contiguous()):
        groups.setdefault(row.numpy().tobytes(), []).append(e)
    return [g for g in groups.values() if len(g) > 1]


def _warn_tied_router_rows(prefix: str, w_ED: torch.Tensor) -> None:
    tied = tied_router_rows(w_ED)
    if tied:
        print(f"warning: {prefix}router: experts {tied} have identical router rows, so their scores "
              "tie exactly for every token. tagmoe routes a tie to the lower expert id; "
              "transformers' torch.topk does not specify which it picks, so tokens whose k-th and "
              "(k+1)-th choices are tied may reach another segment in the export (docs/hf.md, "
              "'Exact ties').", file=sys.stderr)


def blocking_option(cfg: MoEConfig, target: str) -> Optional[str]:
    """Why `target` (a Hugging Face family) cannot compute the router of `cfg`, or None."""
    name = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}[target]
    if cfg.router == "task_level":
        return f"moe.router='task_level' routes by the task descriptor; {name} routes by tokens"
    if cfg.task_conditioning != "none":
        return (f"moe.task_conditioning={cfg.task_conditioning!r} adds a task term to the router "
                f"logits; {name} has none (task_conditioning='none' exports)")
    if cfg.score_function != "softmax":
        return f"moe.score_function={cfg.score_function!r}; {name} scores with softmax"
    if cfg.expert_bias:
        return (f"moe.expert_bias=True selects experts with a learned bias; {name} has no "
                "selection bias")
    if cfg.capacity_factor is not None:
        return f"moe.capacity_factor={cfg.capacity_factor} drops tokens; {name} is dropless"
    if cfg.topk_scaling_factor != 1.0:
        return f"moe.topk_scaling_factor={cfg.topk_scaling_factor}; {name} has no such factor"
    if target == "mixtral" and not cfg.norm_topk_prob:
        return "moe.norm_topk_prob=False; Mixtral always renormalises the top-k weights"
    if target != "qwen2_moe" and cfg.num_shared_experts:
        return f"moe.num_shared_experts={cfg.num_shared_experts}; {name} has no shared expert"
    return None


def _run_config(ckpt: Path) -> dict:
    path = ckpt / "model_config.yaml"
    if not path.is_file():
        raise ValueError(f"--ckpt {ckpt} has no model_config.yaml: point --ckpt at the "
                         "checkpoints directory written by python -m tagmoe_dist.train")
    cfg = yaml.safe_load(path.read_text())
    if "hf" not in cfg:
        raise ValueError(f"--format hf: {path} is not a Hugging Face run (no 'hf:' source); "
                         "export it with --format tagmoe (the default)")
    return cfg


def _target_config(src_cfg: dict, model_type: str, cfg: MoEConfig, up, dtype: torch.dtype,
                   num_layers: int) -> dict:
    from tagmoe_dist.upcycle import archs
    dt = str(dtype).replace("torch.", "")
    if families.is_dense(model_type):
        arch = archs.detect(src_cfg)
        out = archs.moe_config(src_cfg, arch, num_experts=cfg.num_experts, top_k=cfg.top_k,
                               granularity=up["granularity"], moe_layers=tuple(range(num_layers)))
    else:
        out = dict(src_cfg)
        out["num_experts_per_tok"] = cfg.top_k
        if model_type != "mixtral":
            out["norm_topk_prob"] = bool(cfg.norm_topk_prob)
    out["router_aux_loss_coef"] = cfg.aux_loss_coeff
    out["output_router_logits"] = False
    out.pop("torch_dtype", None)
    out["dtype"] = dt
    return out


def _expert_names(target: str, pre: str, e: int) -> Tuple[str, str, str]:
    """(gate, up, down) in the classic per-expert layout every transformers version loads."""
    if target == "mixtral":
        b = f"{pre}block_sparse_moe.experts.{e}."
        return f"{b}w1.weight", f"{b}w3.weight", f"{b}w2.weight"
    b = f"{pre}mlp.experts.{e}."
    return f"{b}gate_proj.weight", f"{b}up_proj.weight", f"{b}down_proj.weight"


def _rename(key: str, target: str) -> Optional[str]:
    """HF name of a non-expert tensor of our model; None for tensors that are not exported."""
    m = _MOE_KEY.match(key)
    if m is None:
        return key
    pre, rest = m["pre"], m["rest"]
    moe = f"{pre}block_sparse_moe." if target == "mixtral" else f"{pre}mlp."
    return {"router.weight": f"{moe}gate.weight",
            "shared_expert.gate.weight": f"{moe}shared_expert_gate.weight"}.get(rest, moe + rest)


def export_hf(ckpt_dir, out, tag: Optional[str] = None, force: bool = False) -> Path:
    """Write the Hugging Face directory `out` from a checkpoint of an `hf:` run (module doc)."""
    from safetensors.torch import save_file

    from tagmoe_dist.checkpoint import resolve_tag
    from tagmoe_dist.checkpoint.atomic import replace_dir
    from tagmoe_dist.paths import check_output_dir
    from tagmoe_dist.upcycle.hf import DTYPE_CODES, ShardedWriter, TensorSpec, copy_side_files, \
        sha256_file

    ckpt, out = Path(ckpt_dir), Path(out)
    check_output_dir(ckpt, out, "--ckpt", "--out")
    if out.exists() and not force:
        raise ValueError(f"--out {out} already exists; pass --force to replace it or choose "
                         "another directory")
    # 1. what was trained, and can the target express it
    run = _run_config(ckpt)
    src = Path(run["hf"])
    src_cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() \
        else None
    if src_cfg is None:
        raise ValueError(f"--format hf: the run's source {src} has no config.json any more; "
                         "restore it (its config, tokenizer and generation config are copied)")
    model_type = families.check_family(src_cfg.get("model_type"), f"{src}/config.json")
    from tagmoe_dist.integrations.hf.training import HFModelConfig
    hcfg = HFModelConfig.from_yaml(ckpt / "model_config.yaml")
    cfg, target = hcfg.moe_config, families.EXPORT_TYPE[model_type]
    why = blocking_option(cfg, target)
    if why is not None:
        raise ValueError(f"--format hf cannot express this model's router as {target}: {why}. "
                         "Export with --format tagmoe instead")
    tag_dir = resolve_tag(ckpt, tag)
    # 2. plan
    source = _Source.open(tag_dir, cfg.num_experts)
    module = source.module
    plain: Dict[str, Tuple[str, torch.Tensor]] = {}
    head: Dict[str, torch.Tensor] = {}
    moe_prefixes: List[str] = []
    for key, t in module.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name.startswith(_HEAD):
            head[name[len(_HEAD):]] = t
            continue
        m = _MOE_KEY.match(name)
        if m and m["rest"] == "router.weight":
            moe_prefixes.append(m["pre"])
            _warn_tied_router_rows(m["pre"], t)
        if m and m["rest"].startswith("router.") and m["rest"] != "router.weight":
            continue                                  # routing statistics buffers
        plain[_rename(name, target)] = (key, t)
    dtype = source.dtype or next(t for _, t in plain.values() if t.is_floating_point()).dtype
    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    specs = []
    for name, (_, t) in plain.items():
        if name.endswith(("shared_expert.mlp.w1", "shared_expert.mlp.w2")):
            S = cfg.shared_ffn_size
            base = name.rsplit("mlp.w", 1)[0]
            if name.endswith("w1"):
                specs += [TensorSpec(f"{base}gate_proj.weight", (S, D), DTYPE_CODES[t.dtype]),
                          TensorSpec(f"{base}up_proj.weight", (S, D), DTYPE_CODES[t.dtype])]
            else:
                specs.append(TensorSpec(f"{base}down_proj.weight", (D, S), DTYPE_CODES[t.dtype]))
            continue
        specs.append(TensorSpec(name, tuple(t.shape), DTYPE_CODES[t.dtype]))
    code = DTYPE_CODES[dtype]
    zero_shared = families.is_dense(model_type) and target == "qwen2_moe"
    for pre in moe_prefixes:
        for e in range(cfg.num_experts):
            g, u, d = _expert_names(target, pre, e)
            specs += [TensorSpec(g, (F, D), code), TensorSpec(u, (F, D), code),
                      TensorSpec(d, (D, F), code)]
        if zero_shared:       # Qwen2-MoE always has a shared expert: width 0 adds exactly 0
            b = f"{pre}mlp."
            specs += [TensorSpec(f"{b}shared_expert.gate_proj.weight", (0, D), code),
                      TensorSpec(f"{b}shared_expert.up_proj.weight", (0, D), code),
                      TensorSpec(f"{b}shared_expert.down_proj.weight", (D, 0), code),
                      TensorSpec(f"{b}shared_expert_gate.weight", (1, D), code)]
    source.check_experts(moe_prefixes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer = ShardedWriter(tmp, specs, 5 * 10 ** 9, {"tagmoe_export": model_type})
        try:
            # 3. stream
            for name, (key, t) in plain.items():
                if name.endswith("shared_expert.mlp.w1"):
                    base = name.rsplit("mlp.w", 1)[0]
                    S = cfg.shared_ffn_size
                    writer.write(f"{base}gate_proj.weight", t[:, :S].t().contiguous().to(dtype))
                    writer.write(f"{base}up_proj.weight", t[:, S:].t().contiguous().to(dtype))
                elif name.endswith("shared_expert.mlp.w2"):
                    writer.write(f"{name.rsplit('mlp.w', 1)[0]}down_proj.weight",
                                 t.t().contiguous().to(dtype))
                else:
                    writer.write(name, t.contiguous().to(dtype) if t.is_floating_point()
                                 else t.contiguous())
            for layer, pre in enumerate(moe_prefixes):
                for e in range(cfg.num_experts):
                    w1, w2 = source.expert(layer, pre, e)
                    g, u, d = _expert_names(target, pre, e)
                    writer.write(g, w1[:, :F].t().contiguous().to(dtype))
                    writer.write(u, w1[:, F:].t().contiguous().to(dtype))
                    writer.write(d, w2.t().contiguous().to(dtype))
                if zero_shared:
                    b = f"{pre}mlp."
                    for n, shape in (("shared_expert.gate_proj.weight", (0, D)),
                                     ("shared_expert.up_proj.weight", (0, D)),
                                     ("shared_expert.down_proj.weight", (D, 0)),
                                     ("shared_expert_gate.weight", (1, D))):
                        writer.write(b + n, torch.zeros(shape, dtype=dtype))
            index = writer.close()
        except BaseException:
            writer.abort()
            raise
        # 4. config, side files, metadata
        num_layers = int(src_cfg["num_hidden_layers"])
        conf = _target_config(src_cfg, model_type, cfg, hcfg.upcycle and
                              families.UpcycleSpec.from_dict(hcfg.upcycle).to_dict(),
                              dtype, num_layers)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        side = copy_side_files(src, tmp, skip={"config.json", METADATA})
        shards = sorted(set(index["weight_map"].values()))
        meta = {"tool": "tagmoe_dist.checkpoint export --format hf",
                "source": {"dir": str(src), "model_type": model_type},
                "target": {"model_type": conf["model_type"],
                           "architectures": conf.get("architectures")},
                "checkpoint": {"dir": str(ckpt.resolve()), "tag": tag_dir.name,
                               "zero_stage": 3 if source.zero3 else "0-2", "step": source.step},
                "moe": cfg.to_dict(), "upcycle": hcfg.upcycle and dict(hcfg.upcycle),
                "task_schema": hcfg.task_schema, "side_files": side,
                "dropped": {"alignment_head": sorted(head),
                            "alignment_file": side_file(out).name if head else None},
                "sha256": {s: sha256_file(tmp / s) for s in shards}}
        if head:
            hp = side_file(out)
            tmp_head = hp.with_name(f".{hp.name}.tmp")
            schema_file = ckpt / "task_schema.yaml"
            save_file({k: v.contiguous() for k, v in head.items()}, str(tmp_head),
                      metadata={"task_schema": schema_file.read_text()
                                if schema_file.is_file() else ""})
            meta["sha256"][hp.name] = sha256_file(tmp_head)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
        if head:
            tmp_head.replace(side_file(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _Source:
    """The trained weights of one checkpoint tag, whatever the ZeRO stage wrote.

    ZeRO 0-2: `module` is the main file memory-mapped (the run's dtype), experts are read one
    file at a time. ZeRO-3: the partitions are gathered once (checkpoint/zero3.consolidate, fp32
    masters, the whole model in memory) and written in the dtype the engine trained in."""

    def __init__(self, module, step: int, dtype=None, stacked=None, tag_dir=None,
                 num_experts: int = 0):
        self.module, self.step, self.dtype = module, step, dtype
        self.zero3 = stacked is not None
        self._stacked, self._tag_dir, self._num_experts = stacked, tag_dir, num_experts
        self._files: Dict[int, Dict[int, Path]] = {}

    @classmethod
    def open(cls, tag_dir: Path, num_experts: int) -> "_Source":
        from tagmoe_dist.checkpoint import MAIN_FILE, zero3
        if zero3.is_zero3(tag_dir):
            sd = zero3.consolidate(tag_dir)
            names = set(zero3.expert_names(tag_dir))
            stacked = {k: sd.pop(k) for k in list(sd) if k in names}
            first = zero3.rank0_model_state(tag_dir)
            return cls(sd, int(first.get("global_steps") or 0), zero3.trained_dtype(first),
                       stacked=stacked)
        if not (tag_dir / MAIN_FILE).is_file():
            raise FileNotFoundError(f"{tag_dir / MAIN_FILE} not found: is {tag_dir} a DeepSpeed "
                                    "checkpoint of python -m tagmoe_dist.train?")
        state = loading.load(tag_dir / MAIN_FILE, mmap=True, deepspeed_objects=True)
        return cls(state["module"], int(state.get("step", state.get("global_steps", 0)) or 0),
                   tag_dir=tag_dir, num_experts=num_experts)

    def check_experts(self, moe_prefixes: List[str]) -> None:
        """Refuse an incomplete checkpoint before anything is written."""
        if not self.zero3:
            self._files = _expert_files(self._tag_dir, len(moe_prefixes), self._num_experts)
            return
        for pre in moe_prefixes:
            for w in ("w1", "w2"):
                key = f"{_PREFIX}{pre}mlp.moe.experts.{w}"
                if key not in self._stacked:
                    raise ValueError(f"ZeRO-3 checkpoint: expert weight {key} is not among its "
                                     f"expert sub-groups ({sorted(self._stacked)[:4]}...)")

    def expert(self, layer: int, pre: str, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(w1 [D, 2F], w2 [F, D]) of expert e of the layer-th MoE layer (prefix `pre`)."""
        if self.zero3:
            return tuple(self._stacked[f"{_PREFIX}{pre}mlp.moe.experts.{w}"][e]
                         for w in ("w1", "w2"))
        sd = loading.load(self._files[layer][e])
        return (next(v for k, v in sd.items() if k.endswith(f".{e}.w1")),
                next(v for k, v in sd.items() if k.endswith(f".{e}.w2")))


def _expert_files(tag_dir: Path, num_layers: int, num_experts: int) -> Dict[int, Dict[int, Path]]:
    files: Dict[int, Dict[int, Path]] = {}
    for layer in range(num_layers):
        files[layer] = {}
        for e in range(num_experts):
            p = tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
            if not p.is_file():
                raise ValueError(f"incomplete checkpoint: {p} is missing; was it written by every "
                                 "expert-parallel rank?")
            files[layer][e] = p
    return files


def main(args) -> int:
    """The `--format hf` branch of `python -m tagmoe_dist.checkpoint export`."""
    import sys
    try:
        out = export_hf(args.ckpt, args.out, args.tag, args.force)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (Hugging Face directory)")
    return 0
