"""Reshard a tagmoe_dist.train checkpoint for another expert-parallel size (and world size).

    python -m tagmoe_dist.reshard --src runs/a/checkpoints --dst runs/b/checkpoints --ep-size 1

What depends on the EP size in a DeepSpeed ZeRO 1/2 checkpoint:
  - The model weights: nothing. Expert files are named by global expert id
    (`layer_<L>_expert_<e>_mp_rank_00_model_states.pt`) and DeepSpeed's loader maps them onto any EP
    rank; the main file holds only non-expert tensors. They are copied unchanged.
  - The ZeRO optimizer partitions: everything. Expert parameter groups are flattened per EP rank
    (its local experts) and partitioned over the expert-data-parallel group of size W/P (see
    `zero.py`). DeepSpeed 0.19.8 loads a checkpoint saved at EP=2 into an EP=1 engine on the same
    2 processes WITHOUT ANY ERROR: each rank copies "its" saved partition by position, the sizes
    happen to agree, and the first optimizer step writes fp32 master values of other experts into
    the expert weights (tests/test_reshard.py shows it). A world-size change, by contrast, is
    refused by DeepSpeed ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
    world size is not currently supported").

Algorithm:
  1. Read the main file (its param_shapes list every optimizer group's parameters in flat order)
     and every rank's `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, memory-mapped.
  2. Consolidate every optimizer group (`zero.consolidate_group`): fp32 master weights and Adam
     moments per parameter, whole; experts concatenated over the source EP ranks.
  3. Undo DeepSpeed's max_group_size split of expert groups, rename them `ep_size_<P>`, split again
     for the new local sizes.
  4. Partition every group for the target (W, P), write one optimizer file per target rank with
     DeepSpeed's bookkeeping (paddings, partition counts, param_slice_mappings), update the main
     file's param_shapes and dp_world_size, copy the expert files, write `latest`, the manifest and
     the run's model_config.yaml (train.ep_size = P, train.log_dir = the parent of --dst).
  5. All of it in a temporary directory next to --dst, renamed onto it at the end.

A ZeRO-3 source becomes a DeepSpeed universal checkpoint (`zero3.to_universal`: weights and Adam
moments, whole, for any EP and world size; the manifest says `universal: true`), which the trainer
resumes under ZeRO-3 through DeepSpeed's universal loader (`zero3.load_universal`).

With `reset_optimizer=True`, or when the source has no ZeRO 1/2 optimizer state (ZeRO-0, or a
weights-only checkpoint), only the weights are written (ZeRO 0-2 files, for any ZeRO stage):
the manifest says `weights_only: true` and why, and `tagmoe_dist.checkpoint.engine.load` then
loads the module only (Adam restarts from zero).

Memory: the source files are memory-mapped; the output optimizer partitions (one fp32 copy and
two moments of the model) are built in memory before they are written. The source is verified
against its manifest first (sizes, content hashes); files are read with weights_only=True plus
the DeepSpeed classes its optimizer files hold (`loading.py`).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import yaml

from tagmoe_dist.checkpoint import atomic, loading, manifest as mf, zero
from tagmoe_dist.checkpoint.files import (EXPERT_FILE, LATEST, MAIN_FILE, MODEL_CONFIG, RUN_JSON,
                                          TASK_SCHEMA, TP_MAIN_FILE, UPCYCLE_METADATA, ZERO_FILE,
                                          zero_file)
from tagmoe_dist.paths import check_output_dir

PathLike = Union[str, Path]
# optimizer_state_dict entries that do not depend on the layout; copied from the source's rank 0
_GLOBAL_KEYS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage",
                "ds_version")
_LAYOUT_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings",
                "param_alignment_paddings", "partition_count", "param_slice_mappings")
_SIDE_FILES = (TASK_SCHEMA, RUN_JSON, UPCYCLE_METADATA)

__all__ = ["reshard", "saved_layout"]


def _select(src: PathLike, tag: Optional[str], log) -> Tuple[Path, Path, dict]:
    """(root, tag directory, manifest or {}) of the source, verified against its manifest."""
    try:
        root, tag_dir, manifest = mf.select(src, tag, log=log)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--src: {e}") from None
    return root, tag_dir, manifest or {}


def _save(obj, path: Path) -> None:
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        raise atomic.write_failed(path, e) from e


def _zero_files(tag_dir: Path) -> Tuple[str, Dict[int, Path]]:
    prefixes, files = set(), {}
    for p in tag_dir.iterdir():
        m = ZERO_FILE.match(p.name)
        if m:
            prefixes.add(m.group(1))
            files[int(m.group(2))] = p
    if len(prefixes) > 1:
        raise ValueError(f"{tag_dir} mixes fp32/fp16 and bf16 optimizer files")
    return (prefixes.pop() if prefixes else "zero_pp_rank_"), files


def _load(path: Path):
    return loading.load(path, mmap=True, deepspeed_objects=True)


def saved_layout(tag_dir: PathLike) -> Dict[str, Optional[int]]:
    """{'world_size', 'ep_size'} a checkpoint's optimizer state was partitioned for (ep_size None
    for a dense model or when the checkpoint has no ZeRO optimizer files). Cheap: reads the main
    file and rank 0's optimizer file, memory-mapped. Meant for a resume-time check."""
    tag_dir = Path(tag_dir)
    from tagmoe_dist.checkpoint import zero3 as zero3_checkpoint
    if zero3_checkpoint.is_zero3(tag_dir) and not (tag_dir / MAIN_FILE).is_file():
        return zero3_checkpoint.saved_layout(tag_dir)
    main = _load(tag_dir / MAIN_FILE)
    _, files = _zero_files(tag_dir)
    ep = None
    if 0 in files:
        groups = _load(files[0])["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        sizes = {zero.ep_size_of_group(g) for g in groups} - {None}
        ep = sizes.pop() if len(sizes) == 1 else None
    return {"world_size": int(main.get("dp_world_size", 1)), "ep_size": ep}


def reshard(src: PathLike, dst: PathLike, ep_size: int, world_size: Optional[int] = None,
            tag: Optional[str] = None, reset_optimizer: bool = False, force: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Write `dst` (a checkpoints directory) from `src` for `ep_size` experts-parallel ranks on
    `world_size` processes (default: the source's). Returns `dst`."""
    dst = Path(dst)
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"--ep-size must be a positive integer, got {ep_size!r}")
    if dst.name != "checkpoints":
        raise ValueError(f"--dst {dst}: name the directory 'checkpoints' (e.g. runs/b/checkpoints): "
                         "the trainer resumes from <log_dir>/checkpoints, and the written config "
                         "sets log_dir to its parent")
    check_output_dir(src, dst)
    if dst.exists() and not force:
        raise ValueError(f"--dst {dst} already exists; pass --force to overwrite it")
    root, tag_dir, manifest_in = _select(src, tag, log)
    check_output_dir(root, dst)
    if (tag_dir / TP_MAIN_FILE).exists():
        raise ValueError(f"{tag_dir}: tensor-parallel checkpoints are not supported")
    from tagmoe_dist.checkpoint import zero3 as zero3_checkpoint
    if zero3_checkpoint.is_universal(tag_dir):
        raise ValueError(f"{tag_dir} is a DeepSpeed universal checkpoint: it already loads at any "
                         "EP and world size; resume from it directly (ZeRO-3 config)")
    if zero3_checkpoint.is_zero3(tag_dir) and not (tag_dir / MAIN_FILE).is_file() \
            and not reset_optimizer and not manifest_in.get("weights_only"):
        return _reshard_zero3(root, tag_dir, manifest_in, dst, ep_size, world_size, log)
    if zero3_checkpoint.is_zero3(tag_dir) and not (tag_dir / MAIN_FILE).is_file():
        # ZeRO-3, --reset-optimizer: the weights, re-laid out as ZeRO 0-2 files (weights only)
        import tempfile
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.z3-", dir=dst.parent) as z2:
            z2_tag = Path(z2) / tag_dir.name
            layout = zero3_checkpoint.write_zero2_weights(tag_dir, z2_tag)
            mf.write(z2_tag, step=manifest_in.get("step"), weights_only=True,
                     ep_size=layout["ep_size"])
            for name in (MODEL_CONFIG,) + _SIDE_FILES:
                if (root / name).is_file():
                    shutil.copy2(root / name, Path(z2) / name)
            (Path(z2) / LATEST).write_text(tag_dir.name)
            return reshard(z2, dst, ep_size, world_size, None, reset_optimizer, force, log)
    if not (tag_dir / MAIN_FILE).is_file():
        raise ValueError(f"{tag_dir} has no {MAIN_FILE}: a ZeRO-3 or pipeline checkpoint? "
                         "Resharding reads ZeRO 0-2 checkpoints of tagmoe_dist.train")
    main = _load(tag_dir / MAIN_FILE)
    src_world = int(main.get("dp_world_size", 1))
    world = src_world if world_size is None else int(world_size)
    if world < 1 or world % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the world size {world}; pass "
                         "--world-size, a multiple of --ep-size")
    experts = _expert_files(tag_dir, main)
    for layer, count in enumerate(main.get("num_experts") or []):
        if count % ep_size:
            raise ValueError(f"MoE layer {layer} has {count} experts, not divisible by --ep-size "
                             f"{ep_size}")
    step = int(manifest_in.get("step", main.get("step", main.get("global_steps", 0))))

    prefix, zfiles = _zero_files(tag_dir)
    reason = None
    if reset_optimizer:
        reason = "--reset-optimizer was given"
    elif manifest_in.get("weights_only"):
        reason = "the source checkpoint holds model weights only"
    elif not zfiles:
        raise ValueError(f"{tag_dir} has no ZeRO stage 1/2 optimizer files (zero_pp_rank_*): "
                         "optimizer state of ZeRO stage 0 checkpoints cannot be resharded; pass "
                         "--reset-optimizer to keep the weights and restart the optimizer")
    elif sorted(zfiles) != list(range(src_world)):
        raise ValueError(f"{tag_dir}: optimizer files for ranks {sorted(zfiles)}, expected "
                         f"0..{src_world - 1} (dp_world_size); the checkpoint is incomplete")

    with atomic.new_dir(dst) as tmp:
        out_tag = tmp / tag_dir.name
        out_tag.mkdir()
        for path in experts:
            shutil.copy2(path, out_tag / path.name)
        layout = {"ep_size": ep_size, "world_size": world}
        if reason is None:
            src_ep = _write_optimizer(main, tag_dir, zfiles, prefix, src_world, out_tag, **layout)
            optim_note = (f"optimizer state resharded exactly from ep_size {src_ep} / world "
                          f"{src_world}")
        else:
            src_ep = manifest_in.get("ep_size")
            main = {**main, "dp_world_size": world, "optimizer": None}
            optim_note = (f"optimizer state NOT carried over ({reason}): Adam restarts from zero "
                          f"moments at step {step}")
            log(f"WARNING: {optim_note}")
        _save(main, out_tag / MAIN_FILE)
        _finish(root, tag_dir, manifest_in, tmp, dst, step=step, ep_size=ep_size,
                world_size=world, weights_only=reason is not None, note=optim_note,
                source={"ep_size": src_ep, "world_size": src_world})
    log(f"wrote {dst}/{tag_dir.name} for ep_size {ep_size} on {world} processes; {optim_note}")
    return dst


def _finish(root: Path, tag_dir: Path, manifest_in: dict, tmp: Path, dst: Path, *, source: dict,
            ep_size: int, **fields) -> None:
    """The written tag's manifest (with where it came from and the retargeted run config),
    `latest`, the run's side files; then `tmp` renamed onto `dst`."""
    mf.write(tmp / tag_dir.name, ep_size=ep_size, **fields,
             resharded_from={"dir": str(tag_dir.resolve()), **source,
                             "files": manifest_in.get("files")},
             **({"config": _retarget(manifest_in["config"], dst, ep_size)}
                if manifest_in.get("config") else {}))
    (tmp / LATEST).write_text(tag_dir.name)
    _write_side_files(root, tmp, dst, ep_size)
    atomic.replace_dir(tmp, dst)


def _reshard_zero3(root: Path, tag_dir: Path, manifest_in: dict, dst: Path, ep_size: int,
                   world_size: Optional[int], log: Callable[[str], None]) -> Path:
    """ZeRO-3 source, optimizer kept: a DeepSpeed universal checkpoint (`zero3.to_universal`:
    whole fp32 weights and Adam moments per parameter, experts [E, ...]), which DeepSpeed's ZeRO-3
    loader cuts for any EP and world size; the trainer resumes from it under ZeRO-3."""
    from tagmoe_dist.checkpoint import zero3 as zero3_checkpoint
    layout = zero3_checkpoint.saved_layout(tag_dir)
    world = layout["world_size"] if world_size is None else int(world_size)
    if world < 1 or world % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the world size {world}; pass "
                         "--world-size, a multiple of --ep-size")
    shapes = zero3_checkpoint.rank0_model_state(tag_dir)["param_shapes"]
    local = {n: s for g in shapes for n, s in g.items()}
    for name in zero3_checkpoint.expert_names(tag_dir):
        count = int(local[name][0]) * (layout["ep_size"] or 1)
        if count % ep_size:
            raise ValueError(f"{name} has {count} experts, not divisible by --ep-size {ep_size}")
    step = int(manifest_in.get("step", 0))
    note = (f"universal checkpoint of a ZeRO-3 checkpoint (ep_size {layout['ep_size']}, world "
            f"{layout['world_size']}): weights and optimizer state, for any EP size; resume it "
            "with a ZeRO-3 DeepSpeed config")
    with atomic.new_dir(dst) as tmp:
        zero3_checkpoint.to_universal(tag_dir, tmp / tag_dir.name)
        _finish(root, tag_dir, manifest_in, tmp, dst, step=step, ep_size=ep_size,
                world_size=world, universal=True, note=note, source=layout)
    log(f"wrote {dst}/{tag_dir.name} for ep_size {ep_size} on {world} processes; {note}")
    return dst


