"""Benchmark: the same tiny Hugging Face Mixtral trained for the same steps with tagmoe_dist
(router topk and task_aware) and with DeepSpeed AutoEP; 2 processes, EP=2, ZeRO-2, CPU/gloo.

    python tools/bench_hf.py [--steps 20] [--hidden 256] [--out bench_hf.json]

Prints a table: tokens/s (steps after the first, all ranks), peak resident memory (max over
ranks), and the step-0 loss of each (the source model's loss on the first batch: all three must
agree, since no step has been taken). Each variant runs in its own `torchrun` job, so peak memory
is that variant's alone. A table, not a timed test: numbers depend on the machine and its load.

DeepSpeed 0.19.8's AutoEP calls transformers' `_CanRecordRegistry.get` with a default argument
that transformers 5.x's override does not take; this script patches that method at runtime (in
its AutoEP worker only), leaving the installed packages untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("tagmoe-topk", "tagmoe-task_aware", "autoep")
SCHEMA = ROOT / "configs/tasks/text_tasks.yaml"


def ds_config(batch: int, autoep: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
           "train_batch_size": 2 * batch, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
           "steps_per_print": 10 ** 9,
           # the same optimizer for every variant, built by DeepSpeed (AutoEP replaces modules
           # inside initialize, so the parameter groups must be made there)
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    if autoep:
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}
    return cfg


def make_model(out: Path, hidden: int, layers: int, experts: int) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(str(out))
    return out


def batches(steps: int, batch: int, seq: int, rank: int, num_tags: int):
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        ids_BS = torch.randint(0, 1000, (batch, seq), generator=g)
        task_BN = torch.zeros(batch, num_tags)
        task_BN[torch.arange(batch), torch.randint(0, num_tags, (batch,), generator=g)] = 1.0
        yield ids_BS, task_BN


def _patch_autoep_registry_get() -> None:
    from transformers.utils import output_capturing
    cls = type(output_capturing._CAN_RECORD_REGISTRY)
    if getattr(cls, "_tagmoe_patched", False):
        return

    def get(self, key, default=None):
        if isinstance(key, str):          # AutoEP looks entries up by their class-name key
            return dict.get(self, key, default)
        return dict.get(self, str(key.__class__)) or {}

    cls.get, cls._tagmoe_patched = get, True


def worker(args) -> None:
    import deepspeed
    import torch.distributed as dist

    import tagmoe_dist as tm
    from tagmoe_dist.integrations import deepspeed as tds
    torch.set_num_threads(1)
    tds.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    schema = tm.TaskSchema.from_yaml(SCHEMA)
    autoep = args.variant == "autoep"
    torch.manual_seed(0)
    if autoep:
        _patch_autoep_registry_get()
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        router = args.variant.split("-", 1)[1]
        groups = tds.parallel_groups(2)
        model = tm.hf.from_pretrained(args.model, moe=dict(router=router, overlap_chunks=2),
                                      task_schema=schema, groups=groups)
        tds.prepare_model(model)
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(args.batch, autoep))
    losses, t0 = [], None
    for step, (ids_BS, task_BN) in enumerate(batches(args.steps, args.batch, args.seq, rank,
                                                     schema.num_tags)):
        if step == 1:
            dist.barrier()
            t0 = time.perf_counter()
        if autoep:
            out = engine(input_ids=ids_BS, labels=ids_BS)
        else:
            with tm.hf.tasks(model, task_BN):
                out = engine(input_ids=ids_BS, labels=ids_BS)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    dist.barrier()
    seconds = time.perf_counter() - t0
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    loss0 = torch.tensor([losses[0]])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    dist.all_reduce(loss0)
    if rank == 0:
        tokens = (args.steps - 1) * args.batch * args.seq * world
        Path(args.result).write_text(json.dumps({
            "variant": args.variant, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "peak_rss_mib": float(rss), "step0_loss": float(loss0) / world,
            "last_loss": losses[-1]}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="samples per rank per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (the variants' order rotates each round); the table shows the "
                         "median tokens/s and every round's value")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is not timed)")
    if args.worker:
        worker(args)
        return 0
    runs = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "mixtral", args.hidden, args.layers, args.experts)
        order = list(args.variants)
        for _, variant in ((r, v) for r in range(args.repeat)
                           for v in order[r % len(order):] + order[:r % len(order)]):
            result = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(Path(__file__).resolve()), "--worker",
                   "--variant", variant, "--model", str(model), "--result", str(result),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{variant} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[variant].append(json.loads(result.read_text()))
    rows = []
    for variant, rs in runs.items():
        tps = sorted(r["tokens_per_s"] for r in rs)
        rows.append({**rs[0], "tokens_per_s": tps[len(tps) // 2],
                     "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)})
    print(f"Mixtral D={args.hidden} F={2 * args.hidden} E={args.experts} top-2 "
          f"L={args.layers}; 2 processes, EP=2, ZeRO-2, fp32, {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens per rank (first step not timed); median of "
          f"{args.repeat} round(s)\n")
    ref = rows[0]["step0_loss"]
    print(f"| {'variant':<18} | {'tokens/s':>9} | {'peak RSS MiB':>12} | {'step-0 loss':>11} | "
          f"{'rel. diff':>9} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 14}|{'-' * 13}|{'-' * 11}|")
    for r in rows:
        r["step0_rel_diff"] = abs(r["step0_loss"] - ref) / abs(ref)
        print(f"| {r['variant']:<18} | {r['tokens_per_s']:>9.0f} | {r['peak_rss_mib']:>12.0f} | "
              f"{r['step0_loss']:>11.7f} | {r['step0_rel_diff']:>9.1e} |"
              + (f"  rounds: {', '.join(f'{t:.0f}' for t in r['tokens_per_s_runs'])}"
                 if args.repeat > 1 else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
