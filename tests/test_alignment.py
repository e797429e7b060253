"""TAG-MoE predictive alignment: gradient, learning on a separable toy problem, unannotated tags."""

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_dist.gating.losses import alignment_loss
from tagmoe_dist.gating.task_aware import per_sample_mean
from tests.tolerance import REL_FP32, assert_rel_close

SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation", "custom"],
    "type": {"values": ["object", "style", "pose"], "multi": True}}})


def _cfg(**kw):
    base = dict(hidden_size=8, ffn_hidden_size=8, num_experts=6, top_k=2, router="task_aware",
                align_dim=10, align_hidden=12)
    base.update(kw)
    return tm.MoEConfig(**base)


@pytest.mark.parametrize("kind", ["cosine", "contrastive"])
def test_alignment_gradcheck_float64(kind):
    torch.manual_seed(0)
    align = tm.TaskAlignment(_cfg(align_loss=kind), SCHEMA).double()
    ids = torch.tensor([[0, 1], [2, -1], [0, 1], [-1, -1], [3, 2]])
    task = SCHEMA.to_multi_hot(ids).double()
    g = torch.softmax(torch.randn(5, 6, dtype=torch.float64), -1).requires_grad_(True)
    W = align.tag_embed.detach().clone().requires_grad_(True)
    W1 = align.predictor[0].weight.detach().clone().requires_grad_(True)

    def f(g, W, W1):
        h = torch.nn.functional.linear(g, W1, align.predictor[0].bias)
        pred = align.predictor[1:](h)
        same = (task[:, None] == task[None]).all(-1)
        return alignment_loss(pred, task @ W, task.sum(1) > 0, kind, 0.5, same)

    assert torch.autograd.gradcheck(f, (g, W, W1), eps=1e-6, atol=1e-6)


def test_unannotated_level_and_sample_are_ignored():
    torch.manual_seed(0)
    align = tm.TaskAlignment(_cfg(align_target="learned"), SCHEMA)
    g = torch.softmax(torch.randn(3, 6), -1).requires_grad_(True)
    ids = torch.tensor([[1, -1], [2, -1], [-1, -1]])   # level "type" never annotated, sample 2 not at all
    loss, _ = align.loss(g, SCHEMA.to_multi_hot(ids))
    loss.backward()
    type_rows = slice(SCHEMA.offset("type"), SCHEMA.num_tags)
    assert torch.count_nonzero(align.tag_embed.grad[type_rows]) == 0
    assert torch.count_nonzero(align.tag_embed.grad[:SCHEMA.offset("type")]) > 0
    assert torch.count_nonzero(g.grad[2]) == 0, "an unannotated sample must not pull its routing"
    # the same loss as the batch without the unannotated sample
    loss2, _ = align.loss(g[:2], SCHEMA.to_multi_hot(ids[:2]))
    assert_rel_close(loss, loss2, REL_FP32)


def test_alignment_falls_when_tasks_are_separable():
    """Tokens of each task come from their own cluster; training the layer on L_align alone must
    teach the router to give each task its own signature (loss down, accuracy up)."""
    torch.manual_seed(0)
    cfg = _cfg(aux_loss_coeff=0.0, align_loss_coeff=1.0, hidden_size=16, num_experts=8,
               align_dim=16, align_hidden=32)
    layer = tm.MoELayer(cfg, task_schema=SCHEMA)
    centers = torch.randn(4, 16) * 2
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    history = []
    for step in range(150):
        scope = torch.randint(0, 4, (16,))
        x = centers[scope][:, None, :] + 0.3 * torch.randn(16, 5, 16)
        task = torch.stack([scope, torch.full_like(scope, -1)], 1)
        y = layer(x, task=task)
        (y.sum() * 0.0).backward()          # only the auxiliary losses drive the gradient
        opt.step()
        opt.zero_grad()
        history.append((float(layer.last_losses["align"]), float(layer.last_stats["align_acc"])))
    first = sum(h[0] for h in history[:10]) / 10
    last = sum(h[0] for h in history[-10:]) / 10
    acc = sum(h[1] for h in history[-10:]) / 10
    assert last < 0.3 * first, (first, last)
    assert acc > 0.95, acc
    # and the routers really moved: per-task routing signatures now differ
    with torch.no_grad():
        x = centers[:, None, :].expand(4, 5, 16)
        probs = torch.softmax(x.reshape(-1, 16) @ layer.router.weight.t(), -1)
        sig = per_sample_mean(probs, torch.arange(4).repeat_interleave(5), 4)
    assert float(torch.cdist(sig, sig).sum()) / 12 > 0.05


def test_shared_alignment_pools_over_layers():
    torch.manual_seed(0)
    cfg = _cfg()
    align = tm.TaskAlignment(cfg, SCHEMA)
    l1 = tm.MoELayer(cfg, task_schema=SCHEMA, alignment=align)
    l2 = tm.MoELayer(cfg, task_schema=SCHEMA, alignment=align)
    assert "alignment.tag_embed" not in l1.state_dict()
    x = torch.randn(3, 4, 8)
    ids = torch.tensor([[0, 1], [1, -1], [2, 2]])
    h = l1(x, task=ids)
    h = l2(h, task=ids)
    loss, acc = align.finish()
    # by hand: the mean of both layers' per-sample signatures
    task = SCHEMA.to_multi_hot(ids)
    with torch.no_grad():
        def sig(layer, inp):
            p = torch.softmax(inp.reshape(-1, 8) @ layer.router.weight.t(), -1)
            return per_sample_mean(p, torch.arange(3).repeat_interleave(4), 3)
        g = (sig(l1, x) + sig(l2, l1(x, task=ids))) / 2
        align.finish()
        want, _ = align.loss(g, task)
    assert_rel_close(loss.detach(), want, REL_FP32)
    assert align.finish() == (None, None), "finish() must reset the pool"
