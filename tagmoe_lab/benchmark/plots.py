"""PNG plots of a router comparison: per-task loss bars, task x expert heat maps side by side,
and task-expert mutual information over training. Agg canvas, no pyplot state."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import List, Sequence

import torch

from tagmoe_dist.analysis import task_expert_mutual_information
from tagmoe_lab.benchmark.compare import RunResult
from tagmoe_lab.benchmark.summary import by_variant


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def task_loss_bars(results: Sequence[RunResult], task_names: Sequence[str], path: Path) -> Path:
    groups = by_variant(results)
    fig = _figure(1.6 + 1.3 * len(task_names), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    for j, (v, rs) in enumerate(groups.items()):
        means = [statistics.fmean(r.task_loss[t] for r in rs) for t in task_names]
        stds = [statistics.stdev([r.task_loss[t] for r in rs]) if len(rs) > 1 else 0.0
                for t in task_names]
        xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(task_names))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=v)
    ax.set_xticks(range(len(task_names)), list(task_names))
    ax.set_ylabel("eval loss (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def heatmap_grid(results: Sequence[RunResult], task_names: Sequence[str], path: Path,
                 seed: int) -> Path:
    """Rows: MoE variants; columns: layers; cells: P(expert | task) of evaluation routing."""
    rows = [r for r in results if r.seed == seed and r.routing_LKE is not None]
    L = rows[0].routing_LKE.shape[0]
    E = rows[0].routing_LKE.shape[2]
    fig = _figure(1.5 + (0.35 * E + 0.6) * L, 0.6 + (0.3 * len(task_names) + 0.5) * len(rows))
    for a, r in enumerate(rows):
        for i in range(L):
            c = r.routing_LKE[i].double()
            c = c / c.sum(1, keepdim=True).clamp(min=1e-300)
            ax = fig.add_subplot(len(rows), L, a * L + i + 1)
            ax.imshow(c.numpy(), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6)
            ax.set_yticks(range(len(task_names)), list(task_names) if i == 0 else [], fontsize=7)
            ax.set_title(f"{r.variant} layer {i}: MI {task_expert_mutual_information(r.routing_LKE[i]):.2f}",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def mi_over_time(results: Sequence[RunResult], path: Path) -> Path:
    fig = _figure(5.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for v, rs in by_variant(results).items():
        if rs[0].routing_LKE is None:
            continue
        steps = [h["step"] for h in rs[0].history]
        per_seed = torch.tensor([[statistics.fmean(task_expert_mutual_information(c)
                                                   for c in h["routing_LKE"]) for h in r.history]
                                 for r in rs])
        m, s = per_seed.mean(0), per_seed.std(0) if len(rs) > 1 else torch.zeros(len(steps))
        ax.plot(steps, m.tolist(), label=v)
        ax.fill_between(steps, (m - s).tolist(), (m + s).tolist(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("I(task; expert), nats")
    ax.set_title("training routing, mean over MoE layers (± std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def align_over_time(results: Sequence[RunResult], path: Path) -> Path:
    """The alignment loss (unscaled) of every variant that has one, over training."""
    fig = _figure(5.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for v, rs in by_variant(results).items():
        if not rs[0].history or "align_loss" not in rs[0].history[0]:
            continue
        steps = [h["step"] for h in rs[0].history]
        per_seed = torch.tensor([[h["align_loss"] for h in r.history] for r in rs])
        ax.plot(steps, per_seed.mean(0).tolist(), label=v)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training step")
    ax.set_ylabel("L_align (mean over seeds)")
    ax.set_title("alignment loss per log interval", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def comparison_plots(results: Sequence[RunResult], task_names: Sequence[str], out: Path,
                     prefix: str) -> List[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [task_loss_bars(results, task_names, out / f"{prefix}_task_loss.png")]
    if any(r.routing_LKE is not None for r in results):
        seed = min(r.seed for r in results)
        paths.append(heatmap_grid(results, task_names, out / f"{prefix}_heatmaps_seed{seed}.png", seed))
        paths.append(mi_over_time(results, out / f"{prefix}_mi_over_time.png"))
    if any(r.history and "align_loss" in r.history[0] for r in results):
        paths.append(align_over_time(results, out / f"{prefix}_align_loss.png"))
    return paths


@torch.no_grad()
def image_samples(model, path: Path, per_task: int = 2, steps: int = 20, seed: int = 0) -> Path:
    """Rows: eval samples of each image task; columns: source, target, the model's sample
    (Euler, `steps` steps from fixed noise). For a DiT trained on tagmoe_dist.data.images."""
    from tagmoe_dist.data.images import INSTRUCTION_TOKENS, ImageTaskCollator, image_eval_splits
    from tagmoe_dist.models.dit import sample
    splits = image_eval_splits(per_task, image_size=model.cfg.image_size)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, ds in splits.items():
        b = ImageTaskCollator(ds.schema)([ds[i] for i in range(len(ds))])
        x = sample(model, b["source"], b["instruction"], steps=steps, generator=gen)
        for j in range(len(ds)):
            words = " ".join(INSTRUCTION_TOKENS[t] for t in b["instruction"][j] if t != 0)
            rows.append((words, b["source"][j], b["target"][j], x[j]))
    fig = _figure(3.6, 1.05 * len(rows) + 0.3)
    for r, (words, *imgs) in enumerate(rows):
        for c, (img, title) in enumerate(zip(imgs, ("source", "target", "sample"))):
            ax = fig.add_subplot(len(rows), 3, 3 * r + c + 1)
            ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(words, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
