"""--format tagmoe: a dense tagmoe_dist GPT checkpoint -> an MoE GPT checkpoint that
`python -m tagmoe_dist.train --resume` continues from, with the dense model's logits at step 0.

Source: a DeepSpeed checkpoint written by `tagmoe_dist.train` for a dense GPT (`arch: dense` or
`moe_every: 0`): `<root>/latest`, `<root>/model_config.yaml`, `<root>/<tag>/mp_rank_00_model_states.pt`
('module' holds every weight). `--src` may name the root, a `step_N` directory or the run directory.

Shape legend (suffixes): D d_model, F dense FFN width, G granularity, f = F/G expert width,
E experts, K top-k. The dense FFN (`experts.DenseMLP`) stores w1_DH [D, H] with H = 2F for SwiGLU
(gate | up halves) or F for GELU, and w2_FD [F, D]; expert e stores w1 [D, 2f] (its gate | up
slices) and w2 [f, D]. `recipes.py` works in the Hugging Face orientation ([F, D] rows), so the
weights are transposed on the way in and out.

Why the MoE model equals the dense one at step 0 (recipes.py has the general argument):
  1. The written config sets `norm_topk_prob: true`: the K weights sum to 1, so copies (G = 1) sum
     to FFN(x); with G > 1 each slice gets total weight 1/G and the down projection carries x G.
  2. Our router breaks exact ties towards the lower expert index (`gating/topk.stable_topk`). With
     the group-major layout (expert e = group * G + slice) the G experts of a group share a router
     row and tie, and K is a multiple of G, so top-k takes whole groups. With all rows zero
     (`--router-init zeros`) every expert ties and the pick is experts 0..K-1, again whole groups,
     so no tie set needs measuring (unlike the HF routers, `recipes.topk_tie_set`).
  3. Task-aware routers start with zero task terms (`task_weight`, `task_gate`); the alignment head
     is a separate loss and does not enter the logits.
  4. Token dropping (`capacity_factor`) or `topk_scaling_factor != 1` carried over from the source's
     `moe:` settings would break (1); the metadata then says `exact_at_init: false`.

Output, written into a temporary directory next to --dst and renamed onto it:
  --dst/latest                       -> step_0
  --dst/model_config.yaml            the MoE GPTConfig (train.ep_size = --ep-size, train.log_dir =
                                     the parent of --dst, since the trainer reads <log_dir>/checkpoints)
  --dst/task_schema.yaml             when a schema is known (required for --router task_aware)
  --dst/upcycle_metadata.json        options, source sha256 hashes, expert layout, recipe
  --dst/step_0/mp_rank_00_model_states.pt   DeepSpeed's main file: 'module' = every non-expert
                                     tensor in GPT's state-dict naming (routers included), plus the
                                     bookkeeping keys DeepSpeed's loader reads
  --dst/step_0/layer_<L>_expert_<e>_mp_rank_00_model_states.pt   one file per global expert e of
                                     MoE layer L (the L-th MoE block), DeepSpeed's naming, so any EP
                                     size loads it
  --dst/step_0/tagmoe_manifest.json  files + sizes, `weights_only: true` (no optimizer state: the
                                     trainer loads the module only and starts Adam from zero)

Memory: the source main file is memory-mapped; one dense FFN and one expert are materialised at a
time. The main output file holds the non-FFN weights (as the source's does).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm.auto import tqdm

from tagmoe_dist.checkpoint import atomic, loading, manifest as mf
from tagmoe_dist.checkpoint.files import (LATEST, MAIN_FILE, MODEL_CONFIG, TASK_SCHEMA, TP_MAIN_FILE,
                                          UPCYCLE_METADATA, expert_file)
from tagmoe_dist.models.gpt import GPTConfig
from tagmoe_dist.tasks import TaskSchema
from tagmoe_dist.upcycle import recipes
from tagmoe_dist.upcycle.hf import sha256_file
from tagmoe_dist.upcycle.options import UpcycleOptions, parse_layers

TAG = "step_0"
METADATA_NAME = UPCYCLE_METADATA
_FFN_KEY = re.compile(r"^blocks\.(\d+)\.ffn\.(w1|w2)$")
_EXPERT_KEY = "blocks.{block}.ffn.experts.deepspeed_moe.experts.deepspeed_experts.{expert}.{name}"


# ---------------------------------------------------------------------------------------------
# Source.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GptSource:
    root: Path                    # holds model_config.yaml
    tag_dir: Path                 # holds mp_rank_00_model_states.pt
    config: GPTConfig
    schema_file: Optional[Path]   # the schema the source run wrote beside its checkpoints


def find_source(src: Path) -> GptSource:
    src = Path(src)
    try:
        root, tag_dir = mf.locate(src)        # a checkpoint root, run or step_N directory
    except FileNotFoundError as e:
        raise ValueError(f"--src {src}: {e}") from None
    config_file = root / MODEL_CONFIG
    if not config_file.is_file():
        raise ValueError(f"--src {src}: no model_config.yaml in {root}; tagmoe_dist.train writes it "
                         "beside its checkpoints (copy the run's config there as model_config.yaml)")
    cfg = GPTConfig.from_yaml(config_file)
    if not cfg.is_dense:
        raise ValueError(f"--src {src} holds an MoE GPT (arch: {cfg.arch}, moe_every: "
                         f"{cfg.moe_every}); upcycling starts from a dense one (arch: dense or "
                         "moe_every: 0). To change its expert-parallel size use "
                         "python -m tagmoe_dist.reshard")
    if (tag_dir / TP_MAIN_FILE).exists():
        raise ValueError(f"--src {tag_dir}: checkpoints with tensor-parallel size > 1 are not "
                         "supported; consolidate them first")
    if not (tag_dir / MAIN_FILE).is_file():
        raise ValueError(f"--src {tag_dir} has no {MAIN_FILE}: a ZeRO-3 or pipeline checkpoint? "
                         "Upcycling reads ZeRO 0-2 checkpoints of tagmoe_dist.train")
    schema = root / TASK_SCHEMA
    return GptSource(root, tag_dir, cfg, schema if schema.is_file() else None)


# ---------------------------------------------------------------------------------------------
# Plan: the MoE config and which blocks become MoE, decided before anything is written.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GptPlan:
    config: GPTConfig             # the MoE model
    moe_blocks: tuple[int, ...]   # block indices that become MoE, in order (MoE layer L = index)
    ffn_size: int                 # F, the dense FFN width
    layout: recipes.ExpertLayout
    recipe: recipes.ExpertRecipe
    schema_file: Optional[Path]   # copied to --dst/task_schema.yaml
    exact: bool


def moe_every_for(layers: tuple[int, ...], n_layer: int) -> int:
    """GPTConfig.moe_every that makes exactly `layers` MoE (block i is MoE iff (i+1) % m == 0)."""
    for m in range(1, n_layer + 1):
        if tuple(i for i in range(n_layer) if (i + 1) % m == 0) == tuple(layers):
            return m
    raise ValueError(f"--layers {','.join(map(str, layers))} cannot be expressed by GPTConfig."
                     "moe_every (block i is MoE iff (i + 1) % moe_every == 0): use all, every-other "
                     "(1,3,5,...) or every m-th block (m-1, 2m-1, ...)")


def _ffn_size(module, cfg: GPTConfig) -> int:
    act = cfg.moe_config.activation
    sizes = set()
    for i in range(cfg.n_layer):
        w1, w2 = module.get(f"blocks.{i}.ffn.w1"), module.get(f"blocks.{i}.ffn.w2")
        if w1 is None or w2 is None:
            raise ValueError(f"--src: the checkpoint has no blocks.{i}.ffn.w1/w2; is it a dense "
                             "tagmoe_dist GPT with tensor-parallel size 1?")
        F = w2.shape[0]
        want1 = (cfg.d_model, 2 * F if act == "swiglu" else F)
        if tuple(w1.shape) != want1 or tuple(w2.shape) != (F, cfg.d_model):
            raise ValueError(f"--src: blocks.{i}.ffn.w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} "
                             f"do not fit a {act} FFN of d_model {cfg.d_model}; model_config.yaml "
                             "and the weights disagree")
        sizes.add(F)
    if len(sizes) != 1:
        raise ValueError(f"--src: dense FFN widths differ between blocks ({sorted(sizes)})")
    return sizes.pop()


def _schema_file(src: GptSource, opts: UpcycleOptions) -> Optional[Path]:
    if opts.task_schema is not None:
        path = opts.task_schema
    elif src.schema_file is not None:
        path = src.schema_file
    elif opts.router == "task_aware":
        raise ValueError(f"--router task_aware needs a task schema: pass --task-schema YAML (the "
                         f"source {src.root} has no task_schema.yaml)")
    else:
        return None
    if not Path(path).is_file():
        raise ValueError(f"--task-schema {path} does not exist")
    TaskSchema.from_yaml(path)                # validate now, before anything is written
    return Path(path)


def make_gpt_plan(src: GptSource, module, opts: UpcycleOptions) -> GptPlan:
    cfg = src.config
    F = _ffn_size(module, cfg)
    G, E, K = opts.granularity, opts.num_experts, opts.top_k
    if F % G:
        raise ValueError(f"--granularity {G} does not divide the dense FFN width {F}; choose a "
                         f"divisor of {F}")
    activation = cfg.moe_config.activation
    if opts.scaling == "cube-root" and activation != "swiglu":
        raise ValueError(f"--scaling cube-root splits the factor over gate, up and down; a "
                         f"{activation} FFN has no gate: use --scaling down")
    layers = parse_layers(opts.layers, cfg.n_layer)
    moe_every = moe_every_for(layers, cfg.n_layer)
    if len(layers) < cfg.n_layer and K * (F // G) != F:
        raise ValueError(f"--layers {opts.layers!r} keeps blocks dense, but GPTConfig sizes a dense "
                         f"block of an MoE model as top_k * ffn_hidden_size = {K} * {F // G}, not the "
                         f"source width {F}; use --layers all, or --top-k equal to --granularity")
    schema_file = _schema_file(src, opts)
    moe = dict(cfg.moe)
    moe.update(ffn_hidden_size=F // G, num_experts=E, top_k=K, router=opts.router,
               norm_topk_prob=True)          # renormalised top-k: what makes (1) above exact
    # The dense width already holds any shared expert's share; the MoE gets none.
    dropped = ["num_shared_experts", "shared_expert_ffn_hidden_size"]
    if opts.router != "task_aware":
        dropped.append("task_conditioning")
    for key in dropped:
        moe.pop(key, None)
    train = dict(cfg.train)
    train.update(ep_size=opts.ep_size, log_dir=str(opts.dst.resolve().parent))
    schema_ref = str(opts.dst.resolve() / "task_schema.yaml") if schema_file else cfg.task_schema
    try:
        target = dataclasses.replace(cfg, arch="moe", moe_every=moe_every, moe=moe,
                                     task_schema=schema_ref, train=train)
    except ValueError as e:
        raise ValueError(f"the upcycled model config is invalid: {e}") from None
    layout = recipes.virtual_group_layout(E, G)
    recipe = recipes.ExpertRecipe(
        granularity=G, scale_factor=recipes.required_scale(E, K, G, renormalised=True),
        scaling=opts.scaling, drop_ratio=opts.drop_ratio, expert_noise=opts.expert_noise)
    m = target.moe_config
    routing_exact = m.capacity_factor is None and m.topk_scaling_factor == 1.0
    if not routing_exact:
        warnings.warn(f"the source's moe settings capacity_factor={m.capacity_factor} / "
                      f"topk_scaling_factor={m.topk_scaling_factor} carry over and make the "
                      "upcycled model differ from the dense one at step 0 (token dropping / "
                      "scaled weights); edit model_config.yaml if that is not intended")
    exact = recipe.exact and routing_exact
    return GptPlan(target, layers, F, layout, recipe, schema_file, exact)


# ---------------------------------------------------------------------------------------------
# Tensors.
# ---------------------------------------------------------------------------------------------


def _seeded_module(seed: int, build):
    """Build a module with its random init drawn from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def router_state(plan: GptPlan, block: int, schema: Optional[TaskSchema], opts: UpcycleOptions,
                 dtype: torch.dtype):
    """(state dict, buffer names) of one block's router: the module's own entries (task terms,
    bias buffers) with the replicated virtual-group rows as its weight."""
    from tagmoe_dist.gating.task_aware import TaskAwareRouter
    from tagmoe_dist.gating.topk import TopKRouter

    m = plan.config.moe_config
    router = _seeded_module(recipes.derive_seed(opts.seed, block, "router-module"),
                            lambda: TaskAwareRouter(m, schema) if m.router == "task_aware"
                            else TopKRouter(m))
    sd = router.state_dict()
    sd["weight"] = recipes.router_weight(plan.layout, m.hidden_size, opts.router_init, m.init_std,
                                         recipes.make_generator(opts.seed, block, "router")).to(dtype)
    for name in ("task_weight", "task_gate"):
        assert name not in sd or not sd[name].any(), f"{name} must start at zero (step-0 equality)"
    return sd, [k for k, _ in router.named_buffers() if k in sd]


