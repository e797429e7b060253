"""Routing statistics: mutual information, entropy, imbalance, accumulator, heat maps."""

import math

import pytest
import torch

from tagmoe_dist import analysis as an


def test_mutual_information_independent_is_zero():
    # joint = outer product of marginals (any scale)
    p_task = torch.tensor([1.0, 2.0, 3.0])
    p_exp = torch.tensor([4.0, 1.0, 1.0, 2.0, 2.0])
    counts = torch.outer(p_task, p_exp) * 10
    # float64 throughout: entropies of ~2 nats cancel to ~1e-15, so 1e-12 leaves a 1000x margin
    assert an.task_expert_mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
    assert an.task_expert_mutual_information(torch.zeros(3, 4)) == 0.0


@pytest.mark.parametrize("num_tasks,E", [(3, 3), (3, 8), (6, 4)])
def test_mutual_information_one_to_one_is_log_min(num_tasks, E):
    n = min(num_tasks, E)
    counts = torch.zeros(num_tasks, E)
    for t in range(n):
        counts[t, t] = 7
    assert an.task_expert_mutual_information(counts) == pytest.approx(math.log(n))
    # MI = H(expert) - H(expert | task)
    h = an.routing_entropy(counts.sum(0)) - an.conditional_routing_entropy(counts)
    assert h == pytest.approx(math.log(n))


def test_entropy_and_imbalance_bounds():
    E = 8
    assert an.routing_entropy(torch.ones(E)) == pytest.approx(math.log(E))
    assert an.routing_entropy(torch.tensor([0, 5, 0, 0])) == 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = torch.randint(0, 10, (E,), generator=g)
        h = an.routing_entropy(c)
        assert -1e-12 <= h <= math.log(E) + 1e-12
        if c.sum() > 0:
            assert 1.0 <= an.load_imbalance(c) <= E
    assert an.load_imbalance(torch.full((E,), 3)) == 1.0
    assert an.load_imbalance(torch.tensor([4, 0, 0, 0])) == 4.0
    assert math.isnan(an.load_imbalance(torch.zeros(4)))
    with pytest.raises(ValueError, match="2-D"):
        an.task_expert_mutual_information(torch.ones(4))


def test_routing_stats_update_and_hooks():
    stats = an.RoutingStats(num_layers=1, num_experts=4, task_names=["a", "b"])
    ids_TK = torch.tensor([[0, 1], [2, 3], [0, 1], [3, 2]])
    stats.update(0, ids_TK, torch.tensor([0, 1, 0, -1]))          # last token skipped
    assert stats.counts[0].tolist() == [[2, 2, 0, 0], [0, 0, 1, 1]]
    assert stats.load_over_time(0).tolist() == [[2, 2, 1, 1]]
    s = stats.summary()
    assert s["layer0/task_expert_mi"] == pytest.approx(an.task_expert_mutual_information(stats.counts[0]))
    assert 0.0 <= s["layer0/task_expert_mi_norm"] <= 1.0
    with pytest.raises(ValueError, match="one task index per token"):
        stats.update(0, ids_TK, torch.tensor([0, 1]))

    # through router hooks on a real MoE layer, with padding masked out
    import tagmoe_dist as tm
    torch.manual_seed(0)
    layer = tm.MoELayer(tm.MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2))
    hooked = an.RoutingStats(1, 4, ["a", "b"])
    hooked.attach([layer])
    x = torch.randn(2, 5, 8)
    layer(x)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    hooked.commit(torch.tensor([1, 0]), mask)
    hooked.detach()
    assert int(hooked.counts[0, 1].sum()) == 5 * 2 and int(hooked.counts[0, 0].sum()) == 3 * 2
    layer(x)
    assert hooked._pending == {}, "detached hooks must not record"


def test_heatmap_png_and_figure(tmp_path):
    counts = torch.tensor([[5, 1, 0, 0], [0, 0, 3, 3], [1, 1, 1, 1]])
    path = an.heatmap_png(counts, ["copy", "reverse", "add"], tmp_path / "sub" / "h.png", "layer 0")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    fig = an.heatmap_figure(counts, ["copy", "reverse", "add"], normalize=False)
    assert fig.axes and fig.axes[0].get_title() == "routing choices"
    with pytest.raises(ValueError, match="task_names"):
        an.heatmap_figure(counts, ["copy"])
    stats = an.RoutingStats(2, 4, ["copy", "reverse", "add"])
    assert set(stats.figures()) == {"routing/layer0", "routing/layer1"}
