"""Public API: task schema, config validation, input layouts, weights across EP layouts,
task-level extraction, aux-loss-free bias."""

from pathlib import Path

import pytest
import torch

import tagmoe_dist as tm
from tests.dist_utils import run_distributed
from tests.tolerance import REL_FP32, assert_rel_close, assert_exact

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = tm.TaskSchema.from_yaml(ROOT / "configs/tasks/tagmoe_paper.yaml")


def cfg(**kw):
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)
    base.update(kw)
    return tm.MoEConfig(**base)


# ---------------------------------------------------------------- TaskSchema
def test_schema_yaml_round_trip(tmp_path):
    SCHEMA.to_yaml(tmp_path / "s.yaml")
    again = tm.TaskSchema.from_yaml(tmp_path / "s.yaml")
    assert again == SCHEMA and again.num_tags == 18 and again.level_names == ["scope", "type", "preservation"]
    d = {"scope": "local_edit", "type": ["object", "background"], "preservation": "identity"}
    mh = SCHEMA.multi_hot([d])
    assert SCHEMA.decode(mh[0]) == {"scope": "local_edit", "type": ["object", "background"],
                                    "preservation": ["identity"]}
    ids = SCHEMA.ids([{"scope": "generation"}, {"type": "pose", "scope": tm.UNKNOWN}])
    assert ids.tolist() == [[6, -1, -1], [-1, 3, -1]]
    assert_exact(SCHEMA.to_multi_hot(ids), SCHEMA.multi_hot(
        [{"scope": "generation"}, {"type": "pose"}]))
    plain = tm.TaskSchema.from_dict({"levels": {"scope": ["global", "local"]}})
    assert plain.levels[0].multi is False


