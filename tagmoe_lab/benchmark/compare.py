"""Dense vs top-k MoE vs TAG-MoE on one multi-task workload, with the same active parameters,
steps, data and learning-rate schedule; per-task evaluation loss and routing statistics.

Notation: L MoE layers, K tasks, E experts, B batch.

Fairness, by construction:
  1. one `Budget` per comparison (steps, batch, lr schedule, optimizer) for every variant;
  2. the training batches of a seed (and, for images, their noise and t) are built once and fed
     to every variant in the same order; the evaluation batches are the same for every run;
  3. `compare` refuses variants whose active parameter counts differ (`num_params(active_only)`);
  4. each model is initialised after `torch.manual_seed(seed)`, then every weight it shares (by
     name and shape) with its top-k twin (`topk_twin`: the same config with a plain top-k
     router) is copied from the twin's initialisation: top-k and TAG start from identical
     weights (TAG only adds the alignment head), and dense shares their embeddings and
     attention. The models' constructors draw the alignment head first, so without this step
     the two would differ in every weight.
Single process (`ParallelGroups.single()`), plain torch AdamW, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from tagmoe_dist.analysis import (RoutingStats, heatmap_figure, routing_entropy,
                                  task_expert_mutual_information)
from tagmoe_lab.benchmark.workloads import VARIANTS, Workload


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget shared by every variant of a comparison."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_per_task: int = 64
    eval_batch_size: int = 64
    log_every: int = 25                # training routing counts (load over time) per interval

    def __post_init__(self):
        for f in ("steps", "batch_size", "eval_per_task", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"Budget.{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0:
            raise ValueError("Budget: need warmup_steps >= 0, lr > 0, min_lr >= 0")


def lr_at(step: int, b: Budget) -> float:
    """Linear warm-up, then cosine decay to min_lr (as tagmoe_dist.train)."""
    if step < b.warmup_steps:
        return b.lr * (step + 1) / b.warmup_steps
    t = min(1.0, (step - b.warmup_steps) / max(1, b.steps - b.warmup_steps))
    return b.min_lr + 0.5 * (b.lr - b.min_lr) * (1 + math.cos(math.pi * t))


@dataclasses.dataclass
class RunResult:
    workload: str
    variant: str
    seed: int
    task_loss: Dict[str, float]                 # final per-task evaluation loss
    routing_LKE: Optional[torch.Tensor]         # eval routing choices by task (None: dense)
    history: List[dict]                         # [{"step", "routing_LKE" (training, interval)}]
    align_acc: Optional[float]                  # nearest-target accuracy, mixed-task eval batches
    active_params: int
    total_params: int
    seconds: float
    train_loss: float                           # mean training loss of the last log interval

    @property
    def mean_loss(self) -> float:
        return sum(self.task_loss.values()) / len(self.task_loss)

    @property
    def worst(self) -> tuple:
        name = max(self.task_loss, key=self.task_loss.get)
        return name, self.task_loss[name]

    @property
    def mi_per_layer(self) -> List[float]:
        if self.routing_LKE is None:
            return []
        return [task_expert_mutual_information(c) for c in self.routing_LKE]

    @property
    def mi(self) -> float:
        v = self.mi_per_layer
        return sum(v) / len(v) if v else float("nan")


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclasses.dataclass
class EvalResult:
    task_loss: Dict[str, float]                 # mean per-sample loss of each task
    routing_LKE: Optional[torch.Tensor]         # routing choices [L, K, E] (None: no MoE layer)
    router_entropy_L: List[float]               # mean per-token entropy of the router's softmax
    align_acc: Optional[float]                  # TAG: the prediction's nearest target among all
                                                # tasks' tag sets is the sample's own (mixed batches)


@torch.no_grad()
def evaluate(model, workload: Workload, batches: Sequence[dict]) -> EvalResult:
    """Per-task loss and routing statistics of `model` on `batches` (eval mode, no gradients).
    Routing counts leave out padding tokens (`workload.token_mask`)."""
    was_training = model.training
    model.eval()
    K = len(workload.task_names)
    loss_sum_K, count_K = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    layers = model.moe_layers()
    stats = RoutingStats(len(layers), layers[0].cfg.num_experts, workload.task_names) if layers else None
    if stats is not None:
        stats.attach(layers)
    entropy_L = [0.0] * len(layers)
    acc_sum, acc_n = 0.0, 0
    try:
        for batch in batches:
            loss_B = workload.per_sample_loss(model, batch).double()
            task_B = batch["task_index"]
            loss_sum_K.index_add_(0, task_B, loss_B)
            count_K.index_add_(0, task_B, torch.ones_like(loss_B))
            if stats is not None:
                stats.commit(task_B, workload.token_mask(batch))
            for i, layer in enumerate(layers):
                entropy_L[i] += float(layer.last_stats["entropy"]) / len(batches)
            if getattr(model, "last_align", None):
                acc_sum, acc_n = acc_sum + float(model.last_align["acc"]), acc_n + 1
    finally:
        if stats is not None:
            stats.detach()
        model.train(was_training)
    per_task = {n: float(loss_sum_K[k] / count_K[k]) for k, n in enumerate(workload.task_names)
                if count_K[k] > 0}
    return EvalResult(per_task, stats.counts.clone() if stats else None, entropy_L,
                      acc_sum / acc_n if acc_n else None)


_TASK_ONLY = ("task_conditioning",)          # MoEConfig fields a top-k router refuses


def topk_twin(cfg):
    """The plain top-k MoE model of the same shape as `cfg` (the reference initialisation)."""
    moe = {k: v for k, v in cfg.moe.items() if k not in _TASK_ONLY}
    moe["router"] = "topk"
    return dataclasses.replace(cfg, arch="moe", moe_every=cfg.moe_every or 1, moe=moe)


def init_model(workload: Workload, variant: str, seed: int) -> tuple:
    """(config, model) initialised as point 4 of the module docstring says."""
    cfg = workload.config(variant)
    torch.manual_seed(seed)
    model = workload.build(cfg)
    twin = topk_twin(cfg)
    if twin != cfg:
        torch.manual_seed(seed)
        ref = workload.build(twin).state_dict()
        own = model.state_dict()
        shared = {k: v for k, v in ref.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
    if getattr(model, "alignment", None) is not None and workload.task_tags:
        model.alignment.set_candidates(workload.task_table(model.alignment.schema))
    return cfg, model


def train_run(workload: Workload, variant: str, seed: int, budget: Budget,
              train_batches: Sequence[dict], eval_batches: Sequence[dict],
              tb_dir: Optional[Path] = None, ckpt_dir: Optional[Path] = None) -> RunResult:
    """Train one variant on the given batches (one optimizer step per batch), then evaluate."""
    if len(train_batches) < budget.steps:
        raise ValueError(f"train_run: {len(train_batches)} batches for {budget.steps} steps")
    cfg, model = init_model(workload, variant, seed)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, budget.weight_decay), lr=budget.lr, betas=(0.9, 0.95))
    layers = model.moe_layers()
    L, K = len(layers), len(workload.task_names)
    E = layers[0].cfg.num_experts if layers else 0
    writer = _writer(tb_dir, workload.name, variant, seed)
    history, interval_LKE, losses, align, min_dist = [], torch.zeros(L, K, E, dtype=torch.long), [], [], []
    t0 = time.perf_counter()
    for step in range(budget.steps):
        batch = train_batches[step]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget)
        loss = workload.per_sample_loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        opt.step()
        for layer in layers:
            layer.update_expert_bias()
        losses.append(float(loss.detach()))
        if getattr(model, "last_align", None):
            align.append(float(model.last_align["loss"]))
            min_dist.append(float(model.last_align["target_min_dist"]))
        for i, layer in enumerate(layers):
            # per-sample routing counts [B, E] summed by task (text: padding tokens included)
            interval_LKE[i].index_add_(0, batch["task_index"], layer.last_stats["sample_load"].cpu())
        if (step + 1) % budget.log_every == 0 or step + 1 == budget.steps:
            n = step + 1 - (history[-1]["step"] if history else 0)       # steps in this interval
            entry = {"step": step + 1, "routing_LKE": interval_LKE.clone(),
                     "loss": sum(losses[-n:]) / n}
            if align:
                entry["align_loss"] = sum(align[-n:]) / len(align[-n:])
                entry["target_min_dist"] = min_dist[-1]
            history.append(entry)
            if writer is not None:
                figures = len(history) % 5 == 0          # heat maps every 5th interval (slow)
                _log_train(writer, entry, interval_LKE, workload.task_names, figures)
            interval_LKE.zero_()
    seconds = time.perf_counter() - t0
    ev = evaluate(model, workload, eval_batches)
    result = RunResult(workload.name, variant, seed, ev.task_loss, ev.routing_LKE, history, ev.align_acc,
                       model.num_params(active_only=True), model.num_params(), seconds,
                       history[-1]["loss"])
    if writer is not None:
        _log_eval(writer, budget.steps, result, workload.task_names)
        writer.close()
    if ckpt_dir is not None:
        save_run(model, cfg, result, Path(ckpt_dir), workload)
    return result


def compare(workload: Workload, seeds: Sequence[int], budget: Budget,
            variants: Sequence[str] = VARIANTS, tb_dir: Optional[Path] = None,
            ckpt_dir: Optional[Path] = None, log: Callable[[str], None] = print) -> List[RunResult]:
    """Every variant x seed; the data of a seed is built once and shared by its variants."""
    active = {}
    for v in variants:
        torch.manual_seed(0)
        active[v] = workload.build(workload.config(v)).num_params(active_only=True)
    if len(set(active.values())) != 1:
        raise ValueError(f"{workload.name}: the variants' active parameter counts differ {active}; "
                         "the comparison needs equal active parameters (dense FFN width = top_k * "
                         "ffn_hidden_size)")
    eval_batches = workload.eval_batches(budget.eval_per_task, budget.eval_batch_size)
    results = []
    for seed in seeds:
        train_batches = workload.train_batches(seed, budget.steps, budget.batch_size)
        for v in variants:
            r = train_run(workload, v, seed, budget, train_batches, eval_batches, tb_dir, ckpt_dir)
            log(f"[{workload.name}] seed {seed} {v:5s}: mean eval {r.mean_loss:.4f}  worst "
                f"{r.worst[0]} {r.worst[1]:.4f}  MI {r.mi:.3f}  ({r.seconds:.0f}s, "
                f"{r.active_params:,} active / {r.total_params:,} params)")
            results.append(r)
    return results


# ---------------------------------------------------------------------- persistence
def run_stem(workload: str, variant: str, seed: int) -> str:
    return f"{workload}_{variant}_s{seed}"


def save_run(model, cfg, result: RunResult, ckpt_dir: Path, workload: Workload) -> Path:
    """`<stem>.pt` (a plain state_dict), `<stem>.yaml` (the model config) and `<stem>.routing.pt`
    (load over training and eval routing counts, for tools/routing_report.py)."""
    import yaml
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = ckpt_dir / run_stem(result.workload, result.variant, result.seed)
    torch.save(model.state_dict(), stem.with_suffix(".pt"))
    with open(stem.with_suffix(".yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    torch.save({"task_names": list(workload.task_names), "history": result.history,
                "eval_routing_LKE": result.routing_LKE, "task_loss": result.task_loss},
               Path(f"{stem}.routing.pt"))
    return stem.with_suffix(".pt")


# ---------------------------------------------------------------------- TensorBoard
def _writer(tb_dir, workload, variant, seed):
    if tb_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(Path(tb_dir) / run_stem(workload, variant, seed)))


def _log_train(writer, entry, counts_LKE, task_names, figures: bool):
    """Scalars of one log interval, and its task x expert heat maps (training routing)."""
    step = entry["step"]
    writer.add_scalar("loss/train", entry["loss"], step)
    for i in range(counts_LKE.shape[0]):
        load_E = counts_LKE[i].sum(0)
        writer.add_scalar(f"moe/task_expert_mi/layer{i}", task_expert_mutual_information(counts_LKE[i]), step)
        writer.add_scalar(f"moe/load_entropy/layer{i}", routing_entropy(load_E), step)
        writer.add_scalars(f"moe/expert_load/layer{i}",
                           {f"e{e}": float(x) for e, x in enumerate(load_E)}, step)
        if figures:
            writer.add_figure(f"routing_train/layer{i}", heatmap_figure(
                counts_LKE[i], task_names, f"MoE layer {i}: P(expert | task), steps to {step}"), step)
    if "align_loss" in entry:
        writer.add_scalar("moe/align_loss", entry["align_loss"], step)
    if "target_min_dist" in entry:        # collapse monitor: near 0 = two task targets coincide
        writer.add_scalar("moe/align_target_min_dist", entry["target_min_dist"], step)


def _log_eval(writer, step, r: RunResult, task_names):
    for name, v in r.task_loss.items():
        writer.add_scalar(f"eval/{name}", v, step)
    writer.add_scalar("eval/mean", r.mean_loss, step)
    writer.add_scalar("eval/worst_task", r.worst[1], step)
    if r.routing_LKE is not None:
        stats = RoutingStats(r.routing_LKE.shape[0], r.routing_LKE.shape[2], task_names)
        stats.counts += r.routing_LKE
        for k, v in stats.summary().items():
            writer.add_scalar(f"eval_routing/{k}", v, step)
        for tag, fig in stats.figures("routing").items():
            writer.add_figure(tag, fig, step)
