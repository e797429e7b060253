"""The TAG alignment target must not collapse (issue 18, D1/D2): the paper-literal learned W_tag
collapses on the built-in text workload, the default target does not; the accuracy compares a
prediction with the targets of every task, not with the batch's own samples."""

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_lab.benchmark.collapse import SMALL, probe
from tagmoe_dist.gating.task_aware import min_pairwise_distance

SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation"],
    "type": {"values": ["object", "style", "pose"], "multi": True}}})
TASKS = [{"scope": "local", "type": ["object"]}, {"scope": "local", "type": ["object", "pose"]},
         {"scope": "global", "type": ["style"]}, {"scope": "generation"}]

# a smaller GPT than the probe's default: two 300-step runs in ~15 s on one core
TINY = dict(SMALL, d_model=16, moe=dict(SMALL["moe"], ffn_hidden_size=16, align_dim=16,
                                        align_hidden=16))


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_target_is_collapse_safe():
    assert tm.MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4).align_target != "learned"


def test_text_workload_literal_target_collapses_default_does_not():
    """300 steps of a small task-aware GPT on the text tasks (5 tasks, 15 tags)."""
    literal = probe("learned", seed=0, steps=300, batch_size=16, model=TINY, eval_per_task=16)
    default = probe(tm.MoEConfig.align_target, seed=0, steps=300, batch_size=16, model=TINY,
                    eval_per_task=16)
    # paper-literal: the five task targets turn parallel and the loss is "solved"
    assert literal.min_dist[0] > 0.05, literal.min_dist[0]
    assert literal.min_dist[-1] < 0.01, literal.min_dist[-1]
    assert sum(literal.align_loss[-10:]) / 10 < 0.01
    # default: the targets stay as far apart as at the start, the loss stays informative
    assert default.min_dist[-1] > 0.1, default.min_dist[-1]
    assert min(default.min_dist) > 0.9 * default.min_dist[0]
    assert sum(default.align_loss[-10:]) / 10 > 0.05


def test_min_pairwise_distance_by_hand():
    torch.manual_seed(0)
    t = torch.randn(5, 7, dtype=torch.float64)
    want = min(1 - torch.nn.functional.cosine_similarity(t[i], t[j], dim=0).item()
               for i in range(5) for j in range(5) if i != j)
    assert min_pairwise_distance(t).item() == pytest.approx(want, rel=1e-9)
    t[3] = 2.5 * t[1]                     # two targets point the same way
    assert min_pairwise_distance(t).item() == pytest.approx(0.0, abs=1e-9)
    assert torch.isnan(min_pairwise_distance(t[:1]))


@pytest.mark.parametrize("target", ["orthogonal", "detached", "learned"])
def test_accuracy_uses_every_task_target(target):
    """A single-task batch: the old within-batch accuracy is 1.0 whatever the predictor does; the
    nearest-target accuracy over all tasks' tag sets is 1.0 only if the prediction points at the
    sample's own target."""
    torch.manual_seed(0)
    cfg = tm.MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, router="task_aware",
                       align_dim=16, align_hidden=16, align_target=target)
    align = tm.TaskAlignment(cfg, SCHEMA)
    one_task = SCHEMA.multi_hot([TASKS[1]] * 6)
    g = torch.softmax(torch.randn(6, 4), -1)
    _, acc_batch = align.loss(g, one_task)
    assert acc_batch.item() == 1.0                      # by construction: D2
    align.set_candidates(TASKS + [TASKS[0], None])      # duplicates and unannotated are dropped
    assert align.candidates_CN.shape == (4, SCHEMA.num_tags)
    # a predictor that outputs exactly a given task's target
    targets = align.targets(SCHEMA.multi_hot(TASKS)).detach()
    for k in range(4):
        with torch.no_grad():
            for p in align.predictor.parameters():
                p.zero_()
            align.predictor[-1].bias.copy_(targets[k])
        _, acc = align.loss(g, one_task)
        assert acc.item() == (1.0 if k == 1 else 0.0), (k, acc)
        want = min_pairwise_distance(targets)
        torch.testing.assert_close(align.last_stats["target_min_dist"], want)
