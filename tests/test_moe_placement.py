"""MoE placement (`moe_layers: [..]` / "last:K"), the load-balancing loss reduction over MoE
layers (mean, as MegaBlocks, or sum), and the DiT whose instruction reaches image tokens only
through attention."""

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_dist.config import parse_moe_layers
from tagmoe_dist.data.images import image_task_schema
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.models.dit import DiT, DiTConfig
from tagmoe_dist.models.gpt import GPT, GPTConfig


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def gpt_cfg(**kw):
    moe = dict(ffn_hidden_size=8, num_experts=4, top_k=2, aux_loss_coeff=1.0)
    moe.update(kw.pop("moe", {}))
    return GPTConfig(**{**dict(vocab_size=20, seq_len=6, n_layer=4, n_head=2, d_model=8, moe=moe),
                        **kw})


def test_parse_moe_layers():
    assert parse_moe_layers("last:10", 60) == list(range(50, 60))
    assert parse_moe_layers("last:0", 4) == []
    assert parse_moe_layers([3, 0, -1], 6) == [0, 3, 5]
    assert parse_moe_layers((1,), 2) == [1]
    assert parse_moe_layers("all", 3) == [0, 1, 2]
    assert parse_moe_layers("none", 3) == []
    with pytest.raises(ValueError, match=r"moe_layers: layer index 6 is out of range .* 6 layers"):
        parse_moe_layers([0, 6], 6)
    with pytest.raises(ValueError, match=r"layer index -7 is out of range"):
        parse_moe_layers([-7], 6)
    with pytest.raises(ValueError, match=r"'last:K' needs an integer K in 0..6"):
        parse_moe_layers("last:7", 6)
    with pytest.raises(ValueError, match=r"'last:K' needs an integer K"):
        parse_moe_layers("last:x", 6)
    with pytest.raises(ValueError, match="listed twice"):
        parse_moe_layers([1, -5], 6)
    with pytest.raises(ValueError, match="not an integer"):
        parse_moe_layers([1.0], 6)
    with pytest.raises(ValueError, match=r"mlp_layers='first:2' is not understood"):
        parse_moe_layers("first:2", 6, field="mlp_layers")


def test_gpt_and_dit_place_moe_by_list_or_last_k():
    torch.manual_seed(0)
    gpt = GPT(gpt_cfg(moe_layers="last:2"))
    assert [isinstance(b.ffn, MoELayer) for b in gpt.blocks] == [False, False, True, True]
    gpt = GPT(gpt_cfg(moe_layers=[0, 2]))
    assert [isinstance(b.ffn, MoELayer) for b in gpt.blocks] == [True, False, True, False]
    # top-1 experts as wide as the dense FFN: dense blocks get the expert width (the paper's recipe)
    cfg = gpt_cfg(moe_layers="last:1", moe={"top_k": 1})
    assert GPT(cfg).blocks[0].ffn.w2.shape[0] == 8
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["moe_layers"] == "last:1"
    assert gpt_cfg(moe_layers=[0, 2]).to_dict()["moe_layers"] == [0, 2]
    with pytest.raises(ValueError, match=r"GPTConfig.moe_layers: layer index 4 is out of range"):
        gpt_cfg(moe_layers=[4])
    with pytest.raises(ValueError, match="either moe_layers"):
        gpt_cfg(moe_layers="last:2", moe_every=2)
    dit = DiT(DiTConfig(image_size=8, patch_size=4, n_layer=3, n_head=2, d_model=8,
                        moe=dict(ffn_hidden_size=8, num_experts=4, top_k=1), moe_layers="last:1"))
    assert [isinstance(b.ffn, MoELayer) for b in dit.blocks] == [False, False, True]


def _router_grads(reduction: str, moe_layers):
    torch.manual_seed(0)
    model = GPT(gpt_cfg(moe_layers=moe_layers, moe={"aux_loss_reduction": reduction}))
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    (model(ids) * 0.0).sum().backward()       # only the load-balancing loss drives the gradient
    layers = model.moe_layers()
    return [l.router.weight.grad.clone() for l in layers], [float(l.last_losses["aux"]) for l in layers]


def test_aux_loss_reduction_mean_is_sum_over_layers():
    g_mean, aux_mean = _router_grads("mean", "all")
    g_sum, aux_sum = _router_grads("sum", "all")
    assert len(g_mean) == 4 and aux_mean == aux_sum
    for gm, gs in zip(g_mean, g_sum):
        assert gs.abs().sum() > 0
        torch.testing.assert_close(gm * 4, gs)
    # one MoE layer: mean and sum agree; the default is the mean
    g1_mean, _ = _router_grads("mean", [2])
    g1_sum, _ = _router_grads("sum", [2])
    torch.testing.assert_close(g1_mean[0], g1_sum[0])
    assert tm.MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4).aux_loss_reduction == "mean"
    with pytest.raises(ValueError, match="aux_loss_reduction='max'"):
        tm.MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, aux_loss_reduction="max")


def test_dit_instruction_only_through_attention():
    """instruction_adaln=false: the adaLN conditioning does not depend on the instruction (so it
    cannot rescale the router's input by task), yet the output does (through attention)."""
    schema = image_task_schema()
    cfg = DiTConfig(image_size=8, patch_size=4, n_layer=2, n_head=2, d_model=8, instruction_adaln=False,
                    moe=dict(ffn_hidden_size=8, num_experts=4, top_k=1))
    torch.manual_seed(0)
    model = DiT(cfg, task_schema=schema)
    for p in model.parameters():          # leave adaLN-Zero's zero init: make every path live
        torch.nn.init.normal_(p, std=0.3)
    seen = []
    model.blocks[0].ada.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    x, src, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    out1 = model(x, t, src, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    out2 = model(x, t, src, torch.tensor([[7, 8, 9], [10, 11, 12]]))
    torch.testing.assert_close(seen[0], seen[1])
    assert (out1 - out2).abs().max() > 1e-3
    # the default keeps the instruction in adaLN
    cfg2 = DiTConfig(**{**cfg.to_dict(), "instruction_adaln": True})
    torch.manual_seed(0)
    model2 = DiT(cfg2, task_schema=schema)
    model2.load_state_dict(model.state_dict())
    seen.clear()
    model2.blocks[0].ada.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    model2(x, t, src, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    model2(x, t, src, torch.tensor([[7, 8, 9], [10, 11, 12]]))
    assert (seen[0] - seen[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="instruction_adaln"):
        DiTConfig(**{**cfg.to_dict(), "instruction_adaln": "no"})