@pytest.mark.parametrize("text,msg", [
    ("levels: {scope: {values: [a, a]}}", "duplicate"),
    ("levels: {scope: {values: [yes, no]}}", "quote it"),
    ("levels: {scope: {valuez: [a]}}", "unknown keys"),
    ("levels: {scope: [unknown]}", "reserved"),
    ("nolevels: 1", "'levels'"),
])
def test_schema_errors(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        tm.TaskSchema.from_yaml(p)


def test_descriptor_errors():
    with pytest.raises(ValueError, match="'scope': unknown value 'sky'"):
        SCHEMA.multi_hot([{"scope": "sky"}])
    with pytest.raises(ValueError, match="single-valued"):
        SCHEMA.multi_hot([{"scope": ["local_edit", "global_edit"]}])
    with pytest.raises(ValueError, match="unknown level"):
        SCHEMA.multi_hot([{"colour": "red"}])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,msg", [
    (dict(top_k=5), r"top_k=5 is greater than num_experts=4"),
    (dict(router="magic"), r"MoEConfig.router='magic'.*topk"),
    (dict(activation="relu6"), r"MoEConfig.activation='relu6'"),
    (dict(capacity_factor=0), r"capacity_factor"),
    (dict(task_conditioning="add"), r"task_conditioning.*router='task_aware'"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw)


def test_layer_input_errors():
    layer = tm.MoELayer(cfg(router="task_aware"), task_schema=SCHEMA)
    with pytest.raises(ValueError, match=r"hidden size 12 but MoEConfig.hidden_size=16"):
        layer(torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match=r"task\[1, 0\] = 7 is out of range for level 'scope': use 0..6"):
        layer(torch.randn(2, 3, 16), task=torch.tensor([[0, 0, 0], [7, 0, 0]]))
    with pytest.raises(ValueError, match=r"task has 3 rows but the input holds 2 samples"):
        layer(torch.randn(2, 3, 16), task=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected 3 \(integer level ids\) or 18"):
        layer(torch.randn(2, 3, 16), task=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a task schema"):
        tm.MoELayer(cfg(router="task_level"))
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by ep_size=3"):
        tm.ParallelGroups(ep_size=3, ep_rank=0).local_experts(4)
    with pytest.raises(ValueError, match="needs torch.distributed"):
        tm.ParallelGroups.build(ep_size=2)


def test_non_finite_logits_debug_flag():
    x = torch.randn(2, 3, 16)
    x[0, 1, 2] = float("nan")
    tm.MoELayer(cfg())(x)  # no check without the flag (it would sync the host)
    with pytest.raises(FloatingPointError, match="debug_checks"):
        tm.MoELayer(cfg(debug_checks=True))(x)


# ---------------------------------------------------------------- layouts
def test_layouts_agree():
    torch.manual_seed(0)
    c = cfg(router="task_aware", task_conditioning="add", aux_loss_type="seq")
    ref = tm.MoELayer(c, task_schema=SCHEMA)
    with torch.no_grad():
        ref.router.task_weight.normal_()
    sd = ref.state_dict()
    x_BSD = torch.randn(3, 5, 16)
    task = torch.tensor([[0, 1, -1], [2, -1, 3], [-1, -1, -1]])
    y = ref(x_BSD, task=task)
    losses = dict(ref.last_losses)
    for layout, x, kw in [
        ("sbh", x_BSD.transpose(0, 1).contiguous(), {}),
        ("th", x_BSD.reshape(15, 16), {"token_to_sample": torch.arange(3).repeat_interleave(5)}),
    ]:
        layer = tm.MoELayer(c.replace(input_layout=layout), task_schema=SCHEMA)
        layer.load_state_dict(sd)
        out = layer(x, task=task, **kw)
        back = out.transpose(0, 1) if layout == "sbh" else out.view(3, 5, 16)
        assert_rel_close(back, y, REL_FP32, layout)
        for k, v in losses.items():
            assert_rel_close(layer.last_losses[k], v, REL_FP32, f"{layout} {k}")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_chunking_does_not_change_results(activation):
    torch.manual_seed(0)
    c = cfg(num_experts=6, top_k=3, capacity_factor=0.8, activation=activation)
    a = tm.MoELayer(c)
    b = tm.MoELayer(c)
    b.load_state_dict(a.state_dict())
    b.dispatcher.buffer_bytes = 7 * 16 * 4        # 7 rows per chunk: big experts are split
    x = torch.randn(3, 9, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(3, 9, 16)
    a(xa).backward(g)
    b(xb).backward(g)
    assert_rel_close(xb.grad, xa.grad, REL_FP32, "dx")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_rel_close(pb.grad, pa.grad, REL_FP32, n)


# ---------------------------------------------------------------- weights across EP layouts
def _weights_any_ep(rank, world):
    c = cfg(num_experts=8, num_shared_experts=1, router="task_aware")
    torch.manual_seed(11)
    one = tm.MoELayer(c, task_schema=SCHEMA)
    torch.manual_seed(11)
    groups = tm.ParallelGroups.build(ep_size=world)
    ep = tm.MoELayer(c, groups=groups, task_schema=SCHEMA)
    full = ep.full_state_dict()
    for k, v in one.state_dict().items():
        assert torch.equal(full[k], v), f"{k} differs between ep=1 and ep={world}"
    # load other weights into the sharded layer: same function as the single-process layer
    torch.manual_seed(99)
    other = tm.MoELayer(c, task_schema=SCHEMA)
    ep.load_full_state_dict(other.state_dict())
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(rank))
    task = torch.tensor([[0, 1, 2], [3, -1, -1]])
    assert_rel_close(ep(x, task=task), other(x, task=task), REL_FP32)
    with pytest.raises(ValueError, match="missing keys"):
        ep.load_full_state_dict({k: v for k, v in full.items() if k != "router.weight"})


@pytest.mark.parametrize("world", [2, 4])
def test_full_state_dict_any_ep(world):
    run_distributed(_weights_any_ep, world)


# ---------------------------------------------------------------- task-level extraction
def test_task_level_submodel_matches_layer():
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg(router="task_level", num_experts=6, num_shared_experts=1), task_schema=SCHEMA)
    desc = {"scope": "local_edit", "type": ["object", "pose"]}
    sub = tm.extract_task_submodel(layer, desc)
    assert len(sub.expert_ids) == 2
    n_layer = sum(p.numel() for p in layer.experts.parameters())
    assert sum(p.numel() for n, p in sub.named_parameters() if n in ("w1", "w2")) == n_layer // 3
    x = torch.randn(3, 4, 16)
    y = layer(x, task=SCHEMA.multi_hot([desc] * 3))
    assert_rel_close(sub(x), y, REL_FP32)
    with pytest.raises(ValueError, match="router='task_level'"):
        tm.extract_task_submodel(tm.MoELayer(cfg()), desc)


# ---------------------------------------------------------------- aux-loss-free bias
def test_expert_bias_moves_towards_underloaded():
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg(expert_bias=True, top_k=1, aux_loss_coeff=0.0, expert_bias_update_rate=0.05))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0     # expert 0 wins for every token with x0 > 0
    x = torch.randn(4, 16, 16).abs()
    layer(x)
    assert int(layer.last_stats["load"][0]) == 64
    layer.update_expert_bias()
    assert float(layer.router.expert_bias[0]) < 0 < float(layer.router.expert_bias[1])
    total = torch.zeros(4)
    for step in range(80):
        layer(x)
        if step >= 60:
            total += layer.last_stats["load"]
        layer.update_expert_bias()
    assert int((total > 0).sum()) >= 3, total
    assert float(total.max() / total.sum()) < 0.8, total


def test_input_jitter_only_in_training():
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg(input_jitter=0.2))
    x = torch.randn(2, 8, 16)
    layer.eval()
    a, b = layer(x), layer(x)
    assert_rel_close(a, b, REL_FP32)                 # no noise at evaluation
    layer.train()
    logits = [layer.router.compute_logits(x.reshape(-1, 16), None, None) for _ in range(2)]
    assert not torch.equal(logits[0], logits[1])      # multiplicative noise while training


def _eval_equals_train_forward(rank, world):
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg(num_shared_experts=1, overlap_chunks=2),
                        groups=tm.ParallelGroups.build(ep_size=world))
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        a = layer(x)
    b = layer(x)
    assert_exact(a, b)
    assert not a.requires_grad and b.requires_grad


def test_expert_parallel_forward_under_no_grad():
    """Evaluation (torch.no_grad) takes the graph-free path of the shared expert and still equals
    the training forward."""
    run_distributed(_eval_equals_train_forward, 2)
