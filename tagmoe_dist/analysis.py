"""Routing statistics: which experts each task uses, how balanced the load is, and plots.

Notation: T tokens, K top-k, B samples, E experts, counts_TaskE a [num_tasks, E] count matrix
(row = task, column = expert, entry = routing choices). All functions are pure and work on CPU
tensors; `RoutingStats` accumulates them over evaluation batches.

Where the top-k ids come from: `RoutingStats.attach(model)` hooks each MoE layer's router, whose
output (`RouterOutput`) carries `topk_ids_TK` and whose input carries the token -> sample map, so
no change to the layer is needed; `update(...)` also accepts the tensors directly.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist


# ---------------------------------------------------------------------- pure functions
def _joint(counts_TaskE: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(counts_TaskE, dtype=torch.float64)
    if c.dim() != 2:
        raise ValueError(f"counts must be a 2-D [num_tasks, num_experts] matrix, got shape {tuple(c.shape)}")
    if bool((c < 0).any()):
        raise ValueError("counts must be non-negative")
    total = c.sum()
    return c / total if total > 0 else c


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) along the last dim of distributions; 0 log 0 = 0."""
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)


def task_expert_mutual_information(counts_TaskE: torch.Tensor) -> float:
    """I(task; expert) in nats from the joint distribution of routing choices.

    0 when the expert choice does not depend on the task; log(min(num_tasks, E)) at most, reached
    by a one-to-one task -> expert map with uniform task frequencies. (Mod-Squad's L_MI is -I.)
    """
    p_TaskE = _joint(counts_TaskE)
    if float(p_TaskE.sum()) == 0.0:
        return 0.0
    return float(_entropy(p_TaskE.sum(0)) + _entropy(p_TaskE.sum(1)) - _entropy(p_TaskE.flatten()))


def routing_entropy(counts_E: torch.Tensor) -> float:
    """Entropy (nats) of the expert distribution of routing choices: log(E) = uniform load,
    0 = every choice went to one expert. (Per-token entropy of the router's probabilities is
    `tagmoe_dist.gating.losses.routing_entropy`.)"""
    c = torch.as_tensor(counts_E, dtype=torch.float64).flatten()
    total = c.sum()
    return 0.0 if float(total) == 0.0 else float(_entropy(c / total))


def conditional_routing_entropy(counts_TaskE: torch.Tensor) -> float:
    """H(expert | task) in nats: how spread out each task's routing is, averaged over tasks by
    their share of choices. routing_entropy(column sums) - this = the mutual information."""
    p_TaskE = _joint(counts_TaskE)
    p_Task = p_TaskE.sum(1)
    rows = p_TaskE / p_Task.clamp(min=1e-300)[:, None]
    return float((p_Task * _entropy(rows)).sum())


def load_imbalance(load_E: torch.Tensor) -> float:
    """max / mean tokens per expert: 1 = perfectly balanced, E = everything on one expert;
    NaN when there is no load at all."""
    c = torch.as_tensor(load_E, dtype=torch.float64).flatten()
    mean = c.mean()
    return float("nan") if float(mean) == 0.0 else float(c.max() / mean)


def heatmap_figure(counts_TaskE: torch.Tensor, task_names: Sequence[str], title: str = "",
                   normalize: bool = True):
    """A matplotlib Figure of the task x expert matrix (rows normalised to P(expert | task) by
    default), for `SummaryWriter.add_figure` or `heatmap_png`. Built on the Agg canvas, outside
    pyplot, so no global figure list grows during a long run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = torch.as_tensor(counts_TaskE, dtype=torch.float64)
    if c.dim() != 2 or c.shape[0] != len(task_names):
        raise ValueError(f"heatmap: counts of shape {tuple(c.shape)} do not match "
                         f"{len(task_names)} task_names; pass one name per row")
    if normalize:
        c = c / c.sum(1, keepdim=True).clamp(min=1e-300)
    num_tasks, E = c.shape
    fig = Figure(figsize=(1.2 + 0.45 * E, 1.0 + 0.4 * num_tasks), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c.numpy(), cmap="viridis", aspect="auto", vmin=0.0,
                   vmax=1.0 if normalize else None)
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(num_tasks), list(task_names))
    ax.set_xlabel("expert")
    ax.set_title(title or ("P(expert | task)" if normalize else "routing choices"), fontsize=9)
    fig.colorbar(im, ax=ax)
    with warnings.catch_warnings():
        # a figure of few experts is too narrow for every margin; the plot is drawn all the same
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
        fig.tight_layout()
    return fig


def heatmap_png(counts_TaskE: torch.Tensor, task_names: Sequence[str], path, title: str = "",
                normalize: bool = True) -> Path:
    """Write the heat map of `heatmap_figure` to a PNG file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(counts_TaskE, task_names, title, normalize).savefig(path, format="png")
    return path