def split_dense_ffn(w1_DH: torch.Tensor, w2_FD: torch.Tensor, activation: str):
    """(gate [F, D], up [F, D], down [D, F]) in recipes.py's orientation. A GELU FFN has no gate:
    its w1 is passed as both and the 'up' result is dropped by `expert_weights`."""
    F = w2_FD.shape[0]
    if activation == "swiglu":
        return w1_DH[:, :F].t(), w1_DH[:, F:].t(), w2_FD.t()
    return w1_DH.t(), w1_DH.t(), w2_FD.t()


def expert_weights(gate_FD, up_FD, down_DF, slice_idx: int, plan: GptPlan, activation: str,
                   seed: int, block: int, expert: int):
    """Expert `expert`'s (w1 [D, 2f or f], w2 [f, D]) in GroupedExperts' orientation."""
    gate_fD, up_fD, down_Df = recipes.build_expert(gate_FD, up_FD, down_DF, slice_idx, plan.recipe,
                                                   seed, block, expert)
    if activation == "swiglu":
        w1 = torch.cat([gate_fD.t(), up_fD.t()], dim=1)
    else:
        w1 = gate_fD.t().contiguous()
    return w1, down_Df.t().contiguous()


def _main_state(plan: GptPlan, state: dict, opts: UpcycleOptions,
                schema: Optional[TaskSchema]) -> dict:
    """DeepSpeed's main file for the MoE model: the source's bookkeeping keys, reset to step 0, with
    'module' in GPT's naming (dense FFNs of MoE blocks replaced by routers)."""
    from tagmoe_dist.gating.task_aware import TaskAlignment

    m = plan.config.moe_config
    module = state["module"]
    dtype = module[f"blocks.{plan.moe_blocks[0]}.ffn.w1"].dtype
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    buffers = list(state.get("buffer_names") or [])
    if m.router == "task_aware":
        # GPT registers its model-wide alignment head before the embeddings.
        align = _seeded_module(recipes.derive_seed(opts.seed, "alignment"),
                               lambda: TaskAlignment(m, schema))
        out.update((f"alignment.{k}", v) for k, v in align.state_dict().items())
        buffers += [f"alignment.{k}" for k, _ in align.named_buffers()]
    for key, t in module.items():
        hit = _FFN_KEY.match(key)
        if hit is None or int(hit[1]) not in plan.moe_blocks:
            out[key] = t
            continue
        if hit[2] == "w1":
            block = int(hit[1])
            sd, sd_buffers = router_state(plan, block, schema, opts, dtype)
            out.update((f"blocks.{block}.ffn.router.{k}", v) for k, v in sd.items())
            buffers += [f"blocks.{block}.ffn.router.{k}" for k in sd_buffers]
    shared = set((state.get("shared_params") or {}).keys())
    shapes: "OrderedDict[str, torch.Size]" = OrderedDict(
        (k, v.shape) for k, v in out.items() if k not in shared and k not in set(buffers))
    local = m.num_experts // opts.ep_size
    for block in plan.moe_blocks:   # informational (DeepSpeed recomputes shapes from the engine)
        width = 2 * m.ffn_hidden_size if m.activation == "swiglu" else m.ffn_hidden_size
        shapes[f"blocks.{block}.ffn.experts.w1"] = torch.Size([local, m.hidden_size, width])
        shapes[f"blocks.{block}.ffn.experts.w2"] = torch.Size([local, m.ffn_hidden_size, m.hidden_size])
    main = {k: v for k, v in state.items() if k != "module"}
    main.update(module=out, buffer_names=buffers, optimizer=None, param_shapes=[shapes],
                lr_scheduler=None, data_sampler=None, random_ltd=None, skipped_steps=0,
                global_steps=0, global_samples=0, num_experts=[m.num_experts] * len(plan.moe_blocks),
                step=0)
    main.setdefault("mp_world_size", 1)
    main.setdefault("dp_world_size", 1)
    return main


