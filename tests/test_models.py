"""The reference GPT: shapes, fair dense baseline, YAML config, model-wide alignment loss, norms."""

from pathlib import Path

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_dist.gating.task_aware import per_sample_mean
from tagmoe_dist.models import GPT, GPTConfig, lm_loss
from tagmoe_dist.models import gpt as gpt_module
from tests.dist_utils import run_distributed
from tests.tolerance import REL_FP32, assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = tm.TaskSchema.from_yaml(ROOT / "configs/tasks/text_tasks.yaml")


def small_cfg(**kw):
    moe = dict(ffn_hidden_size=16, num_experts=4, top_k=2, router="task_aware",
               align_dim=12, align_hidden=16)
    moe.update(kw.pop("moe", {}))
    base = dict(vocab_size=50, seq_len=12, n_layer=2, n_head=2, d_model=16, moe=moe)
    base.update(kw)
    return GPTConfig(**base)


def batch(B=3, S=10, vocab=50):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    task = torch.tensor([[0, 1, -1], [1, 5, 0], [-1, -1, -1]])[:B]   # last sample unannotated
    return ids, task


@pytest.mark.parametrize("moe_every,n_moe", [(1, 2), (2, 1), (0, 0)])
@pytest.mark.parametrize("router", ["task_aware", "topk"])
def test_forward_backward_shapes(moe_every, n_moe, router):
    torch.manual_seed(0)
    model = GPT(small_cfg(moe_every=moe_every, moe={"router": router}), task_schema=SCHEMA)
    ids, task = batch()
    logits = model(ids, task=task)
    assert logits.shape == (3, 10, 50)
    assert len(model.moe_layers()) == n_moe
    if moe_every == 2:
        assert isinstance(model.blocks[1].ffn, tm.MoELayer), "every other block = blocks 1, 3, ..."
    labels = ids.clone()
    labels[:, :4] = -100
    lm_loss(logits, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in model.moe_layers():
        assert layer.last_stats["load"].shape == (4,)
    assert lm_loss(logits, labels, per_sample=True).shape == (3,)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_dense_active_params_match_moe():
    """Active parameters (SwiGLU, D=16, F=16, k=2, V=50, S=12, 2 layers):
        V*D + S*D + n_layer*(4*D^2 + 4*D) + 2*D + n_layer * 3*D*(k*F)
    the MoE model counts top_k of its E experts per token and leaves the router (E*D per MoE
    layer) and the alignment head out; the dense FFN is k*F wide, so both give the same number."""
    V, S, D, F, k, L = 50, 12, 16, 16, 2, 2
    want = V * D + S * D + L * (4 * D * D + 4 * D) + 2 * D + L * 3 * D * (k * F)
    counts = {}
    for arch, every, router in [("moe", 1, "task_aware"), ("moe", 1, "topk"), ("moe", 2, "topk"),
                                ("dense", 1, "topk"), ("moe", 0, "topk")]:
        model = GPT(small_cfg(arch=arch, moe_every=every, moe={"router": router}), task_schema=SCHEMA)
        counts[(arch, every, router)] = model.num_params(active_only=True)
    assert set(counts.values()) == {want}, counts
    moe = GPT(small_cfg(moe={"router": "topk"}))
    E = 4
    assert moe.num_params() == want + L * (E - k) * 3 * D * F + L * E * D   # all experts + routers


def test_shipped_configs_load_and_match():
    models = {}
    for name in ("tiny_tag", "tiny_topk", "tiny_dense"):
        cfg = GPTConfig.from_yaml(ROOT / f"configs/models/{name}.yaml")
        assert cfg.vocab_size == 260 and cfg.train["ep_size"] == 2
        models[name] = GPT(cfg)
    assert models["tiny_tag"].alignment is not None and models["tiny_topk"].alignment is None
    assert models["tiny_dense"].moe_layers() == []
    assert len({m.num_params(active_only=True) for m in models.values()}) == 1


def test_yaml_round_trip_and_errors(tmp_path):
    cfg = small_cfg(moe_every=2, task_schema="configs/tasks/text_tasks.yaml", train={"steps": 5})
    cfg.to_yaml(tmp_path / "m.yaml")
    again = GPTConfig.from_yaml(tmp_path / "m.yaml")
    assert again == cfg and again.moe_config == cfg.moe_config
    assert GPT(again).task_schema == SCHEMA          # schema path resolved from the repo root

    d = cfg.to_dict()
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({**d, "n_heads": 4})
    with pytest.raises(ValueError, match="missing required field.*d_model"):
        GPTConfig.from_dict({k: v for k, v in d.items() if k != "d_model"})
    with pytest.raises(ValueError, match="GPTConfig.moe: .*num_expertz"):
        GPTConfig.from_dict({**d, "moe": {**d["moe"], "num_expertz": 4}})
    with pytest.raises(ValueError, match="GPTConfig.moe: .*top_k"):
        GPTConfig.from_dict({**d, "moe": {**d["moe"], "top_k": 9}})
    with pytest.raises(ValueError, match="moe_every"):
        GPTConfig.from_dict({**d, "moe_every": 3})
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig.from_dict({**d, "n_head": 3})
    (tmp_path / "bad.yaml").write_text("vocab_size: 10\nseq_len: 4\nn_layer: 1\nn_head: 1\n"
                                       "d_model: 8\nmoe: {ffn_hidden_size: 8, num_experts: 2}\nlayers: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown GPTConfig field\(s\) \['layers'\]"):
        GPTConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="task schema"):
        GPT(small_cfg())                              # task_aware without any schema


