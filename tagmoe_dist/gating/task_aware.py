"""TAG-MoE: task-conditioned routing and the predictive alignment regulariser (arXiv 2601.08881).

Notation: T tokens, E experts, B samples, N tags (whole vocabulary), P tag-embedding width,
H predictor width.

The paper's router sees tokens only; task tags shape it through the alignment loss:
  g_b = mean over the sample's tokens and all MoE layers of the full routing distribution S
  s_b = sum of the learnable embeddings W_tag[k] of the sample's tags
  L_align = mean_b (1 - cos(H_pred(g_b), s_b))            (annotated samples only)
Because g pools over *all* MoE layers, the loss is computed by one model-wide `TaskAlignment`
module that every layer feeds (`add`) and the model closes (`finish`). A layer used on its own
owns a private `TaskAlignment` and closes it itself.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating import losses
from tagmoe_dist.gating.topk import TopKRouter
from tagmoe_dist.tasks import TaskSchema


def per_sample_mean(x_TE: torch.Tensor, sample_idx_T: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Mean of token rows per sample: [T, E] -> [B, E] (samples with no tokens get zeros)."""
    sum_BE = x_TE.new_zeros(num_samples, x_TE.shape[1]).index_add_(0, sample_idx_T, x_TE)
    count_B = torch.bincount(sample_idx_T, minlength=num_samples).clamp(min=1).to(x_TE.dtype)
    return sum_BE / count_B[:, None]


class TaskAwareRouter(TopKRouter):
    """Top-k router with optional task conditioning of the logits (for users who have task labels
    at inference). `task_conditioning`:
      none    the paper's router (tasks act only through the alignment loss)
      add     logits += t_b . W_t, with t_b the multi-hot tags and W_t zero-initialised
      concat  gate over [x, e_b] with e_b = t_b . W_emb a learned task embedding; the task half of
              the gate is zero-initialised, so step 0 equals the plain router
    Unannotated tags are zero in t_b, so an unknown task adds nothing.
    """

    def __init__(self, cfg: MoEConfig, schema: TaskSchema):
        super().__init__(cfg)
        N, E = schema.num_tags, cfg.num_experts
        if cfg.task_conditioning == "add":
            self.task_weight = nn.Parameter(torch.zeros(N, E))
        elif cfg.task_conditioning == "concat":
            self.task_embed = nn.Parameter(torch.randn(N, cfg.task_embed_dim) * cfg.init_std)
            self.task_gate = nn.Parameter(torch.zeros(E, cfg.task_embed_dim))

    def compute_logits(self, x_TD, sample_idx_T, task_BN):
        logits_TE = super().compute_logits(x_TD, sample_idx_T, task_BN)
        if task_BN is None or self.cfg.task_conditioning == "none":
            return logits_TE
        if self.cfg.task_conditioning == "add":
            task_BE = task_BN @ self.task_weight
        else:
            task_BE = (task_BN @ self.task_embed) @ self.task_gate.t()
        return logits_TE + task_BE.index_select(0, sample_idx_T)


def _orthogonal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # torch.normal, not torch.randn (the same values): deepspeed.zero.Init with bf16 patches
    # torch.randn to return bf16, for which CPU QR is not implemented, and the targets would
    # then differ from a ZeRO-2 build of the same model
    q, _ = torch.linalg.qr(torch.normal(0.0, 1.0, size=(cols, rows), generator=g))
    return q.t().contiguous()


