"""Token-choice top-k routing: logits -> scores -> (expert ids, weights) + auxiliary losses.

Notation: T tokens, D hidden, E experts, K top-k, B samples.

Selection is a *stable* descending sort, so exact ties go to the lower expert index. That rule is
part of the contract: upcycled models with replicated router rows rely on it to pick whole groups.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.capacity import capacity_keep_mask, expert_capacity
from tagmoe_dist.kernels import native
from tagmoe_dist.gating import losses


@dataclasses.dataclass
class RouterOutput:
    topk_ids_TK: torch.Tensor            # long, expert of each choice
    topk_weights_TK: torch.Tensor        # fp32 combine weights (dropped choices included)
    keep_TK: Optional[torch.Tensor]      # bool, None when dropless
    probs_TE: torch.Tensor               # full routing distribution (sums to 1 per token)
    counts_E: torch.Tensor               # choices per expert before dropping
    losses: Dict[str, torch.Tensor]      # unscaled auxiliary losses


def stable_topk(scores_TE: torch.Tensor, k: int):
    """Top-k along the last dim with exact ties broken towards the lower index (deterministic).

    torch.topk does not specify which of several equal values it returns. On CPU in float32 the
    native kernel (csrc/moe_cpu.c) selects in one pass per row, in the stable order, ~10x faster
    than torch.topk for 64 experts. Elsewhere a full stable sort is slow for many experts, so on
    CPU take topk(k+1) and fall back to the stable sort only when a row has a tie across the k-th
    place: the only tie that changes *which* experts are chosen (ties inside the top-k may come
    out in either order, which no result depends on).
    """
    E = scores_TE.shape[-1]
    ids = native.topk_ids(scores_TE, k)        # CPU float32: one C pass, exact stable order
    if ids is not None:
        return scores_TE.gather(-1, ids), ids
    if scores_TE.is_cuda or k >= E:
        values, ids = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
        return values[..., :k], ids[..., :k]
    values, ids = torch.topk(scores_TE, k + 1, dim=-1, sorted=True)
    if bool((values[..., k - 1] == values[..., k]).any()):
        values, ids = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
        return values[..., :k], ids[..., :k]
    return values[..., :k], ids[..., :k]


class Router(nn.Module):
    """What every router shares: scores from logits, top-k selection, weights, capacity and the
    auxiliary losses (`route`), and aux-loss-free balancing. Subclasses define `compute_logits`."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.expert_bias:
            # Aux-loss-free balancing: a per-expert bias added to the scores for *selection only*,
            # nudged after each optimizer step towards under-loaded experts.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)

    def compute_logits(self, x_TD: torch.Tensor, sample_idx_T: Optional[torch.Tensor],
                       task_BN: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, sample_idx_T: Optional[torch.Tensor] = None,
                num_samples: Optional[int] = None,
                task_BN: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD, sample_idx_T, task_BN)
        if self.cfg.debug_checks and not bool(torch.isfinite(logits_TE).all()):
            raise FloatingPointError(
                "router logits contain NaN/Inf: the input to this MoE layer is non-finite or the "
                "router weights diverged; lower the learning rate, add z_loss_coeff, or check the "
                "previous layer (MoEConfig.debug_checks=True found this)")
        return self.route(logits_TE, sample_idx_T, num_samples)

    # ------------------------------------------------------------------ selection
    def route(self, logits_TE: torch.Tensor, sample_idx_T: Optional[torch.Tensor],
              num_samples: Optional[int]) -> RouterOutput:
        cfg = self.cfg
        if cfg.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)

        if cfg.expert_bias:
            _, topk_ids_TK = stable_topk(scores_TE.detach() + self.expert_bias, cfg.top_k)
            raw_TK = scores_TE.gather(1, topk_ids_TK)
        else:
            raw_TK, topk_ids_TK = stable_topk(scores_TE, cfg.top_k)
        weights_TK = raw_TK
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=1e-20)
        if cfg.topk_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.topk_scaling_factor

        counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=cfg.num_experts)
        if cfg.expert_bias and self.training:
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)

        keep_TK = None
        if cfg.capacity_factor is not None:
            cap = expert_capacity(logits_TE.shape[0], cfg.num_experts, cfg.top_k,
                                  cfg.capacity_factor, cfg.min_capacity)
            keep_TK = capacity_keep_mask(topk_ids_TK, raw_TK.detach(), cfg.num_experts, cap,
                                         cfg.drop_policy)

        out_losses = {}
        if cfg.aux_loss_coeff > 0:
            if cfg.aux_loss_type == "seq" and sample_idx_T is not None:
                out_losses["aux"] = losses.seq_load_balancing_loss(
                    probs_TE, topk_ids_TK, sample_idx_T, num_samples)
            else:
                out_losses["aux"] = losses.load_balancing_loss(probs_TE, counts_E, cfg.top_k)
        if cfg.z_loss_coeff > 0:
            out_losses["z"] = losses.z_loss(logits_TE)
        return RouterOutput(topk_ids_TK, weights_TK, keep_TK, probs_TE, counts_E, out_losses)

    # ------------------------------------------------------------------ aux-loss-free bias
    @torch.no_grad()
    def update_expert_bias(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Move the selection bias towards under-loaded experts, from the load observed since the
        last call (summed over `group`, normally the data-parallel group), and reset the count."""
        if not self.cfg.expert_bias:
            return
        load_E = self.tokens_per_expert.clone()
        if group is not None and dist.is_initialized():
            dist.all_reduce(load_E, group=group)
        self.expert_bias += self.cfg.expert_bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.tokens_per_expert.zero_()


class TopKRouter(Router):
    """Routes each token by its own features: logits = x . W_g^T."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.weight = nn.Parameter(torch.randn(cfg.num_experts, cfg.hidden_size) * cfg.init_std)

    def compute_logits(self, x_TD: torch.Tensor, sample_idx_T: Optional[torch.Tensor],
                       task_BN: Optional[torch.Tensor]) -> torch.Tensor:
        if self.training and self.cfg.input_jitter > 0:
            eps = self.cfg.input_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        # Routing is done in fp32: bf16 logits flip top-k choices between otherwise equal runs.
        return x_TD.float() @ self.weight.float().t()