def _expert_files(tag_dir: Path, main: dict) -> List[Path]:
    found: Dict[int, Dict[int, Path]] = {}
    for p in tag_dir.iterdir():
        m = EXPERT_FILE.match(p.name)
        if m and int(m.group(3)) == 0:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    for layer, count in enumerate(main.get("num_experts") or []):
        missing = [e for e in range(count) if e not in found.get(layer, {})]
        if missing:
            raise ValueError(f"{tag_dir}: MoE layer {layer} lacks expert files {missing}: was the "
                             "checkpoint written by every expert-parallel rank?")
    return [p for layer in sorted(found) for _, p in sorted(found[layer].items())]


def _write_side_files(root: Path, out: Path, dst: Path, ep_size: int) -> None:
    for name in _SIDE_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, out / name)
    cfg_path = root / MODEL_CONFIG
    if cfg_path.is_file():
        cfg = _retarget(yaml.safe_load(cfg_path.read_text()), dst, ep_size)
        if (root / TASK_SCHEMA).is_file() and cfg.get("task_schema"):
            cfg["task_schema"] = str(dst.resolve() / TASK_SCHEMA)
        (out / MODEL_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def _retarget(cfg: dict, dst: Path, ep_size: int) -> dict:
    """The source's effective config (every train.* setting kept) for the resharded run."""
    train = dict(cfg.get("train") or {})
    train.update(ep_size=ep_size, log_dir=str(dst.resolve().parent))
    return {**cfg, "train": train}


def _write_optimizer(main: dict, tag_dir: Path, zfiles: Dict[int, Path], prefix: str,
                     src_world: int, out_tag: Path, ep_size: int, world_size: int) -> Optional[int]:
    """Consolidate the source's ZeRO partitions and write the target's; updates `main` in place.
    Returns the source's ep_size (None for a model without experts)."""
    from deepspeed.utils.tensor_fragment import fragment_address

    files = [_load(zfiles[r]) for r in range(src_world)]
    sds = [f["optimizer_state_dict"] for f in files]
    first = sds[0]
    unknown = sorted(set(first) - set(_GLOBAL_KEYS) - set(_LAYOUT_KEYS))
    if unknown or not isinstance(first.get("base_optimizer_state"), dict):
        raise ValueError(f"{zfiles[0]}: optimizer state with entries {unknown or '(elastic)'} is "
                         "not understood (DeepSpeed ZeRO 1/2, non-elastic, is); use "
                         "--reset-optimizer")
    hypers = first["base_optimizer_state"]["param_groups"]
    shapes = main["param_shapes"]
    if len(shapes) != len(hypers):
        raise ValueError(f"{tag_dir}: {len(shapes)} param_shapes groups but {len(hypers)} "
                         "optimizer groups")
    src_eps = {zero.ep_size_of_group(h) for h in hypers} - {None}
    if len(src_eps) > 1:
        raise ValueError(f"{tag_dir}: expert groups of several ep sizes {sorted(src_eps)}")
    groups = [zero.consolidate_group(g, {k: v for k, v in h.items() if k != "params"}, shapes[g],
                                     sds, src_world)
              for g, h in enumerate(hypers)]
    target: List[zero.GroupState] = []
    for grp in zero.merge_split_groups(groups):
        target += zero.split_group(zero.with_ep_size(grp, ep_size))

    main["param_shapes"] = [OrderedDict((n, zero.local_shape(grp, n, grp.ep_size)) for n in grp.names)
                            for grp in target]
    main["dp_world_size"] = world_size
    for rank in range(world_size):
        base = {"state": {}, "param_groups": []}
        fp32s, paddings, counts, mappings = [], [], [], []
        for g, grp in enumerate(target):
            fp32, entry, padding, count, frags = zero.partition_group(grp, world_size, rank)
            if entry:
                base["state"][g] = entry
            base["param_groups"].append({**grp.hyper, "params": [g]})
            fp32s.append(fp32)
            paddings.append(padding)
            counts.append(count)
            mappings.append(OrderedDict((n, fragment_address(numel=num, start=start))
                                        for n, start, num in frags))
        layout = dict(base_optimizer_state=base, single_partition_of_fp32_groups=fp32s,
                      group_paddings=paddings,
                      param_alignment_paddings=[[0] * len(grp.names) for grp in target],
                      partition_count=counts, param_slice_mappings=mappings)
        # The source's key order, so that an unchanged layout reproduces the files exactly.
        osd = {k: layout.get(k, v) for k, v in first.items()}
        out = {k: osd if k == "optimizer_state_dict" else v for k, v in files[0].items()}
        _save(out, out_tag / zero_file(prefix, rank))
    return src_eps.pop() if src_eps else None
