"""Does the TAG alignment target collapse? Train a small task-aware GPT on the built-in text
workload and watch the collapse monitor (min pairwise 1 - cos of the five tasks' targets), the
alignment loss, and the nearest-target accuracy on mixed-task evaluation batches.

    python -m tagmoe_lab.benchmark.collapse --targets learned,detached,orthogonal --seeds 0,1,2

The paper-literal target (`learned`) collapses: every task's target turns parallel, L_align -> 0,
and the accuracy stays at chance. A collapse-safe target keeps them apart (docs/results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Dict, List, Sequence

import torch

from tagmoe_lab.benchmark.compare import Budget, evaluate, lr_at, param_groups
from tagmoe_lab.benchmark.workloads import text_workload
from tagmoe_dist.models.gpt import GPT, GPTConfig

SMALL = dict(vocab_size=260, seq_len=24, n_layer=2, n_head=2, d_model=32,
             moe=dict(ffn_hidden_size=32, num_experts=4, top_k=2, router="task_aware",
                      aux_loss_coeff=0.01, align_loss_coeff=0.05, align_dim=32, align_hidden=32))


@dataclasses.dataclass
class ProbeResult:
    align_target: str
    seed: int
    min_dist: List[float]          # collapse monitor at every step (training batches)
    align_loss: List[float]        # unscaled L_align at every step
    eval_acc: float                # nearest-target accuracy over all tasks' targets, mixed batches
    seconds: float


def probe(align_target: str, seed: int = 0, steps: int = 300, batch_size: int = 32,
          model: dict = SMALL, lr: float = 3e-3, eval_per_task: int = 32) -> ProbeResult:
    """Train the small GPT with the given `align_target` (everything else as `model`)."""
    wl = text_workload()
    d = dict(model)
    d["moe"] = {**model["moe"], "align_target": align_target}
    cfg = GPTConfig(**d)
    torch.manual_seed(seed)
    net = GPT(cfg, task_schema=wl.schema)
    net.alignment.set_candidates(list(wl.task_tags))
    budget = Budget(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10,
                    warmup_steps=min(30, steps // 10), eval_per_task=eval_per_task)
    opt = torch.optim.AdamW(param_groups(net, budget.weight_decay), lr=lr, betas=(0.9, 0.95))
    dists, aligns = [], []
    t0 = time.perf_counter()
    for step, batch in enumerate(wl.train_batches(seed, steps, batch_size)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget)
        loss = wl.per_sample_loss(net, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), budget.grad_clip)
        opt.step()
        dists.append(float(net.last_align["target_min_dist"]))
        aligns.append(float(net.last_align["loss"]))
    seconds = time.perf_counter() - t0
    ev = evaluate(net, wl, wl.eval_batches(eval_per_task, 64))
    return ProbeResult(align_target, seed, dists, aligns, ev.align_acc, seconds)


def summarise(results: Sequence[ProbeResult]) -> str:
    lines = ["| align_target | seeds | min 1-cos of task targets (last step) | L_align first 10 → last 10 "
             "steps | eval nearest-target acc (chance 0.2) | s/run |", "|---|---|---|---|---|---|"]
    by: Dict[str, List[ProbeResult]] = {}
    for r in results:
        by.setdefault(r.align_target, []).append(r)

    def ms(xs):
        return f"{statistics.fmean(xs):.3g} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2g}"
    for t, rs in by.items():
        first = [statistics.fmean(r.align_loss[:10]) for r in rs]
        last = [statistics.fmean(r.align_loss[-10:]) for r in rs]
        lines.append(f"| {t} | {len(rs)} | {ms([r.min_dist[-1] for r in rs])} | {ms(first)} → "
                     f"{ms(last)} | {ms([r.eval_acc for r in rs])} | "
                     f"{statistics.fmean(r.seconds for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="learned,detached,orthogonal")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for t in args.targets.split(","):
        for s in args.seeds.split(","):
            r = probe(t, int(s), args.steps)
            print(f"{t} seed {s}: min dist {r.min_dist[-1]:.4f}  L_align {r.align_loss[-1]:.4f}  "
                  f"eval acc {r.eval_acc:.3f}  ({r.seconds:.0f}s)", flush=True)
            results.append(r)
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