# ---------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------


def upcycle_gpt(opts: UpcycleOptions, progress: bool | None = None) -> Path:
    """Convert the dense GPT checkpoint `opts.src` into the MoE checkpoint directory `opts.dst`."""
    dst = opts.dst
    if dst.name != "checkpoints":
        raise ValueError(f"--dst {dst}: for --format tagmoe name the directory 'checkpoints' (e.g. "
                         "runs/moe/checkpoints): the trainer resumes from <log_dir>/checkpoints, and "
                         "the written config sets log_dir to its parent")
    if dst.exists() and not opts.force:
        raise ValueError(f"--dst {dst} already exists; pass --force to overwrite it or choose "
                         "another directory")
    src = find_source(opts.src)
    main_file = src.tag_dir / MAIN_FILE
    # mmap: tensors are paged in when used, so the source is never fully in memory.
    state = loading.load(main_file, mmap=True, deepspeed_objects=True)
    if "module" not in state or state["module"] is None:
        raise ValueError(f"{main_file} holds no 'module' state dict")
    plan = make_gpt_plan(src, state["module"], opts)
    with atomic.new_dir(dst) as tmp:
        _write_all(src, state, plan, opts, tmp, progress)
        atomic.replace_dir(tmp, dst)
    return dst


def _write_all(src: GptSource, state: dict, plan: GptPlan, opts: UpcycleOptions, out: Path,
               progress: bool | None) -> None:
    cfg = plan.config
    m = cfg.moe_config
    schema = TaskSchema.from_yaml(plan.schema_file) if plan.schema_file else None
    module = state["module"]
    tag_dir = out / TAG
    tag_dir.mkdir()
    ffn_bytes = sum(module[f"blocks.{b}.ffn.{n}"].nbytes for b in plan.moe_blocks for n in ("w1", "w2"))
    bar = tqdm(total=ffn_bytes * m.num_experts // opts.granularity, unit="B", unit_scale=True,
               desc="upcycle", disable=None if progress is None else not progress)
    try:
        for layer, block in enumerate(plan.moe_blocks):
            w1_DH, w2_FD = module[f"blocks.{block}.ffn.w1"], module[f"blocks.{block}.ffn.w2"]
            gate_FD, up_FD, down_DF = split_dense_ffn(w1_DH, w2_FD, m.activation)
            for e in range(m.num_experts):
                w1, w2 = expert_weights(gate_FD, up_FD, down_DF, plan.layout.slice_E[e], plan,
                                        m.activation, opts.seed, block, e)
                key = dict(block=block, expert=e)
                torch.save({_EXPERT_KEY.format(name="w1", **key): w1,
                            _EXPERT_KEY.format(name="w2", **key): w2},
                           tag_dir / expert_file(layer, e))
                bar.update(w1.nbytes + w2.nbytes)
        torch.save(_main_state(plan, state, opts, schema), tag_dir / MAIN_FILE)
    finally:
        bar.close()

    note = (f"upcycled by tagmoe_dist.upcycle from {src.tag_dir}: model weights only; the optimizer "
            "state starts fresh at step 0")
    mf.write(tag_dir, step=0, weights_only=True, ep_size=opts.ep_size, note=note)
    (out / LATEST).write_text(TAG)
    if plan.schema_file is not None:
        shutil.copyfile(plan.schema_file, out / TASK_SCHEMA)
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    hashes = {str(p.relative_to(src.root)): sha256_file(p)
              for p in (src.tag_dir / MAIN_FILE, src.root / MODEL_CONFIG)}
    if plan.schema_file is not None:
        hashes[str(plan.schema_file)] = sha256_file(plan.schema_file)
    (out / METADATA_NAME).write_text(json.dumps(_metadata(src, plan, opts, hashes), indent=2) + "\n")


