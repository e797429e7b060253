"""A deliberately naive single-process MoE, written from the formulas and independent of the
package's dispatch code: per-token Python loops for selection and capacity, every expert applied
densely to every token, losses spelled out. Slow, obviously correct, differentiable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _mlp(x, w1, w2, activation, b1=None, b2=None):
    h = x @ w1 if b1 is None else x @ w1 + b1
    if activation == "swiglu":
        g, u = h.chunk(2, dim=-1)
        h = F.silu(g) * u
    else:
        h = F.gelu(h, approximate="tanh")
    return h @ w2 if b2 is None else h @ w2 + b2


def reference_forward(cfg, p, x_BSD, task_BN=None):
    """Returns (y_BSD, losses dict). `p`: full state dict of leaf tensors (may require grad)."""
    B, S, D = x_BSD.shape
    T, E, K = B * S, cfg.num_experts, cfg.top_k
    x = x_BSD.reshape(T, D)
    sample = torch.tensor([t // S for t in range(T)], dtype=torch.long)

    if cfg.router == "task_level":
        logits = (task_BN @ p["router.task_weight"] + p["router.unknown_logits"])[sample]
    else:
        logits = x @ p["router.weight"].t()
        if task_BN is not None and cfg.task_conditioning == "add":
            logits = logits + (task_BN @ p["router.task_weight"])[sample]
        if task_BN is not None and cfg.task_conditioning == "concat":
            emb = task_BN @ p["router.task_embed"]
            logits = logits + (emb @ p["router.task_gate"].t())[sample]

    if cfg.score_function == "softmax":
        scores = torch.softmax(logits, -1)
        probs = scores
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)

    # selection: highest score first, ties to the lower expert id
    sel = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(scores[t, e].detach()), e))
        sel.append(order[:K])
    weights = []
    for t in range(T):
        w = torch.stack([scores[t, e] for e in sel[t]])
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * cfg.topk_scaling_factor)

    keep = [[True] * K for _ in range(T)]
    if cfg.capacity_factor is not None:
        cap = max(cfg.min_capacity, math.ceil(T * K * cfg.capacity_factor / E))
        for e in range(E):
            choices = [(t, k) for t in range(T) for k in range(K) if sel[t][k] == e]
            if cfg.drop_policy == "probs":
                choices.sort(key=lambda tk: (-float(scores[tk[0], sel[tk[0]][tk[1]]].detach()), tk[0] * K + tk[1]))
            for i, (t, k) in enumerate(choices):
                keep[t][k] = i < cap

    bias = cfg.expert_mlp_bias
    out_e = [_mlp(x, p["experts.w1"][e], p["experts.w2"][e], cfg.activation,
                  p["experts.b1"][e] if bias else None, p["experts.b2"][e] if bias else None)
             for e in range(E)]
    rows = []
    for t in range(T):
        acc = x.new_zeros(D)
        for k in range(K):
            if keep[t][k]:
                acc = acc + weights[t][k] * out_e[sel[t][k]][t]
        rows.append(acc)
    y = torch.stack(rows) if rows else x.new_zeros(0, D)
    if cfg.shared_ffn_size > 0:
        ys = _mlp(x, p["shared_expert.mlp.w1"], p["shared_expert.mlp.w2"], cfg.activation)
        if cfg.shared_expert_gate:
            ys = torch.sigmoid(x @ p["shared_expert.gate.weight"].t()) * ys
        y = y + ys

    losses = {}
    zero = logits.sum() * 0.0
    if cfg.aux_loss_coeff > 0:
        def switch(idx):
            if len(idx) == 0:
                return zero
            cnt = torch.zeros(E)
            for t in idx:
                for e in sel[t]:
                    cnt[e] += 1
            return E * sum(cnt[e] / (len(idx) * K) * probs[idx, e].mean() for e in range(E))
        if cfg.aux_loss_type == "seq":
            per = [switch([t for t in range(T) if sample[t] == b]) for b in range(B) if S > 0]
            losses["aux"] = torch.stack(per).mean() if per else zero
        else:
            losses["aux"] = switch(list(range(T)))
    if cfg.z_loss_coeff > 0:
        losses["z"] = torch.logsumexp(logits, -1).square().mean() if T else zero
    if cfg.router == "task_aware" and task_BN is not None:
        losses["align"] = reference_alignment(cfg, p, probs, sample, B, task_BN)
    return y.view(B, S, D), losses


def reference_alignment(cfg, p, probs, sample, B, task_BN, prefix="alignment."):
    terms = []
    for b in range(B):
        if float(task_BN[b].sum()) == 0:
            continue
        idx = [t for t in range(len(sample)) if sample[t] == b]
        g = probs[idx].mean(0)
        h = F.gelu(g @ p[prefix + "predictor.0.weight"].t() + p[prefix + "predictor.0.bias"])
        h = F.gelu(h @ p[prefix + "predictor.2.weight"].t() + p[prefix + "predictor.2.bias"])
        pred = h @ p[prefix + "predictor.4.weight"].t() + p[prefix + "predictor.4.bias"]
        target = task_BN[b] @ p[prefix + "tag_embed"]
        terms.append(1 - torch.dot(pred, target) / (pred.norm() * target.norm()))
    return torch.stack(terms).mean() if terms else probs.sum() * 0.0


def reference_grads(cfg, sd, x_BSD, task_BN, cot_BSD):
    """Gradients of sum(y * cot) + sum_l coeff_l * loss_l w.r.t. every weight and the input."""
    p = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    x = x_BSD.detach().clone().requires_grad_(True)
    y, losses = reference_forward(cfg, p, x, task_BN)
    coeff = {"aux": cfg.aux_loss_coeff, "z": cfg.z_loss_coeff, "align": cfg.align_loss_coeff}
    obj = (y * cot_BSD).sum() + sum(coeff[k] * v for k, v in losses.items())
    names = [k for k, v in p.items() if v.requires_grad]
    grads = torch.autograd.grad(obj, [p[k] for k in names] + [x], allow_unused=True)
    g = {k: (gr if gr is not None else torch.zeros_like(p[k])) for k, gr in zip(names, grads)}
    return y.detach(), {k: v.detach() for k, v in losses.items()}, g, grads[-1]


# ---- the textbook permute / unpermute pair, the reference for the fused kernels' row math
def permute(x_TD: torch.Tensor, perm_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order: x_ND[i] = x_TD[perm_N[i] // K]."""
    return x_TD.index_select(0, torch.div(perm_N, top_k, rounding_mode="floor"))


def unpermute(y_ND: torch.Tensor, perm_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute` with the weighted sum over the K choices: y_TD = sum_k w_tk * y[t,k].

    Choices that were dropped (their flat index is absent from perm_N) contribute zero.
    Implemented as a gather from the permuted buffer (plus one zero row for dropped choices)
    followed by a batched weighted sum, which is cheaper than a scatter-add on CPU and GPU.
    """
    T, K = weights_TK.shape
    N = perm_N.numel()
    D = y_ND.shape[-1]
    inv_TK = torch.full((T * K,), N, dtype=torch.long, device=perm_N.device)
    inv_TK[perm_N] = torch.arange(N, device=perm_N.device)
    y_pad = torch.cat([y_ND, y_ND.new_zeros(1, D)]) if N < T * K else y_ND
    y_TKD = y_pad.index_select(0, inv_TK).view(T, K, D)
    w_T1K = weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_TKD).squeeze(1)
