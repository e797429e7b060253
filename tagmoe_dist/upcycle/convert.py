"""Dense HF checkpoint -> HF MoE checkpoint, streamed tensor by tensor.

  1. Read config.json and the safetensors headers; build the plan (every output tensor's name,
     shape, dtype) and refuse bad input before anything is written.
  2. Write into a fresh temporary directory next to --dst: shard headers first, then each tensor
     as soon as it exists. One dense FFN (one layer) is in memory at a time.
  3. Write config.json, side files (tokenizer, generation config) and upcycle_metadata.json
     (options, source sha256 hashes, expert layout).
  4. Rename the temporary directory onto --dst, so a crash never leaves a half-written --dst.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tagmoe_dist.checkpoint import atomic
from tagmoe_dist.checkpoint.files import UPCYCLE_METADATA
from tagmoe_dist.upcycle import archs, recipes
from tagmoe_dist.upcycle.hf import CODE_DTYPES, DenseCheckpoint, ShardedWriter, copy_side_files, sha256_file
from tagmoe_dist.upcycle.options import UpcycleOptions
from tagmoe_dist.upcycle.plan import Plan, make_plan

METADATA_NAME = UPCYCLE_METADATA


def upcycle(opts: UpcycleOptions, progress: bool | None = None) -> Path:
    """Convert `opts.src` into `opts.dst` and return `opts.dst`.

    progress: True/False forces the tqdm bar on/off; None shows it only on a terminal.
    A Hugging Face source becomes --format hf (below); a tagmoe_dist GPT checkpoint becomes
    --format tagmoe (`tagmoe.py`); a Megatron-core dense GPT becomes --format hf via a dense HF
    Llama (`megatron.py`). Other sources are refused, listing the supported ones.
    """
    kind = archs.source_kind(opts.src)
    if archs.SOURCE_FORMATS[kind] != opts.format:
        raise ValueError(archs.format_mismatch(kind, opts.format, opts.src))
    if kind == "tagmoe":
        from tagmoe_dist.upcycle.tagmoe import upcycle_gpt
        return upcycle_gpt(opts, progress)
    if kind == "megatron":
        return _upcycle_megatron(opts, progress)
    dst = opts.dst
    if dst.exists() and not opts.force:
        raise ValueError(f"--dst {dst} already exists; pass --force to overwrite it or choose "
                         "another directory")
    ckpt = DenseCheckpoint(opts.src)
    try:
        plan = make_plan(ckpt, opts)
        with atomic.new_dir(dst) as tmp:
            _write_all(ckpt, plan, opts, tmp, progress)
            atomic.replace_dir(tmp, dst)
    finally:
        ckpt.close()
    return dst


def _upcycle_megatron(opts: UpcycleOptions, progress: bool | None) -> Path:
    """Megatron GPT -> dense HF Llama in a temporary directory (in memory, not streamed) -> the
    HF path below; upcycle_metadata.json then names the Megatron source instead of the
    temporary one."""
    import dataclasses

    from tagmoe_dist.upcycle import megatron

    if opts.dst.exists() and not opts.force:
        raise ValueError(f"--dst {opts.dst} already exists; pass --force to overwrite it or choose "
                         "another directory")
    opts.dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.dst.name}.dense-", dir=opts.dst.parent))
    try:
        megatron.to_hf_llama(opts.src, tmp)
        dst = upcycle(dataclasses.replace(opts, src=tmp), progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta_path = dst / METADATA_NAME
    meta = json.loads(meta_path.read_text())
    meta["options"] = opts.to_json()
    meta["source"] = {"dir": str(opts.src.resolve()), "model_type": "megatron_gpt",
                      "checkpoint": str(megatron.checkpoint_dir(opts.src).resolve()),
                      "via": "dense HF Llama (tagmoe_dist.upcycle.megatron)",
                      "dense_llama_sha256": meta["source"]["sha256"]}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def _write_all(ckpt: DenseCheckpoint, plan: Plan, opts: UpcycleOptions, out: Path,
               progress: bool | None):
    hashes = {name: sha256_file(ckpt.dir / name) for name in ["config.json", *ckpt.weight_files()]}
    provenance = {"options": opts.to_json(), "source_sha256": hashes}
    writer = ShardedWriter(out, plan.specs, opts.max_shard_bytes,
                           {"tagmoe_upcycle": json.dumps(provenance, sort_keys=True)})
    total = sum(s.nbytes for s in plan.specs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="upcycle",
               disable=None if progress is None else not progress)

    def put(name: str, tensor: torch.Tensor):
        writer.write(name, tensor)
        bar.update(tensor.numel() * tensor.element_size())

    try:
        for key in plan.passthrough:
            put(key, ckpt.get(key))
        for layer in sorted(plan.dense_ffns):
            _write_layer(ckpt, plan, opts, layer, put)
        index = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    (out / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    side = copy_side_files(ckpt.dir, out, skip={"config.json", METADATA_NAME})
    meta = _metadata(plan, opts, hashes, index, side)
    (out / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def _write_layer(ckpt: DenseCheckpoint, plan: Plan, opts: UpcycleOptions, layer: int, put):
    ffn = plan.dense_ffns[layer]
    gate_FH, up_FH, down_HF = ffn.read(ckpt)
    names = plan.moe_names[layer]
    if names is None:
        for name, w in zip(ffn.classic_names(), (gate_FH, up_FH, down_HF)):
            put(name, w.contiguous())
        return
    hidden = gate_FH.shape[1]
    router_EH = recipes.router_weight(plan.layout, hidden, opts.router_init, plan.router_std,
                                      recipes.make_generator(opts.seed, layer, "router"))
    put(names.router, router_EH.to(gate_FH.dtype))
    for e, expert_names in enumerate(names.experts):
        weights = recipes.build_expert(gate_FH, up_FH, down_HF, plan.layout.slice_E[e],
                                       plan.recipe, opts.seed, layer, e)
        for name, w in zip(expert_names, weights):
            put(name, w)
    for spec in names.zeros:
        put(spec.name, torch.zeros(spec.shape, dtype=CODE_DTYPES[spec.dtype]))


def _metadata(plan: Plan, opts: UpcycleOptions, hashes: dict, index: dict, side: list) -> dict:
    import importlib.metadata

    import safetensors

    try:
        version = importlib.metadata.version("tagmoe-dist")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        version = "unknown"
    recipe = plan.recipe
    return {
        "tool": "tagmoe_dist.upcycle",
        "options": opts.to_json(),
        "source": {"dir": str(opts.src.resolve()), "model_type": plan.arch.source_type,
                   "sha256": hashes},
        "target": {"format": opts.format, "model_type": plan.arch.target_type,
                   "architectures": [plan.arch.target_class]},
        "moe_layers": list(plan.moe_layers),
        "expert_layout": {
            "slice_of_expert": list(plan.layout.slice_E),
            "group_of_expert": list(plan.layout.group_E),
            "tie_set": list(plan.tie_set),
            "rule": ("virtual group v holds slices 0..G-1 and one router row; groups are runs of "
                     "G experts over tie_set (sorted) then the other experts (sorted)"),
        },
        "recipe": {"granularity": recipe.granularity, "scale_factor": recipe.scale_factor,
                   "scaling": recipe.scaling,
                   "projection_scales": list(recipes.projection_scales(recipe.scale_factor,
                                                                       recipe.scaling)),
                   "drop_ratio": recipe.drop_ratio, "expert_noise": recipe.expert_noise,
                   "router_init": opts.router_init, "router_std": plan.router_std,
                   "exact_at_init": recipe.exact},
        "output": {"shards": sorted(set(index["weight_map"].values())),
                   "total_size": index["metadata"]["total_size"], "side_files": side},
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__,
                     "tagmoe_dist": version},
    }