def _metadata(src: GptSource, plan: GptPlan, opts: UpcycleOptions, hashes: dict) -> dict:
    recipe = plan.recipe
    return {
        "tool": "tagmoe_dist.upcycle",
        "options": opts.to_json(),
        "source": {"dir": str(src.tag_dir.resolve()), "kind": "tagmoe_dist dense GPT (DeepSpeed)",
                   "sha256": hashes},
        "target": {"format": "tagmoe", "tag": TAG, "moe_blocks": list(plan.moe_blocks),
                   "moe_every": plan.config.moe_every, "ep_size": opts.ep_size,
                   "ffn_hidden_size": plan.ffn_size // opts.granularity,
                   "dense_ffn_size": plan.ffn_size},
        "expert_layout": {
            "slice_of_expert": list(plan.layout.slice_E),
            "group_of_expert": list(plan.layout.group_E),
            "rule": ("group-major: expert e = group * G + slice; a group's experts share one "
                     "router row; exact ties go to the lower expert index (stable_topk), so "
                     "top-k takes whole groups, also with --router-init zeros"),
        },
        "recipe": {"granularity": recipe.granularity, "scale_factor": recipe.scale_factor,
                   "scaling": recipe.scaling,
                   "projection_scales": list(recipes.projection_scales(recipe.scale_factor,
                                                                       recipe.scaling)),
                   "drop_ratio": recipe.drop_ratio, "expert_noise": recipe.expert_noise,
                   "router_init": opts.router_init, "router_std": plan.config.moe_config.init_std,
                   "exact_at_init": plan.exact},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