def min_pairwise_distance(target_CP: torch.Tensor, distinct_CC: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """Collapse monitor: min over pairs of rows (i != j, or where `distinct_CC` is True) of
    1 - cos(target_i, target_j). 0 = two targets point the same way (collapsed); NaN = no pair."""
    if target_CP.dtype != torch.float64:
        target_CP = target_CP.float()
    tn_CP = F.normalize(target_CP, dim=-1, eps=1e-8)
    dist_CC = 1.0 - tn_CP @ tn_CP.t()
    C = target_CP.shape[0]
    pair_CC = ~torch.eye(C, dtype=torch.bool, device=target_CP.device)
    if distinct_CC is not None:
        pair_CC = pair_CC & distinct_CC
    m = dist_CC.masked_fill(~pair_CC, float("inf")).amin() if C > 1 else dist_CC.new_tensor(float("inf"))
    return torch.where(torch.isinf(m), torch.full_like(m, float("nan")), m)


class TaskAlignment(nn.Module):
    """W_tag, the predictor H_pred, and the per-forward accumulator of routing signatures.

    align_target (MoEConfig):
      orthogonal  (default) fixed orthonormal tag embeddings, a buffer: collapse-safe, and the
                  targets of two tag sets are as far apart as their tags allow
      detached    random learnable-shaped W_tag that gets no gradient (stop-gradient on the target)
      learned     the paper as written (Eqs. 1-5): W_tag trained with the loss. Degenerate: every
                  target can turn parallel and L_align -> 0 while routing learns nothing (see
                  docs/results.md); kept for reproducing the paper literally.

    Monitors (`last_stats` after each `loss`, detached, no host sync):
      acc              nearest-target accuracy: the prediction's nearest target among the
                       candidate tag sets (`set_candidates`: every task of the schema's training
                       mix) is the sample's own; without candidates, among the batch's tag sets
      target_min_dist  min over pairs of distinct candidate tag sets of 1 - cos(s_i, s_j):
                       near 0 means the targets collapsed
    """

    def __init__(self, cfg: MoEConfig, schema: TaskSchema):
        super().__init__()
        N, P, H = schema.num_tags, cfg.align_dim, cfg.align_hidden
        self.cfg, self.schema = cfg, schema
        if cfg.align_target == "orthogonal":
            if P < N:
                raise ValueError(f"MoEConfig.align_target='orthogonal' needs align_dim >= the number "
                                 f"of tags ({N}); got align_dim={P}: raise align_dim or set "
                                 "align_target='detached'")
            self.register_buffer("tag_embed", _orthogonal(N, P))
        else:
            self.tag_embed = nn.Parameter(torch.randn(N, P) / P ** 0.5)
        self.predictor = nn.Sequential(
            nn.Linear(cfg.num_experts, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, P))
        # the tag sets of all tasks (multi-hot [C, N]), set by the user; not a buffer: it is no
        # part of the model's state (checkpoints, DeepSpeed buffer lists), it moves on first use
        self.candidates_CN = torch.zeros(0, N)
        self.last_stats: Dict[str, torch.Tensor] = {}
        self._sum_BE: Optional[torch.Tensor] = None
        self._num_layers = 0
        self._task_BN: Optional[torch.Tensor] = None

    def set_candidates(self, tasks) -> None:
        """The tag sets the accuracy and the collapse monitor compare against: every task of the
        training mix. `tasks`: a list of descriptor dicts, LongTensor [C, levels] of ids, or
        multi-hot [C, N]. Duplicates and unannotated rows are dropped."""
        if isinstance(tasks, torch.Tensor):
            mh_CN = self.schema.to_multi_hot(tasks, field="candidates")
        else:
            mh_CN = self.schema.multi_hot(list(tasks))
        mh_CN = torch.unique(mh_CN[mh_CN.sum(1) > 0], dim=0)
        if mh_CN.shape[0] == 0:
            raise ValueError("TaskAlignment.set_candidates: no annotated tag set given")
        self.candidates_CN = mh_CN

    # ------------------------------------------------------------------ model-wide pooling
    def add(self, signature_BE: torch.Tensor, task_BN: torch.Tensor) -> None:
        """A layer contributes its per-sample mean routing distribution for this forward pass."""
        self._sum_BE = signature_BE if self._sum_BE is None else self._sum_BE + signature_BE
        self._num_layers += 1
        self._task_BN = task_BN

    def finish(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Loss and accuracy from the signatures added since the last call; resets the pool.
        Returns (None, None) when no layer saw task labels."""
        if self._sum_BE is None:
            return None, None
        g_BE, task_BN = self._sum_BE / self._num_layers, self._task_BN
        self._sum_BE, self._num_layers, self._task_BN = None, 0, None
        return self.loss(g_BE, task_BN)

    # ------------------------------------------------------------------ the loss
    def _predict(self, g_BE: torch.Tensor) -> torch.Tensor:
        """H_pred in fp32 whatever the parameters' dtype: the signatures are fp32 routing
        probabilities, and the loss is a routing loss (as the router's logits, kept in fp32)."""
        if self.predictor[0].weight.dtype == g_BE.dtype:
            return self.predictor(g_BE)
        h = g_BE
        for m in self.predictor:
            h = (torch.nn.functional.linear(h, m.weight.to(h.dtype), m.bias.to(h.dtype))
                 if isinstance(m, nn.Linear) else m(h))
        return h

    def targets(self, task_BN: torch.Tensor) -> torch.Tensor:
        """s_b = sum of the tag embeddings of the sample's tags (gradient into W_tag only for
        align_target='learned')."""
        tag_embed = self.tag_embed
        if self.cfg.align_target == "detached":
            tag_embed = tag_embed.detach()
        return task_BN @ tag_embed.to(task_BN.dtype)

    def loss(self, g_BE: torch.Tensor, task_BN: torch.Tensor):
        """(L_align, alignment accuracy) for signatures g and multi-hot tags; `last_stats` gets
        the accuracy and the collapse monitor (see the class docstring)."""
        task_BN = task_BN.to(g_BE.dtype)
        mask_B = task_BN.sum(1) > 0
        target_BP = self.targets(task_BN)
        pred_BP = self._predict(g_BE)
        same_BB = (task_BN[:, None, :] == task_BN[None, :, :]).all(-1)
        loss = losses.alignment_loss(pred_BP, target_BP, mask_B, self.cfg.align_loss,
                                     self.cfg.align_temperature, same_BB)
        with torch.no_grad():
            if self.candidates_CN.shape[0] > 0:
                acc, min_dist = self._monitor_candidates(pred_BP, task_BN, mask_B)
            else:
                acc, min_dist = self._monitor_batch(pred_BP, target_BP, same_BB, mask_B)
        self.last_stats = {"acc": acc, "target_min_dist": min_dist}
        return loss, acc

    def _monitor_candidates(self, pred_BP, task_BN, mask_B):
        if self.candidates_CN.device != task_BN.device:       # once: a host copy, not per step
            self.candidates_CN = self.candidates_CN.to(task_BN.device)
        cand_CN = self.candidates_CN.to(task_BN.dtype)
        target_CP = self.targets(cand_CN)
        sim_BC = F.normalize(pred_BP, dim=-1) @ F.normalize(target_CP, dim=-1).t()
        nearest_BN = cand_CN.index_select(0, sim_BC.argmax(1))
        hit_B = (nearest_BN == task_BN).all(-1)
        return _masked_mean(hit_B, mask_B), min_pairwise_distance(target_CP)

    def _monitor_batch(self, pred_BP, target_BP, same_BB, mask_B):
        sim_BB = (F.normalize(pred_BP, dim=-1) @ F.normalize(target_BP, dim=-1).t())
        sim_BB = sim_BB.masked_fill(~mask_B[None, :], -2.0)
        hit_B = same_BB.gather(1, sim_BB.argmax(1, keepdim=True)).squeeze(1)
        valid_BB = mask_B[:, None] & mask_B[None, :] & ~same_BB
        return _masked_mean(hit_B, mask_B), min_pairwise_distance(target_BP, valid_BB)


def _masked_mean(hit_B: torch.Tensor, mask_B: torch.Tensor) -> torch.Tensor:
    m = mask_B.float()
    return (hit_B.float() * m).sum() / m.sum().clamp(min=1.0)
