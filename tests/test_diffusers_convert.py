"""tm.diffusers.convert: tiny diffusers MMDiTs built from configs, converted in memory; the output
(and the gradients of the dense weights) equal the dense transformer's at EP=1 and EP=2."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs `pip install -e .[diffusion]`")

import tagmoe_dist as tm  # noqa: E402
from tagmoe_dist.integrations import diffusers as tmd  # noqa: E402
from tagmoe_dist.parallel import ParallelGroups  # noqa: E402

from tests import diffusers_tiny as tiny  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "configs" / "tasks" / "tagmoe_paper.yaml"
TASK = torch.tensor([[0, 0, 0], [1, -1, 2]])          # scope / type / preservation ids, -1 unknown


def _close(a, b, rel=REL_FP32):
    if b is None:               # a weight the forward does not use
        assert a is None
        return
    assert_rel_close(a, b, rel)


@pytest.mark.parametrize("family", ["qwen", "flux", "sd3"])
def test_converted_output_equals_dense(family):
    build, inputs = tiny.BUILDERS[family]
    model = build()
    dense = copy.deepcopy(model)
    tmd.convert(model, "all")
    assert all(isinstance(m, tmd.DiffusersMoE) for m in tmd.moe_blocks(model).values())
    with torch.no_grad():
        _close(model(**inputs())[0], dense(**inputs())[0])


def test_paper_defaults_and_block_choice():
    model = tiny.qwen()
    schema = tm.TaskSchema.from_yaml(SCHEMA)
    tmd.convert(model, "last:2", task_schema=schema)
    info = tmd.info(model)
    assert info["blocks"] == [2, 3] and info["exact"] and info["combine_scale"] == 4.0
    cfg = tmd.moe_layers(model)[0].cfg
    assert (cfg.num_experts, cfg.top_k, cfg.activation, cfg.expert_mlp_bias, cfg.norm_topk_prob,
            cfg.router, cfg.ffn_hidden_size) == (4, 1, "gelu", True, False, "task_aware", 4 * 32)
    # MegaBlocks: weight 0.01, averaged over the MoE layers
    assert cfg.aux_loss_coeff == 0.01 and cfg.aux_loss_reduction == "mean"
    assert all(m.num_moe_layers == 2 for m in tmd.moe_layers(model))
    blocks = model.transformer_blocks
    assert type(blocks[1].img_mlp).__name__ == "FeedForward"                # not chosen: dense
    assert all(type(b.txt_mlp).__name__ == "FeedForward" for b in blocks)   # text stream: dense


def test_task_ids_train_the_router_and_give_the_alignment_loss():
    model = tiny.qwen().train()
    dense = copy.deepcopy(model)
    tmd.convert(model, [-1, 1], task_schema=tm.TaskSchema.from_yaml(SCHEMA))
    y = tmd.TaskTransformer(model)(**tiny.qwen_inputs(), task=TASK)[0]
    y_dense = dense(**tiny.qwen_inputs())[0]
    _close(y, y_dense)
    align = tmd.last_align(model)
    assert set(align) == {"loss", "acc"} and float(align["loss"]) > 0
    y.square().mean().backward()
    y_dense.square().mean().backward()
    for name, p in dense.named_parameters():
        if ".img_mlp." in name and name.split(".")[1] in ("1", "3"):
            continue
        # zero router: the balance and alignment losses reach no dense weight, the task loss
        # flows as through the dense FFN
        _close(dict(model.named_parameters())[name].grad, p.grad)
    for layer in tmd.moe_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0
    assert model.tagmoe_alignment.predictor[0].weight.grad.abs().sum() > 0
    with torch.no_grad():                     # no task ids (inference): no alignment loss
        model(**tiny.qwen_inputs())
    assert tmd.last_align(model) == {}


def test_gradient_checkpointing_gives_the_same_gradients():
    """Non-reentrant checkpointing recomputes blocks in backward, after the tasks block closed:
    the routers and the alignment head get the same gradients as without it."""
    schema = tm.TaskSchema.from_yaml(SCHEMA)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)                       # the alignment head's initialisation
        model = tmd.convert(tiny.qwen().train(), "last:2", task_schema=schema,
                            upcycle={"router_init": "normal", "router_std": 0.5})
        if checkpointing:
            model.enable_gradient_checkpointing()
        with tmd.tasks(model, TASK):
            y = model(**tiny.qwen_inputs())[0]
        loss = tmd.last_align(model)["loss"]
        y.square().mean().backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}))
        assert all(not m._replay for m in tmd.moe_blocks(model).values())
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6) and set(g0) == set(g1)
    assert any("router" in n for n in g0) and any("tagmoe_alignment" in n for n in g0)
    for n in g0:
        _close(g1[n], g0[n], rel=1e-5)


@pytest.mark.parametrize("moe,upcycle,exact", [
    ({"norm_topk_prob": True}, {"router_init": "normal"}, True),    # renormalised: any router
    ({}, {"router_init": "normal"}, False),                          # paper's weights: approximate
    ({}, {"expert_noise": 0.01}, False),
    ({"top_k": 2}, {}, True),
])
def test_recipes_exact_where_documented(moe, upcycle, exact):
    model = tiny.qwen()
    dense = copy.deepcopy(model)
    tmd.convert(model, "all", moe=moe, upcycle=upcycle)
    assert tmd.info(model)["exact"] is exact
    with torch.no_grad():
        y, y0 = model(**tiny.qwen_inputs())[0], dense(**tiny.qwen_inputs())[0]
    if exact:
        _close(y, y0)
    else:
        assert float((y - y0).abs().max()) > 1e-4


def test_bf16_transformer_keeps_its_dtype():
    model = tiny.qwen().to(torch.bfloat16)
    tmd.convert(model, "last:1")
    layer = tmd.moe_layers(model)[0]
    assert layer.experts.w1.dtype == torch.bfloat16
    with torch.no_grad():
        inputs = tiny.qwen_inputs()
        inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        assert model(**inputs)[0].dtype == torch.bfloat16


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(moe_blocks=[4]), "layer index 4 is out of range"),
    (dict(moe_blocks=[-5]), "out of range"),
    (dict(moe_blocks="last:5"), "'last:K' needs an integer K in 0..4"),
    (dict(moe_blocks="first:2"), "is not understood"),
    (dict(moe_blocks=[1, -3]), "moe_blocks: layer 1 is listed twice"),
    (dict(moe_blocks="none"), "selects no block"),
    (dict(moe={"num_experts": 3}, groups=ParallelGroups(ep_size=2)), "not divisible by the expert-parallel size 2"),
    (dict(moe={"ffn_hidden_size": 64}), "ffn_hidden_size=64 must be 128"),
    (dict(moe={"activation": "swiglu"}), "moe.activation='swiglu' must be 'gelu'"),
    (dict(moe={"router": "task_aware"}), "needs task_schema"),
    (dict(moe={"top_k": 9}), "moe: MoEConfig.top_k=9"),
    (dict(upcycle={"router": "zeros"}), "unknown upcycle option"),
])
def test_bad_arguments_fail_before_anything_is_built(kwargs, match):
    model = tiny.qwen()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        tmd.convert(model, **{"moe_blocks": "all", **kwargs})
    assert not tmd.moe_blocks(model) and getattr(model, "tagmoe", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="not a supported diffusers transformer.*QwenImage"):
        tmd.convert(torch.nn.Linear(4, 4))
    from diffusers import UNet2DModel
    with pytest.raises(ValueError, match="UNet2DModel is not a supported"):
        tmd.convert(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1))
    model = tmd.convert(tiny.qwen(), "last:1")
    with pytest.raises(ValueError, match="converted already"):
        tmd.convert(model, "last:1")
    with pytest.raises(ValueError, match="not converted"):
        tmd.tasks(tiny.qwen(), TASK)
    with pytest.raises(ValueError, match="without a task_schema"):
        with tmd.tasks(model, TASK):
            pass


def test_import_tagmoe_does_not_import_diffusers():
    code = ("import sys, tagmoe_dist as tm; assert 'diffusers' not in sys.modules; "
            "assert callable(tm.diffusers.convert)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------------- EP = 2
def _ep2_worker(rank, world):
    torch.manual_seed(0)
    schema = tm.TaskSchema.from_yaml(SCHEMA)
    groups = ParallelGroups.build(ep_size=2)
    with pytest.raises(ValueError, match="not divisible"):     # before any collective or layer
        tmd.convert(tiny.qwen(), "last:2", moe={"num_experts": 3}, groups=groups)
    model = tiny.qwen().train()
    dense = copy.deepcopy(model)
    single = copy.deepcopy(model)
    tmd.convert(model, "last:3", task_schema=schema, groups=groups, moe={"overlap_chunks": 2})
    tmd.convert(single, "last:3", task_schema=schema)
    layer = tmd.moe_layers(model)[0]
    assert layer.experts.global_ids == [2 * rank, 2 * rank + 1]
    # every rank its own batch (the all-to-all moves tokens between different batches)
    inputs = tiny.qwen_inputs(batch=2 + rank, seed=10 + rank)
    task = TASK.repeat(2, 1)[: 2 + rank]
    with tmd.tasks(model, task):
        y = model(**inputs)[0]
    y_dense = dense(**inputs)[0]
    with tmd.tasks(single, task):
        y_single = single(**inputs)[0]
    _close(y, y_dense)
    _close(y, y_single)
    y.square().mean().backward()
    y_dense.square().mean().backward()
    grads = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        if ".img_mlp." not in name or int(name.split(".")[1]) < 1:
            _close(grads[name].grad, p.grad)
    # full_state_dict gathers the experts: every copy is the dense FFN (scaled by 4 on the way out)
    full = layer.full_state_dict()
    w_in = dense.transformer_blocks[1].img_mlp.net[0].proj.weight
    assert full["experts.w1"].shape == (4, 32, 128)
    assert all(torch.equal(full["experts.w1"][e], w_in.t()) for e in range(4))


def test_ep2_equals_dense_and_ep1():
    run_distributed(_ep2_worker, 2)
