#!/usr/bin/env python
"""Where DeepSpeed's ds_to_universal stops on ZeRO-3 expert partitions that are not AutoEP's.

DeepSpeed 0.19.8 converts ZeRO-3 expert partitions only through AutoEP's checkpoint metadata
('ds_autoep_layers', written by engine._save_moe_checkpoint for `AutoEPMoELayer` modules), and
that metadata names exactly three tensors per layer, `<prefix>.w1`, `.w2`, `.w3` (AutoEP's
SwiGLU layout: gate, down, up). This script, on 4 gloo processes (EP=2 x expert-data-parallel 2),
trains a tiny tagmoe_dist GPT for one step under ZeRO-3 with expert partitions, saves it, and:

  0. first, for reference, does the same with DeepSpeed's own AutoEP (a tiny Hugging Face Mixtral,
     the same engine and the same EP=2 x EDP=2 placement): ds_to_universal converts it, and every
     expert tensor equals the experts gathered from the live engine;
  1. runs ds_to_universal on the checkpoint as saved: it finishes, but each expert tensor is the
     concatenation of the four ranks' partitions in data-parallel rank order
     (ep0-part0, ep1-part0, ep0-part1, ep1-part1), flattened: not the experts in order;
  2. adds AutoEP's metadata for our layers (what AutoEP itself would write) and runs it again:
     it stops with "AutoEP expert parameters are missing from rank 0 ZeRO param_shapes:
     ['blocks.0.ffn.experts.w3', ...]" (ds_to_universal.py `_validate_autoep_expert_shapes`).
     Our experts hold the gate and up projections fused in one `w1` [E, D, 2F] (and a GELU
     expert has no third tensor at all); AutoEP's format has no way to declare them.
  3. compares with tagmoe_dist's `to_universal`, which runs ds_to_universal and rewrites the
     expert entries whole with AutoEP's own marks, after which DeepSpeed's universal loader
     restores them at any EP size (tests/test_zero3_checkpoint.py loads one at EP=1).

Blocked: DeepSpeed's own converter alone does not give a correct universal checkpoint of our
experts (point 1 silently, point 2 loudly). Not blocked: loading a universal checkpoint at another
EP size, once the expert entries are right (point 3).

    python tools/repro_universal_expert_layout.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(rank, world, out):
    import deepspeed
    from tagmoe_dist.checkpoint.zero3 import autoep_layers
    from tagmoe_dist.layer import MoELayer
    from tests.test_zero3 import build_engine, gpt_config, train_steps
    deepspeed.init_distributed(dist_backend="gloo")
    engine, model, schema = build_engine(gpt_config("topk"), 3, 2)
    train_steps(engine, schema, rank, 0, 1)
    engine.save_checkpoint(f"{out}/plain", tag="t")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    # the same checkpoint, with the metadata AutoEP writes for its layers
    engine.save_checkpoint(f"{out}/autoep_meta", tag="t",
                           client_state=autoep_layers(model, layers))


def _autoep_worker(rank, world, out):
    """DeepSpeed's own AutoEP on a tiny Mixtral, the same engine and placement (ZeRO-3, EP=2 x
    EDP=2): one step, save, and the whole expert tensors as the reference."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_hf import _patch_autoep_registry_get
    _patch_autoep_registry_get()          # transformers 5.25 vs AutoEP's registry lookup
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(f"{out}/mixtral", dtype=torch.float32)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ids_BS = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(input_ids=ids_BS, labels=ids_BS).loss)
    engine.step()
    engine.save_checkpoint(f"{out}/autoep", tag="t")
    truth = {}
    for name, module in engine.module.named_modules():
        if type(module).__name__ != "AutoEPMoELayer":
            continue
        for w in ("w1", "w2", "w3"):
            p = getattr(module.experts, w)
            with deepspeed.zero.GatheredParameters([p]):        # this EP rank's share, whole
                share = p.detach().clone()
            parts = [torch.empty_like(share) for _ in range(module.ep_size)]
            dist.all_gather(parts, share, group=module.ep_group)
            truth[f"{name}.experts.{w}"] = torch.cat(parts)
    if rank == 0:
        torch.save(truth, f"{out}/autoep_truth.pt")


def _universal(folder, name):
    got = torch.load(Path(folder) / "zero" / name / "fp32.pt", weights_only=False)
    return got["param"] if isinstance(got, dict) else got


def _convert(src, dst):
    import argparse as ap
    from deepspeed.checkpoint.ds_to_universal import main
    main(ap.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                      inject_missing_state=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="uc_repro_"))
    from tests.dist_utils import run_distributed
    from tests import hf_models as H
    H.save("mixtral", work / "mixtral")
    run_distributed(_autoep_worker, 4, str(work))
    run_distributed(_worker, 4, str(work))
    truth_autoep = torch.load(work / "autoep_truth.pt", weights_only=True)
    _convert(work / "autoep" / "t", work / "uc_autoep")
    same = {k: torch.equal(_universal(work / "uc_autoep", k), v) for k, v in truth_autoep.items()}
    print(f"\n0. AutoEP's own layer (tiny Mixtral, same engine and placement): ds_to_universal "
          f"gives {len(same)} expert tensors, all equal to the gathered experts: "
          f"{all(same.values())}")
    from tagmoe_dist.checkpoint.zero3 import consolidate, to_universal
    name = "blocks.0.ffn.experts.w1"
    truth = consolidate(work / "plain" / "t")[name]

    _convert(work / "plain" / "t", work / "uc_plain")
    got = _universal(work / "uc_plain", name)
    print(f"1. ds_to_universal as is: {name} {tuple(got.shape)} (whole: {tuple(truth.shape)}); "
          f"equal to the experts in order: {torch.equal(got.flatten(), truth.flatten())}")

    try:
        _convert(work / "autoep_meta" / "t", work / "uc_autoep_meta")
        print("2. with AutoEP's metadata: converted (DeepSpeed accepts other layouts now)")
    except RuntimeError as e:
        print(f"2. with AutoEP's metadata: RuntimeError: {e}")

    to_universal(work / "plain" / "t", work / "uc_tagmoe")
    got = torch.load(work / "uc_tagmoe" / "zero" / name / "fp32.pt", weights_only=False)
    print(f"3. tagmoe_dist to_universal: {name} {tuple(got['param'].shape)}, equal: "
          f"{torch.equal(got['param'], truth)}, is_expert_param={got['is_expert_param']}")
    print(f"files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