def _signature(layer, x_BSD):
    B, S, D = x_BSD.shape
    probs_TE = torch.softmax(x_BSD.reshape(-1, D) @ layer.router.weight.t(), -1)
    return per_sample_mean(probs_TE, torch.arange(B).repeat_interleave(S), B)


def test_alignment_pooled_over_layers_once():
    """One alignment loss per forward, from the mean of both MoE layers' per-sample routing
    distributions, scaled by align_loss_coeff; its gradient reaches every router."""
    torch.manual_seed(0)
    model = GPT(small_cfg(moe={"aux_loss_coeff": 0.0, "align_loss_coeff": 0.5,
                               "align_target": "learned"}), task_schema=SCHEMA)
    layers = model.moe_layers()
    assert len(layers) == 2 and all(l._shared_alignment is model.alignment for l in layers)
    inputs = []
    hooks = [l.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach())) for l in layers]
    ids, task = batch()
    logits = model(ids, task=task)
    for h in hooks:
        h.remove()
    assert all("align" not in l.last_losses for l in layers), "layers must not add their own"

    task_BN = SCHEMA.to_multi_hot(task)
    g_BE = (_signature(layers[0], inputs[0]) + _signature(layers[1], inputs[1])) / 2
    want, want_acc = model.alignment.loss(g_BE, task_BN)
    assert_rel_close(model.last_align["loss"], want.detach(), REL_FP32)
    assert_rel_close(model.last_align["acc"], want_acc, REL_FP32)

    # Only the alignment loss drives the gradient: W_tag gets exactly coeff * dL/dW_tag.
    (logits * 0.0).sum().backward()
    (want_grad,) = torch.autograd.grad(0.5 * want, model.alignment.tag_embed)
    assert want_grad.abs().sum() > 0
    assert_rel_close(model.alignment.tag_embed.grad, want_grad, REL_FP32)
    for layer in layers:
        assert layer.router.weight.grad.abs().sum() > 0

    model.set_aux_loss_scale(0.25)
    model.zero_grad()
    (model(ids, task=task) * 0.0).sum().backward()
    assert_rel_close(model.alignment.tag_embed.grad, 0.25 * want_grad, REL_FP32)
    assert all(l.aux_loss_scale == 0.25 for l in layers)


def test_no_task_no_alignment_and_eval_logging():
    torch.manual_seed(0)
    model = GPT(small_cfg(), task_schema=SCHEMA)
    ids, task = batch()
    model(ids)
    assert model.last_align == {}
    with torch.no_grad():
        model(ids, task=task)
    assert set(model.last_align) == {"loss", "acc", "target_min_dist"}
    assert model.alignment.finish() == (None, None), "the model must leave the pool empty"


def _gpt_ep2(rank, world):
    groups = tm.ParallelGroups.build(ep_size=2)
    cfg = small_cfg()
    torch.manual_seed(0)
    model = GPT(cfg, groups, SCHEMA)
    torch.manual_seed(0)
    ref = GPT(cfg, task_schema=SCHEMA)
    ids, task = batch()
    data = [(ids, task), (ids.flip(0), task.flip(0))]      # each rank its own micro-batch
    ids_r, task_r = data[rank]
    logits = model(ids_r, task=task_r)
    lm_loss(logits, ids_r).backward()
    ref_total = 0.0
    for r, (ids_q, task_q) in enumerate(data):     # the reference sees both micro-batches
        ref_logits = ref(ids_q, task=task_q)
        if r == rank:
            assert_rel_close(logits, ref_logits, REL_FP32, "logits")
        ref_total = ref_total + lm_loss(ref_logits, ids_q)
    ref_total.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if ".experts." in name:        # local experts see both ranks' tokens through the all-to-all
            i = int(name.split(".")[1])
            ids_local = model.blocks[i].ffn.experts.global_ids
            want = want[ids_local[0]:ids_local[-1] + 1]
            got = p.grad
        else:                          # replicated weights: summed over data parallel
            got = p.grad.clone()
            torch.distributed.all_reduce(got)
        assert_rel_close(got, want, REL_FP32, name)


def test_gpt_ep2_matches_single_process():
    run_distributed(_gpt_ep2, 2)


def test_norm_implementation_attribute(monkeypatch):
    model = GPT(small_cfg(moe={"router": "topk"}))
    have_apex = gpt_module._FusedLayerNorm is not None
    assert model.norm_impl == ("apex" if have_apex else "torch")
    if not have_apex:
        assert isinstance(model.ln_f, torch.nn.LayerNorm)

    class FakeFused(torch.nn.LayerNorm):
        pass

    monkeypatch.setattr(gpt_module, "_FusedLayerNorm", FakeFused)
    model = GPT(small_cfg(moe={"router": "topk"}))
    assert model.norm_impl == "apex" and isinstance(model.blocks[0].ln_1, FakeFused)

    class BrokenFused(torch.nn.LayerNorm):        # apex without its CUDA extension
        def __init__(self, *a, **k):
            raise ImportError("fused_layer_norm_cuda")

    monkeypatch.setattr(gpt_module, "_FusedLayerNorm", BrokenFused)
    model = GPT(small_cfg(moe={"router": "topk"}))
    assert model.norm_impl == "torch" and type(model.ln_f) is torch.nn.LayerNorm
