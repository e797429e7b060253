"""What every reference model with MoE FFNs shares: the model-wide TAG alignment loss, the
auxiliary-loss scale, and the active-parameter count used for fair comparisons."""

from __future__ import annotations

from typing import List

import torch

from tagmoe_dist.gating.losses import AuxLossAutoScaler
from tagmoe_dist.layer import MoELayer


class MoEModelMixin:
    """Needs `self.blocks` (each with an `ffn`), `self.alignment` (TaskAlignment or None),
    `self.groups`, `self.aux_loss_scale` and `self.last_align`."""

    def _attach_alignment(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The TAG alignment loss, pooled over all MoE layers of this forward pass (the paper's
        g_b), attached once to the hidden state."""
        self.last_align = {}
        if self.alignment is None:
            return x_BSD
        loss, acc = self.alignment.finish()     # always: it also resets the pool for next forward
        if loss is None:
            return x_BSD
        self.last_align = {"loss": loss.detach(), "acc": acc}
        if torch.is_grad_enabled():
            x_BSD = AuxLossAutoScaler.apply(x_BSD, self.alignment.cfg.align_loss_coeff * loss,
                                            self.aux_loss_scale)
        return x_BSD

    def moe_layers(self) -> List[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def set_aux_loss_scale(self, scale: float) -> None:
        """1/(gradient accumulation steps) when the main loss is averaged over micro-batches."""
        self.aux_loss_scale = scale
        for layer in self.moe_layers():
            layer.aux_loss_scale = scale

    def num_params(self, active_only: bool = False) -> int:
        """Global parameter count (expert weights summed over the EP group; tied weights once).

        active_only: the parameters one token's forward computes with. Per MoE layer that is
        top_k of the E experts (+ the shared expert); routing parameters (router gates, the task
        alignment head) are left out as routing overhead (E*D per MoE layer, plus the
        training-only alignment head). With that count a dense FFN of width
        top_k*ffn_hidden_size (+ shared width) is exactly as large, for GPT with SwiGLU:
            active = V*D + S*D + n_layer*(attn 4*D^2 + 2 norms 4*D) + 2*D
                     + n_layer * 3*D*(top_k*F + shared)
        for the dense and every MoE variant alike.
        """
        routing = {id(p) for layer in self.moe_layers() for p in layer.router.parameters()}
        if self.alignment is not None:
            routing |= {id(p) for p in self.alignment.parameters()}
        expert_share = {}
        for layer in self.moe_layers():
            frac = layer.cfg.top_k / layer.cfg.num_experts if active_only else 1.0
            for p in layer.experts.parameters():
                # local numel * ep_size = all experts; times top_k/E for the active share
                expert_share[id(p)] = frac * self.groups.ep_size
        total = 0.0
        for p in self.parameters():         # nn.Module.parameters() yields tied weights once
            if active_only and id(p) in routing:
                continue
            total += p.numel() * expert_share.get(id(p), 1.0)
        return int(round(total))
