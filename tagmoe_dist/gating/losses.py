"""Auxiliary losses of the routers, and the autoscaler that feeds them into the gradient.

Notation: T tokens, E experts, K top-k, B samples, N tags, P prediction width.
All losses are computed in fp32 and are *unscaled*; the layer multiplies by the coefficients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class AuxLossAutoScaler(torch.autograd.Function):
    """Returns `output` unchanged; in backward, gives `aux_loss` the gradient `scale`.

    This puts an auxiliary loss into the backward pass without changing what the layer returns
    (the idea of Megatron-core's MoEAuxLossAutoScaler). `scale` is per call rather than a class
    global, so two models with different gradient-accumulation factors cannot interfere.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / GShard balance loss: E * sum_e f_e * P_e.

    f_e = fraction of the T*K routing choices that picked expert e (before capacity dropping),
    P_e = mean routing probability of expert e. Equals 1 when routing is perfectly uniform.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f_E = counts_E.to(probs_TE.dtype) / (T * top_k)
    P_E = probs_TE.mean(0)
    return E * torch.dot(f_E, P_E)


def seq_load_balancing_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                            sample_idx_T: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Per-sequence balance loss (DeepSeek-V2): the Switch loss computed within each sample,
    averaged over samples. Penalises a sequence that sends all its tokens to a few experts even
    when the micro-batch as a whole is balanced."""
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[1]
    if T == 0:
        return probs_TE.sum() * 0.0
    tokens_B = torch.bincount(sample_idx_T, minlength=num_samples).to(probs_TE.dtype)
    sample_choice = sample_idx_T.repeat_interleave(K) * E + topk_ids_TK.reshape(-1)
    counts_BE = torch.bincount(sample_choice, minlength=num_samples * E).view(num_samples, E)
    probs_sum_BE = probs_TE.new_zeros(num_samples, E).index_add_(0, sample_idx_T, probs_TE)
    present_B = tokens_B > 0
    denom_B = tokens_B.clamp(min=1)
    f_BE = counts_BE.to(probs_TE.dtype) / (denom_B[:, None] * K)
    P_BE = probs_sum_BE / denom_B[:, None]
    per_sample_B = E * (f_BE * P_BE).sum(1)
    return per_sample_B[present_B].mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def alignment_loss(pred_BP: torch.Tensor, target_BP: torch.Tensor, mask_B: torch.Tensor,
                   kind: str = "cosine", temperature: float = 0.1,
                   tagset_BB: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TAG-MoE predictive alignment: the routing signature's prediction should match the sample's
    tag embedding. Unannotated samples (mask False) contribute nothing.

    cosine (paper, Eq. 5): mean_b (1 - cos(pred_b, target_b)).
    contrastive (ours): InfoNCE over the batch, where samples with the same tag set
    (`tagset_BB[i, j]` True) are all positives; this cannot be won by collapsing every embedding.
    """
    if kind == "cosine":
        cos_B = F.cosine_similarity(pred_BP, target_BP, dim=-1, eps=1e-8)
        m = mask_B.to(pred_BP.dtype)
        return ((1.0 - cos_B) * m).sum() / m.sum().clamp(min=1.0)
    pred_n = F.normalize(pred_BP, dim=-1, eps=1e-8)
    tgt_n = F.normalize(target_BP, dim=-1, eps=1e-8)
    logits_BB = pred_n @ tgt_n.t() / temperature
    valid_BB = mask_B[None, :] & mask_B[:, None]
    # a large finite fill, not -inf: a fully masked row must not put NaN into the backward
    logits_BB = logits_BB.masked_fill(~valid_BB, -1e9)
    pos_BB = tagset_BB & valid_BB
    log_prob_BB = logits_BB - torch.logsumexp(logits_BB, dim=-1, keepdim=True)
    log_prob_BB = log_prob_BB.masked_fill(~pos_BB, 0.0)
    per_B = -log_prob_BB.sum(1) / pos_BB.sum(1).clamp(min=1)
    m = mask_B.to(pred_BP.dtype)
    return (per_B * m).sum() / m.sum().clamp(min=1.0)


def routing_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-token routing distribution (nats), for logging."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    p = probs_TE / probs_TE.sum(-1, keepdim=True).clamp(min=1e-20)
    return -(p * torch.log(p.clamp(min=1e-20))).sum(-1).mean()
