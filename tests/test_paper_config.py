"""configs/models/tagmoe_paper_dit.yaml: the TAG-MoE paper's MoE recipe, scaled to run here, and
its full-size sibling (parsed only: ~12.5B parameters)."""

from pathlib import Path

import pytest
import torch

from tagmoe_dist.layer import MoELayer
from tagmoe_lab.benchmark.compare import Budget, init_model, train_run
from tagmoe_lab.benchmark.workloads import get_workload, load_model_config

ROOT = Path(__file__).resolve().parents[1]


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _check_recipe(cfg, k_last):
    m = cfg.moe_config
    assert (m.num_experts, m.top_k, m.norm_topk_prob, m.capacity_factor) == (4, 1, False, None)
    assert m.ffn_hidden_size == cfg.dense_ffn_size == 4 * cfg.d_model
    assert (m.activation, m.expert_mlp_bias, m.router) == ("gelu", True, "task_aware")
    assert (m.aux_loss_coeff, m.aux_loss_reduction, m.align_target) == (0.01, "mean", "orthogonal")
    assert (m.align_dim, m.align_hidden) == (512, 256)
    assert cfg.moe_layer_indices == list(range(cfg.n_layer - k_last, cfg.n_layer))
    assert cfg.instruction_adaln is False
    assert cfg.load_task_schema().num_tags == 18


def test_full_size_sibling_parses():
    cfg = load_model_config(ROOT / "configs/models/tagmoe_paper_dit_full.yaml")
    _check_recipe(cfg, 10)
    assert (cfg.n_layer, cfg.d_model) == (60, 3072)


def test_scaled_paper_recipe_trains_on_the_image_tasks_with_the_paper_tags():
    cfg = load_model_config(ROOT / "configs/models/tagmoe_paper_dit.yaml")
    _check_recipe(cfg, 2)
    wl = get_workload("image", {"paper": str(ROOT / "configs/models/tagmoe_paper_dit.yaml")})
    _, model = init_model(wl, "paper", 0)
    moe = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    assert moe == [10, 11]
    assert model.blocks[11].ffn.experts.b1 is not None and model.blocks[0].ffn.b1 is not None
    assert all(l.num_moe_layers == 2 for l in model.moe_layers())
    # the five image tasks have five distinct tag sets under the paper's schema
    assert model.alignment.candidates_CN.shape == (5, 18)
    budget = Budget(steps=2, batch_size=8, warmup_steps=1, eval_per_task=2, log_every=1)
    r = train_run(wl, "paper", 0, budget, wl.train_batches(0, 2, 8), wl.eval_batches(2, 10))
    assert r.history[-1]["align_loss"] > 0 and r.history[-1]["target_min_dist"] > 0.1
    assert set(r.task_loss) == set(wl.task_names)
