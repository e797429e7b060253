"""The DiT: shapes, fair dense baseline, model-wide alignment loss, flow matching learns."""

from pathlib import Path

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_dist.data.images import ImageTaskCollator, ImageTasks, image_task_schema
from tagmoe_dist.models.dit import DiT, DiTConfig, flow_matching_loss, sample
from tests.tolerance import assert_exact

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = image_task_schema()


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**kw):
    moe = dict(ffn_hidden_size=16, num_experts=4, top_k=2, router="task_aware",
               align_dim=12, align_hidden=16)
    moe.update(kw.pop("moe", {}))
    base = dict(image_size=16, patch_size=4, n_layer=2, n_head=2, d_model=16, moe=moe)
    base.update(kw)
    return DiTConfig(**base)


def batch(B=4):
    ds = ImageTasks(B, seed=0)
    b = ImageTaskCollator(SCHEMA)([ds[i] for i in range(B)])
    g = torch.Generator().manual_seed(0)
    return b, torch.randn(b["target"].shape, generator=g), torch.rand(B, generator=g)


@pytest.mark.parametrize("moe_every,n_moe", [(1, 2), (2, 1), (0, 0)])
@pytest.mark.parametrize("router", ["task_aware", "topk"])
def test_forward_backward_shapes(moe_every, n_moe, router):
    torch.manual_seed(0)
    model = DiT(small_cfg(moe_every=moe_every, moe={"router": router}), task_schema=SCHEMA)
    b, noise, t = batch()
    v = model(noise, t, b["source"], b["instruction"], task=b["task_multi_hot"])
    assert v.shape == (4, 3, 16, 16)
    assert len(model.moe_layers()) == n_moe
    loss_B = flow_matching_loss(model, b["target"], b["source"], b["instruction"], noise, t,
                                task=b["task_multi_hot"], per_sample=True)
    assert loss_B.shape == (4,)
    loss_B.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in model.moe_layers():
        assert layer.last_stats["sample_load"].shape == (4, 4)
        assert int(layer.last_stats["sample_load"].sum()) == 4 * model.cfg.num_tokens * 2


def test_patchify_roundtrip():
    model = DiT(small_cfg(moe={"router": "topk"}))
    x = torch.randn(2, 3, 16, 16)
    x_BSP = model.patchify(x)
    assert x_BSP.shape == (2, 16, 3 * 4 * 4)
    assert_exact(model.unpatchify(x_BSP), x)
    # patch 0 is the top-left 4x4 block
    assert_exact(x_BSP[:, 0].view(2, 3, 4, 4), x[:, :, :4, :4])


def test_dense_active_params_match_moe():
    counts = {}
    for arch, every, router in [("moe", 1, "task_aware"), ("moe", 1, "topk"), ("moe", 2, "topk"),
                                ("dense", 1, "topk")]:
        model = DiT(small_cfg(arch=arch, moe_every=every, moe={"router": router}), task_schema=SCHEMA)
        counts[(arch, every, router)] = model.num_params(active_only=True)
    assert len(set(counts.values())) == 1, counts
    dense = DiT(small_cfg(arch="dense"))
    assert dense.num_params() == dense.num_params(active_only=True)
    shipped = {v: DiT(DiTConfig.from_yaml(ROOT / f"configs/models/dit_{v}.yaml")) for v in
               ("tag", "topk", "dense")}
    assert len({m.num_params(active_only=True) for m in shipped.values()}) == 1


def test_one_alignment_pooled_over_all_layers():
    torch.manual_seed(0)
    model = DiT(small_cfg(), task_schema=SCHEMA)
    assert isinstance(model.alignment, tm.TaskAlignment)
    for layer in model.moe_layers():
        assert layer.alignment is None and layer._shared_alignment is model.alignment
    b, noise, t = batch()
    model(noise, t, b["source"], b["instruction"], task=b["task_multi_hot"])
    assert set(model.last_align) == {"loss", "acc", "target_min_dist"}
    model(noise, t, b["source"], b["instruction"])            # no tags: no alignment loss
    assert model.last_align == {}
    # the alignment loss reaches the routers (and only through them the model's routing)
    model.zero_grad()
    model(noise, t, b["source"], b["instruction"], task=b["task_multi_hot"]).sum().mul(0).backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.moe_layers())
    assert model.alignment.predictor[0].weight.grad.abs().sum() > 0


def test_flow_matching_loss_decreases():
    torch.manual_seed(0)
    model = DiT(small_cfg(moe={"router": "topk"}))
    b, noise, t = batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = flow_matching_loss(model, b["target"], b["source"], b["instruction"], noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    x = sample(model, b["source"][:2], b["instruction"][:2], steps=3,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and float(x.abs().max()) <= 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        small_cfg(patch_size=5)
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_dict({**small_cfg().to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="task schema"):
        DiT(small_cfg())                                      # task_aware without a schema
    model = DiT(small_cfg(moe={"router": "topk"}))
    with pytest.raises(ValueError, match="instruction"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, 3, 16, 16),
              torch.zeros(1, 2, dtype=torch.long))
