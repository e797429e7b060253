"""The interference workload (tagmoe_dist/data/interference.py) and its study harness."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from tagmoe_lab.benchmark.compare import Budget, init_model, train_run
from tagmoe_lab.benchmark.workloads import get_workload
from tagmoe_dist.data import interference as I

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import interference_study  # noqa: E402


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tasks_conflict_and_the_control_does_not():
    m = I.task_maps()
    low = slice(0, I.A // 2)
    for i, j in itertools.combinations(range(I.K), 2):
        same_family = i // 2 == j // 2
        assert torch.equal(m[i, low], m[j, low]) == same_family
        assert int((m[i] == m[j]).sum()) <= (I.A // 2 if same_family else 4)
    for k in range(I.K):
        assert sorted(m[k].tolist()) == list(range(I.A))          # a bijection
        keeps = bool((m[k, low] % 2 == torch.arange(I.A // 2) % 2).all())
        assert keeps == (I.TASK_NAMES[k][:2] in ("f0", "f1"))
    c = I.task_maps(control=True)
    assert all(torch.equal(c[k], c[0]) for k in range(I.K))


def test_batches_labels_follow_the_maps_and_ignore_colour():
    b = I.make_batches(3, 2, 16)[1]
    m = I.task_maps()
    sym = (b["input_ids"][:, 1:1 + I.N_POS] - I.IN0) // I.C
    assert torch.equal(b["input_ids"][:, 0] - I.TASK0, b["task_index"])
    assert torch.equal(b["labels"][:, 2:] - I.OUT0, m[b["task_index"][:, None], sym])
    assert int(b["input_ids"].max()) < I.VOCAB
    assert torch.equal(I.make_batches(3, 2, 16)[1]["input_ids"], b["input_ids"])     # reproducible
    ev = I.eval_batches(4, 16)
    assert ev[0]["task_index"].tolist()[:I.K] == list(range(I.K))                     # mixed


def test_every_variant_builds_with_equal_active_params_and_trains():
    wl = get_workload("interference")
    budget = Budget(steps=3, batch_size=8, warmup_steps=1, eval_per_task=2, log_every=1)
    batches = wl.train_batches(0, 3, 8)
    evals = wl.eval_batches(2, 16)
    active = set()
    for v in interference_study.VARIANTS["interference"]:
        cfg, model = init_model(wl, v, 0)
        active.add(model.num_params(active_only=True))
        r = train_run(wl, v, 0, budget, batches, evals)
        assert set(r.task_loss) == set(I.TASK_NAMES)
        if v.startswith("tag"):
            flat = v == "tag_flat"
            assert model.alignment.candidates_CN.shape[0] == I.K
            assert model.task_schema.level_names == (["task"] if flat else
                                                     ["scope", "type", "preservation"])
            assert r.align_acc is not None
    assert len(active) == 1, active


def test_analysis_tables():
    blob = {"runs": []}
    for s in range(4):
        for name, vs in interference_study.VARIANTS.items():
            for i, v in enumerate(vs):
                loss = {t: 1.0 + 0.1 * i + 0.01 * s for t in I.TASK_NAMES}
                blob["runs"].append({"workload": name, "variant": v, "seed": s, "task_loss": loss,
                                     "mean": 1.0 + 0.1 * i + 0.01 * s, "worst": ["f0v0", 2.0 + 0.1 * i],
                                     "mi_per_layer": [] if v == "dense" else [0.1 * i, 0.2],
                                     "align_acc": None, "target_min_dist": None, "seconds": 1.0})
    md = interference_study.analyse(blob)
    # tag is index 2, topk index 1: tag - topk = +0.1 on every seed
    assert "| H1/H3 | tag − topk | +0.1000 [+0.1000, +0.1000] | 0/4 |" in md
    assert "Difference in differences" in md