# ---------------------------------------------------------------------- accumulator
class RoutingStats:
    """Per MoE layer: a [num_tasks, E] count matrix of routing choices by task, and the expert
    load of each update (load over time).

    Use either directly, `update(layer, topk_ids_TK, task_index_T)`, or through router hooks:

        stats = RoutingStats(len(model.moe_layers()), E, task_names)
        handles = stats.attach(model.moe_layers())
        logits = model(batch["input_ids"], task=...)
        stats.commit(batch["task_index"], batch["attention_mask"])   # tokens -> tasks, padding out
        ...; stats.all_reduce(groups.dp_group); stats.summary(); stats.detach()
    """

    def __init__(self, num_layers: int, num_experts: int, task_names: Sequence[str]):
        if num_layers < 1 or num_experts < 1 or len(task_names) < 1:
            raise ValueError("RoutingStats needs num_layers >= 1, num_experts >= 1 and at least one "
                             "task name")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.task_names = list(task_names)
        self.counts = torch.zeros(num_layers, len(self.task_names), num_experts, dtype=torch.long)
        self.load_history: List[List[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._pending: Dict[int, tuple] = {}
        self._handles: list = []

    def reset(self) -> None:
        self.counts.zero_()
        self.load_history = [[] for _ in range(self.num_layers)]
        self._pending.clear()

    def update(self, layer: int, topk_ids_TK: torch.Tensor, task_index_T: torch.Tensor) -> None:
        """Add one batch of routing choices of `layer`; tokens with task index < 0 are skipped."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"RoutingStats.update: layer={layer} is outside 0..{self.num_layers - 1}")
        ids_TK = topk_ids_TK.detach().cpu().long()
        task_T = task_index_T.detach().cpu().long()
        if ids_TK.shape[0] != task_T.shape[0]:
            raise ValueError(f"RoutingStats.update: {ids_TK.shape[0]} tokens of top-k ids but "
                             f"{task_T.shape[0]} task indices; pass one task index per token")
        num_tasks, E = len(self.task_names), self.num_experts
        if bool((task_T >= num_tasks).any()):
            raise ValueError(f"RoutingStats.update: task index >= num_tasks={num_tasks}")
        keep_T = task_T >= 0
        ids_TK, task_T = ids_TK[keep_T], task_T[keep_T]
        K = ids_TK.shape[1]
        flat = task_T.repeat_interleave(K) * E + ids_TK.reshape(-1)
        self.counts[layer] += torch.bincount(flat, minlength=num_tasks * E).view(num_tasks, E)
        self.load_history[layer].append(torch.bincount(ids_TK.reshape(-1), minlength=E))

    # ------------------------------------------------------------------ router hooks
    def attach(self, moe_layers: Sequence[torch.nn.Module]) -> list:
        """Hook the routers of these MoE layers (in order = layer index); returns the handles."""
        if len(moe_layers) != self.num_layers:
            raise ValueError(f"RoutingStats.attach: got {len(moe_layers)} MoE layers, the stats "
                             f"were built for num_layers={self.num_layers}")
        for i, layer in enumerate(moe_layers):
            def hook(module, args, out, i=i):
                sample_idx_T = args[1] if len(args) > 1 else None
                self._pending[i] = (out.topk_ids_TK.detach(), sample_idx_T)
            self._handles.append(layer.router.register_forward_hook(hook))
        return self._handles

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def commit(self, task_index_B: torch.Tensor, token_mask_BS: Optional[torch.Tensor] = None) -> None:
        """Turn the routing seen by the hooks since the last commit into counts: each token gets
        its sample's task index; tokens where `token_mask_BS` is 0 (padding) are left out.
        The mask assumes input_layout 'bsh' (token t = sample b, position s with t = b*S + s)."""
        task_B = task_index_B.detach().cpu().long()
        for i, (ids_TK, sample_idx_T) in sorted(self._pending.items()):
            if sample_idx_T is None:
                raise ValueError("RoutingStats.commit: the router saw no token -> sample map "
                                 "(input_layout 'th' without token_to_sample); use update() instead")
            task_T = task_B[sample_idx_T.cpu()]
            if token_mask_BS is not None:
                mask_T = token_mask_BS.detach().cpu().reshape(-1).bool()
                task_T = torch.where(mask_T, task_T, torch.full_like(task_T, -1))
            self.update(i, ids_TK, task_T)
        self._pending.clear()

    # ------------------------------------------------------------------ results
    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum the count matrices over `group` (e.g. the data-parallel group); load history stays
        per rank."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, group=group)

    def load_over_time(self, layer: int) -> torch.Tensor:
        """[updates, E] tokens per expert of each update of `layer`."""
        h = self.load_history[layer]
        return torch.stack(h) if h else torch.zeros(0, self.num_experts, dtype=torch.long)

    def summary(self) -> Dict[str, float]:
        """Scalars per layer (keys `layer<i>/<metric>`), ready for TensorBoard add_scalar."""
        out = {}
        for i in range(self.num_layers):
            c = self.counts[i]
            out[f"layer{i}/task_expert_mi"] = task_expert_mutual_information(c)
            out[f"layer{i}/routing_entropy"] = routing_entropy(c.sum(0))
            out[f"layer{i}/load_imbalance"] = load_imbalance(c.sum(0))
            bound = math.log(min(c.shape))
            out[f"layer{i}/task_expert_mi_norm"] = out[f"layer{i}/task_expert_mi"] / bound if bound > 0 else 0.0
        return out

    def figures(self, prefix: str = "routing") -> Dict[str, object]:
        """{tag: heat-map Figure} per layer, for SummaryWriter.add_figure."""
        return {f"{prefix}/layer{i}": heatmap_figure(self.counts[i], self.task_names,
                                                     f"MoE layer {i}: P(expert | task)")
                for i in range(self.num_layers)}
