"""Routing report of one trained model: task x expert heat maps per MoE layer (PNG), routing
entropy, task-expert mutual information, load balance, and expert load / MI over training when
the run recorded them.

Inputs (see `load_checkpoint`):
  - a plain state_dict `.pt` written by the router comparison (`compare.save_run`), with its
    `<stem>.yaml` model config and `<stem>.routing.pt` history beside it; or
  - a DeepSpeed checkpoint directory of `tagmoe_dist.train` (the one holding `latest`), read
    through `tagmoe_dist.checkpoint.consolidate`, with `model_config.yaml` beside it.
Notation: L MoE layers, K tasks, E experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from tagmoe_dist.analysis import (conditional_routing_entropy, heatmap_png, load_imbalance,
                                  routing_entropy, task_expert_mutual_information)
from tagmoe_lab.benchmark.compare import evaluate
from tagmoe_lab.benchmark.workloads import build_model, load_model_config, workload_for


def load_checkpoint(ckpt, config=None):
    """(config, model in eval mode, history or None) from a .pt state dict or a DeepSpeed
    checkpoint directory. `config` defaults to the YAML the training wrote beside the weights."""
    ckpt = Path(ckpt)
    history = None
    if ckpt.is_dir():
        from tagmoe_dist.checkpoint import consolidate
        state = consolidate(ckpt)
        config = config or ckpt / "model_config.yaml"
    elif ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        config = config or ckpt.with_suffix(".yaml")
        side = ckpt.with_suffix(".routing.pt")
        if side.is_file():
            history = torch.load(side, map_location="cpu", weights_only=True).get("history")
    else:
        raise FileNotFoundError(f"checkpoint {ckpt} not found: pass a .pt state dict or a "
                                "DeepSpeed checkpoint directory (the one holding 'latest')")
    if not Path(config).is_file():
        raise FileNotFoundError(f"model config {config} not found: pass --config <model YAML>")
    cfg = load_model_config(config)
    model = build_model(cfg, cfg.load_task_schema())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not fit {config}: missing keys {missing[:5]}, unexpected "
                         f"keys {unexpected[:5]}; pass the model YAML the run was trained with")
    model.eval()
    return cfg, model, history


def layer_metrics(counts_KE: torch.Tensor) -> Dict[str, float]:
    load_E = counts_KE.sum(0)
    mi = task_expert_mutual_information(counts_KE)
    bound = math.log(min(counts_KE.shape))
    return {"task_expert_mi": mi, "task_expert_mi_norm": mi / bound if bound > 0 else 0.0,
            "load_entropy": routing_entropy(load_E), "load_entropy_max": math.log(counts_KE.shape[1]),
            "expert_entropy_given_task": conditional_routing_entropy(counts_KE),
            "load_imbalance": load_imbalance(load_E)}


def _line_png(path: Path, steps: List[int], series: Dict[str, List[float]], title: str,
              ylabel: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in series.items():
        ax.plot(steps, ys, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def history_plots(history: List[dict], out: Path, prefix: str = "") -> List[Path]:
    """Expert load share per layer over training, and MI over training (one plot for all layers)."""
    steps = [h["step"] for h in history]
    L = history[0]["routing_LKE"].shape[0]
    paths = []
    for i in range(L):
        load_TE = torch.stack([h["routing_LKE"][i].sum(0).double() for h in history])
        share_TE = load_TE / load_TE.sum(1, keepdim=True).clamp(min=1)
        paths.append(_line_png(out / f"{prefix}load_over_time_layer{i}.png", steps,
                               {f"expert {e}": share_TE[:, e].tolist() for e in range(share_TE.shape[1])},
                               f"MoE layer {i}: share of routing choices per expert",
                               "share of choices"))
    mi = {f"layer {i}": [task_expert_mutual_information(h["routing_LKE"][i]) for h in history]
          for i in range(L)}
    paths.append(_line_png(out / f"{prefix}mi_over_time.png", steps, mi,
                           "I(task; expert) of training routing per log interval", "nats"))
    return paths


def routing_report(ckpt, out, config=None, eval_per_task: int = 64, batch_size: int = 64,
                   prefix: str = "", samples: int = 0) -> dict:
    """Evaluate the checkpoint on its built-in workload's eval sets; write PNGs and
    `<prefix>routing.json` under `out`; return the summary dict. samples > 0 (DiT only): also
    `<prefix>samples.png` with that many generated / edited eval samples per task."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, model, history = load_checkpoint(ckpt, config)
    workload = workload_for(cfg)
    ev = evaluate(model, workload, workload.eval_batches(eval_per_task, batch_size))
    summary = {"checkpoint": str(ckpt), "workload": workload.name, "task_loss": ev.task_loss,
               "layers": [], "pngs": []}
    if ev.routing_LKE is None:
        summary["note"] = "dense model: no MoE layer, no routing to report"
    else:
        for i, counts_KE in enumerate(ev.routing_LKE):
            m = layer_metrics(counts_KE)
            m["router_entropy_per_token"] = ev.router_entropy_L[i]
            m["expert_load"] = counts_KE.sum(0).tolist()
            summary["layers"].append(m)
            png = heatmap_png(counts_KE, workload.task_names, out / f"{prefix}heatmap_layer{i}.png",
                              f"MoE layer {i}: P(expert | task), MI {m['task_expert_mi']:.3f} nats")
            summary["pngs"].append(str(png))
        summary["mean_task_expert_mi"] = sum(m["task_expert_mi"] for m in summary["layers"]) / \
            len(summary["layers"])
        if history:
            summary["pngs"] += [str(p) for p in history_plots(history, out, prefix)]
        else:
            summary["note"] = ("no routing history beside the checkpoint: load over training is in "
                               "the run's TensorBoard logs (moe/expert_load)")
    if ev.align_acc is not None:
        summary["align_acc"] = ev.align_acc
    if samples > 0 and workload.name == "image":
        from tagmoe_lab.benchmark.plots import image_samples
        summary["pngs"].append(str(image_samples(model, out / f"{prefix}samples.png", samples)))
    (out / f"{prefix}routing.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_markdown(summary: dict) -> str:
    lines = [f"Routing report of `{summary['checkpoint']}` ({summary['workload']} workload)", "",
             "| task | " + " | ".join(summary["task_loss"]) + " |",
             "|---|" + "---|" * len(summary["task_loss"]),
             "| eval loss | " + " | ".join(f"{v:.4f}" for v in summary["task_loss"].values()) + " |"]
    if summary["layers"]:
        lines += ["", "| layer | MI (nats) | MI / log min(K,E) | H(expert) load | H(expert given task) "
                  "| router entropy / token | max/mean load |", "|---|---|---|---|---|---|---|"]
        for i, m in enumerate(summary["layers"]):
            lines.append(f"| {i} | {m['task_expert_mi']:.3f} | {m['task_expert_mi_norm']:.3f} | "
                         f"{m['load_entropy']:.3f} / {m['load_entropy_max']:.3f} | "
                         f"{m['expert_entropy_given_task']:.3f} | {m['router_entropy_per_token']:.3f} | "
                         f"{m['load_imbalance']:.2f} |")
    if "note" in summary:
        lines += ["", f"Note: {summary['note']}"]
    lines += ["", "Files: " + ", ".join(summary["pngs"])]
    return "\n".join(lines)
