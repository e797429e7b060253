"""The TAG-MoE authors' checkpoint layout (MegaBlocks dMoE in transformer_blocks.{i}.img_mlp):
random weights in that layout, a reference module with MegaBlocks' forward written out, our
converted transformer loaded from its state dict gives the same output; save -> load exact, at
EP=1 and EP=2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="the diffusers integration needs `pip install -e .[diffusion]`")

from tagmoe_dist.integrations import diffusers as tmd  # noqa: E402
from tagmoe_dist.parallel import ParallelGroups  # noqa: E402

from tests import diffusers_tiny as tiny  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close  # noqa: E402

E, D = 4, 32
FF = 4 * D


class RefDMoE(nn.Module):
    """MegaBlocks dMoE (mlp_type='mlp', top-1, dropless, moe_normalize_expert_weights=None,
    return_bias=True) as the authors' block calls it (`img_mlp(x)[0]`), written out. Parameter
    names are MegaBlocks', so its state_dict is the checkpoint layout."""

    def __init__(self, g: torch.Generator):
        super().__init__()
        self.router = nn.Module()
        self.router.layer = nn.Linear(D, E, bias=False)
        self.experts = nn.Module()
        self.experts.mlp = nn.Module()
        self.experts.mlp.w1 = nn.Parameter(torch.randn(E * FF, D, generator=g) * 0.1)
        self.experts.mlp.w2 = nn.Parameter(torch.randn(E * FF, D, generator=g) * 0.1)
        self.experts.bias = nn.Parameter(torch.randn(D, generator=g))
        with torch.no_grad():
            self.router.layer.weight.copy_(torch.randn(E, D, generator=g))

    def dmoe(self, x):
        x_TD = x.reshape(-1, D)
        scores_TE = self.router.layer(x_TD).softmax(dim=-1)
        weight_T, expert_T = scores_TE.max(dim=-1)                   # LearnedRouter._top_k, k=1
        w1 = self.experts.mlp.w1.view(E, FF, D)
        w2 = self.experts.mlp.w2.view(E, FF, D)
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):                                           # dropless grouped MLP
            rows = (expert_T == e).nonzero().squeeze(1)
            h = F.gelu(x_TD[rows] @ w1[e].t(), approximate="tanh")
            y_TD[rows] = weight_T[rows, None] * (h @ w2[e])
        return y_TD.view(x.shape), self.experts.bias                 # return_bias=True

    def forward(self, x):
        return self.dmoe(x)[0]                                       # the authors' block


def _authors_model(seed: int = 0):
    """A tiny Qwen-Image in the authors' shape: dense blocks 0-1, dMoE img_mlp in blocks 2-3."""
    model = tiny.qwen(seed)
    g = torch.Generator().manual_seed(seed + 100)
    for i in (2, 3):
        model.transformer_blocks[i].img_mlp = RefDMoE(g)
    return model


def _close(a, b):
    assert_rel_close(a, b, REL_FP32)


def test_dmoe_layer_forward_equals_megablocks_semantics():
    g = torch.Generator().manual_seed(0)
    ref = RefDMoE(g)
    ours = tmd.convert(tiny.qwen(), "last:1")
    layer = ours.transformer_blocks[3].img_mlp
    layer.moe.load_full_state_dict(tmd.dmoe_to_layer(dict(ref.state_dict()), layer, "img_mlp"))
    x = torch.randn(3, 16, D, generator=g)
    y_ref = ref(x)
    # several experts really are used (a test of the weights' orientation, not of one expert)
    assert len(set(ref.router.layer(x.reshape(-1, D)).argmax(-1).tolist())) >= 3
    with torch.no_grad():
        _close(layer(x), y_ref)


def test_authors_checkpoint_loads_and_round_trips(tmp_path):
    authors = _authors_model()
    sd = authors.state_dict()
    assert {k for k in sd if ".img_mlp." in k and "transformer_blocks.3." in k} == {
        "transformer_blocks.3.img_mlp." + k for k in tmd.megablocks.DMOE_KEYS}
    ours = tmd.convert(tiny.qwen(seed=5), "last:2")       # other dense weights: all overwritten
    # through a safetensors file, as a released checkpoint would come
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    tmd.load_authors_state_dict(ours, tmd.read_safetensors(tmp_path))
    inputs = tiny.qwen_inputs(batch=3)
    with torch.no_grad():
        _close(ours(**inputs)[0], authors(**inputs)[0])
    back = tmd.authors_state_dict(ours)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_bad_authors_state_dicts_are_named():
    sd = _authors_model().state_dict()
    ours = tmd.convert(tiny.qwen(), "last:1")                # block 2 not converted
    with pytest.raises(ValueError, match="blocks that were not converted"):
        tmd.load_authors_state_dict(ours, sd)
    ours = tmd.convert(tiny.qwen(), "last:2", moe={"num_experts": 2})
    with pytest.raises(ValueError, match=r"router.layer.weight has shape \(4, 32\), expected \(2, 32\)"):
        tmd.load_authors_state_dict(ours, sd)
    ours = tmd.convert(tiny.qwen(), "last:2")
    bad = dict(sd)
    del bad["transformer_blocks.3.img_mlp.experts.mlp.w2"]
    with pytest.raises(ValueError, match="missing dMoE key"):
        tmd.load_authors_state_dict(ours, bad)
    bad = dict(sd)
    del bad["proj_out.weight"]
    with pytest.raises(ValueError, match="missing \\['proj_out.weight'\\]"):
        tmd.load_authors_state_dict(ours, bad)
    # upcycled experts carry the dense biases: the dMoE layout cannot hold them
    with pytest.raises(ValueError, match="expert biases are not zero"):
        tmd.authors_state_dict(tmd.convert(tiny.qwen(), "last:1"))


def _ep2_worker(rank, world):
    groups = ParallelGroups.build(ep_size=2)
    authors = _authors_model()
    sd = authors.state_dict()
    ours = tmd.convert(tiny.qwen(seed=5), "last:2", groups=groups)
    tmd.load_authors_state_dict(ours, sd)
    assert ours.transformer_blocks[3].img_mlp.moe.experts.w1.shape == (2, D, FF)
    inputs = tiny.qwen_inputs(batch=2 + rank, seed=rank)
    with torch.no_grad():
        _close(ours(**inputs)[0], authors(**inputs)[0])
    back = tmd.authors_state_dict(ours)                      # gathers the experts
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_authors_checkpoint_at_ep2():
    run_distributed(_ep2_worker, 2)
