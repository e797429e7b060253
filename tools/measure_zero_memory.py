#!/usr/bin/env python
"""Per-rank parameter and optimizer bytes of the main job's model (configs/models/tiny_tag.yaml,
fp32, AdamW) under ZeRO-2 and ZeRO-3 with expert parallelism, read from the engines' own
partitions, on W gloo processes at EP=2.

  parameters  what a rank holds between steps: ZeRO-2 the whole dense tensors and its EP share
              of the experts; ZeRO-3 its partition (`param.ds_tensor`) of each
  fp32 master the optimizer's flat fp32 partitions (ZeRO-2 `single_partition_of_fp32_groups`,
              ZeRO-3 `fp32_partitioned_groups_flat`)
  Adam        exp_avg + exp_avg_sq of those partitions

    python tools/measure_zero_memory.py --world 2       # EP=2, expert-data-parallel 1
    python tools/measure_zero_memory.py --world 4       # EP=2, expert-data-parallel 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _zero2(engine, model):
    from tagmoe_dist.integrations.zero3 import EXPERT_FAMILY  # noqa: F401 (same split as zero3)
    opt = engine.optimizer
    out = {k: {"param": 0, "master": 0, "optim": 0} for k in ("expert", "dense")}
    for p in model.parameters():
        out["expert" if not getattr(p, "allreduce", True) else "dense"]["param"] += _bytes([p])
    for i, flat in enumerate(opt.single_partition_of_fp32_groups):
        k = "expert" if opt.is_moe_param_group[i] else "dense"
        out[k]["master"] += _bytes([flat])
        state = opt.optimizer.state.get(flat, {})
        out[k]["optim"] += _bytes([t for t in state.values() if hasattr(t, "dim") and t.dim() > 0])
    return out


def _worker(rank, world, out_dir):
    import deepspeed
    import torch
    from tagmoe_dist.integrations import deepspeed as tds, zero3
    from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = GPTConfig.from_yaml(ROOT / "configs/models/tiny_tag.yaml")
    schema = cfg.load_task_schema()
    rows = {}
    for stage in (2, 3):
        ds = json.loads((ROOT / f"configs/deepspeed/zero{stage}.json").read_text())
        ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
        groups = tds.parallel_groups(2)
        torch.manual_seed(0)
        with tds.build_context(ds):
            model = GPT(cfg, groups=groups, task_schema=schema)
        tds.prepare_model(model, ds)
        params = tds.optimizer_param_groups(model, 0.1)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                          optimizer=torch.optim.AdamW(params, lr=1e-3))
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        task = torch.zeros(2, len(schema.levels), dtype=torch.long)
        loss = lm_loss(engine(ids, task=task), ids)       # one step: Adam state exists
        engine.backward(loss)
        engine.step()
        rows[stage] = _zero2(engine, model) if stage == 2 else zero3.partition_bytes(engine)
        rows["numel"] = zero3.full_numel(model) if stage == 3 else None
        engine.destroy()
    rows["edp"], rows["dp"] = groups.edp_size, groups.dp_size
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, choices=(2, 4))
    args = ap.parse_args()
    from tests.dist_utils import run_distributed
    with tempfile.TemporaryDirectory() as out:
        run_distributed(_worker, args.world, out)
        r = json.loads((Path(out) / "rank0.json").read_text())
    kib = lambda b: f"{b / 1024:,.0f}"   # noqa: E731
    print(f"\nrank 0 of {args.world}, EP=2, expert-data-parallel {r['edp']}, data-parallel "
          f"{r['dp']}; whole tensors on this rank: dense {r['numel']['dense']:,} values, "
          f"experts (its EP share) {r['numel']['expert']:,} values\n")
    print("| ZeRO | kind | parameters KiB | fp32 master KiB | Adam KiB | total KiB |")
    print("|---|---|---:|---:|---:|---:|")
    for stage in ("2", "3"):
        tot = 0
        for kind in ("dense", "expert"):
            v = r[stage][kind]
            s = v["param"] + v["master"] + v["optim"]
            tot += s
            print(f"| {stage} | {kind} | {kib(v['param'])} | {kib(v['master'])} | "
                  f"{kib(v['optim'])} | {kib(s)} |")
        print(f"| {stage} | **all** | | | | **{kib(tot)}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
