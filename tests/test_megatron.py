"""Megatron-core integration on CPU: TransformerConfig -> MoEConfig, the task context, the layer
specs (local, Transformer-Engine structure, decoder block), parameter flags for Megatron's DDP and
optimizer, losses through Megatron's autoscaler, the pooled alignment loss against plain
autograd, and activation recomputation. Megatron modules that call CUDA run under the test-only
fixture tests/megatron_cpu.py, which also fails any CUDA call made from tagmoe_dist."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import tagmoe_dist as tm  # noqa: E402
from tagmoe_dist.task_context import LayerTasks, SignatureSlot, TaskContext  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close, assert_dict_rel_close, assert_exact  # noqa: E402

SCHEMA = tm.TaskSchema.from_dict({"levels": {"scope": ["local", "global"],
                                             "type": {"values": ["a", "b", "c"], "multi": True}}})
SEQ, MBS, VOCAB = 8, 2, 38


def tconfig(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                num_moe_experts=4, moe_router_topk=2, add_bias_linear=False,
                gated_linear_unit=True, activation_func=F.silu, moe_aux_loss_coeff=0.01,
                moe_z_loss_coeff=1e-3, init_method_std=0.2, moe_token_dispatcher_type="alltoall")
    base.update(kw)
    return TransformerConfig(**base)


# ---------------------------------------------------------------- config mapping (no process group)
def test_config_mapping_defaults():
    from tagmoe_dist.integrations.megatron import moe_config_from_megatron
    c = moe_config_from_megatron(tconfig(moe_ffn_hidden_size=8))
    assert (c.hidden_size, c.ffn_hidden_size, c.num_experts, c.top_k) == (16, 8, 4, 2)
    assert c.score_function == "softmax" and c.norm_topk_prob       # softmax after top-k
    assert (c.aux_loss_coeff, c.aux_loss_type, c.z_loss_coeff) == (0.01, "micro_batch", 1e-3)
    assert c.activation == "swiglu" and c.input_layout == "sbh" and c.init_std == 0.2
    assert c.capacity_factor is None and c.shared_ffn_size == 0 and c.router == "topk"


def test_config_mapping_flags():
    from tagmoe_dist.integrations.megatron import moe_config_from_megatron
    c = moe_config_from_megatron(tconfig(
        moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.5,
        moe_expert_capacity_factor=1.25, moe_token_drop_policy="position",
        moe_router_load_balancing_type="seq_aux_loss", moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True, moe_router_enable_expert_bias=True,
        moe_router_score_function="sigmoid", moe_input_jitter_eps=0.1,
        gated_linear_unit=False, activation_func=F.gelu),
        router="task_aware", align_dim=12)
    assert c.score_function == "sigmoid" and c.norm_topk_prob and c.topk_scaling_factor == 2.5
    assert (c.capacity_factor, c.drop_policy, c.aux_loss_type) == (1.25, "position", "seq")
    assert c.shared_ffn_size == 24 and c.shared_expert_gate and c.expert_bias
    assert c.input_jitter == 0.1 and c.activation == "gelu"
    assert c.router == "task_aware" and c.align_dim == 12
    soft_pre = moe_config_from_megatron(tconfig(moe_router_pre_softmax=True))
    assert not soft_pre.norm_topk_prob
    none = moe_config_from_megatron(tconfig(moe_router_load_balancing_type=["none"],
                                            moe_aux_loss_coeff=[0.01]))
    assert none.aux_loss_coeff == 0.0


def test_grouped_gemm_and_dispatcher_are_mapped_not_ignored():
    from tagmoe_dist.integrations.megatron import moe_config_from_megatron
    assert moe_config_from_megatron(tconfig(moe_grouped_gemm=True)).expert_kernel == "grouped_mm"
    assert moe_config_from_megatron(tconfig(moe_grouped_gemm=False)).expert_kernel == "auto"
    # an explicit MoEConfig field wins over the mapping
    assert moe_config_from_megatron(tconfig(moe_grouped_gemm=True),
                                    expert_kernel="torch").expert_kernel == "torch"
    for dispatcher in ("allgather", "flex"):
        with pytest.raises(ValueError, match=f"moe_token_dispatcher_type='{dispatcher}'.*'alltoall'"):
            moe_config_from_megatron(tconfig(moe_token_dispatcher_type=dispatcher))


@pytest.mark.parametrize("kw,msg", [
    (dict(num_moe_experts=None), "num_moe_experts is None"),
    (dict(add_bias_linear=True), "add_bias_linear"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
    (dict(moe_router_num_groups=2, moe_router_group_topk=1), "moe_router_num_groups"),
    (dict(gated_linear_unit=True, activation_func=F.gelu), "activation_func"),
    (dict(moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0),
     "moe_pad_expert_input_to_capacity"),
])
def test_config_mapping_errors(kw, msg):
    from tagmoe_dist.integrations.megatron import moe_config_from_megatron
    with pytest.raises(ValueError, match=msg):
        moe_config_from_megatron(tconfig(**kw))


def test_unknown_override_is_an_error():
    from tagmoe_dist.integrations.megatron import moe_config_from_megatron
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        moe_config_from_megatron(tconfig(), routr="topk")


def test_moe_layer_pattern():
    from tagmoe_dist.integrations.megatron import moe_layer_pattern
    assert moe_layer_pattern(tconfig(num_layers=4, moe_layer_freq=2)) == [1, 0, 1, 0]
    assert moe_layer_pattern(tconfig(num_layers=3, moe_layer_freq=[0, 1, 1])) == [0, 1, 1]


# ---------------------------------------------------------------- task context (no process group)
def test_task_context_nesting_and_replay():
    ctx = TaskContext()
    layer = LayerTasks(ctx)
    assert ctx.current is None and layer.enter(True) == (None, False)
    t0, t1 = torch.tensor([[0, 1]]), torch.tensor([[1, -1]])
    with ctx.micro_batch(t0) as mb0:
        assert ctx.current is mb0 and mb0.index == 0
        with torch.no_grad():                   # checkpointed first pass: queued for replay
            assert layer.enter(True) == (mb0, False)
    with ctx.micro_batch(t1) as mb1:
        with torch.no_grad():
            layer.enter(True)
        with torch.no_grad():                   # eval-style no-grad forward: not queued
            assert layer.enter(False) == (mb1, False)
    # backward of micro-batch 0, then 1: recomputation outside any block pops in forward order
    assert layer.enter(True) == (mb0, True)
    assert layer.enter(True) == (mb1, True)
    assert layer.enter(True) == (None, False)
    with ctx.micro_batch(t0) as mb2:
        assert layer.enter(True) == (mb2, False)       # plain forward: nothing queued
    assert layer.enter(True) == (None, False)


# ---------------------------------------------------------------- with Megatron modules (1 rank)
def gpt(config, spec, **kw):
    from megatron.core.models.gpt import GPTModel
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, share_embeddings_and_output_weights=False, **kw)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(tokens=torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
                 task=torch.stack([torch.randint(0, 2, (MBS,), generator=g),
                                   torch.randint(-1, 3, (MBS,), generator=g)], 1),
                 cot=torch.randn(MBS, SEQ, VOCAB, generator=g)) for _ in range(n)]


def run_model(model, ctx, batch):
    pos = torch.arange(SEQ)[None].expand(MBS, SEQ)
    mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5
    with ctx.micro_batch(batch["task"]):
        return model(batch["tokens"], pos, mask)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def assert_grads_close(a, b, where):
    assert_dict_rel_close(a, b, REL_FP32, where)


def _specs_and_flags(rank, world):
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from tagmoe_dist.integrations import megatron as tmm

    ctx = TaskContext()
    moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router="task_aware", align_dim=8,
                       align_hidden=8)
    config = tconfig(num_layers=3)
    model = gpt(config, tmm.get_gpt_layer_local_spec(moe))
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert all(isinstance(m, tmm.MegatronMoE) for m in mlps)
    assert [m.layer_number for m in mlps] == [1, 2, 3]
    assert [m.alignment_head is not None for m in mlps] == [False, False, True]
    assert all(m.task_context is ctx for m in mlps)

    # Megatron's DDP / optimizer conventions: experts apart (allreduce=False), nothing marked
    # sequence_parallel (Megatron would sum those grads over TP)
    expert = {id(p) for m in mlps for p in m.moe.experts.parameters()}
    assert all(p.allreduce is False for m in mlps for p in m.moe.experts.parameters())
    assert not any(hasattr(p, "sequence_parallel") for m in mlps for p in m.parameters())
    groups = _get_param_groups([model], OptimizerConfig(lr=1e-3), None)
    in_expert_groups = {id(p) for g in groups if g["is_expert_parallel"] for p in g["params"]}
    assert in_expert_groups == expert

    # decoder block spec: dense layers keep Megatron's MLP, MoE layers get ours
    block = tmm.get_gpt_decoder_block_spec(tconfig(num_layers=4, moe_layer_freq=[1, 0, 1, 1]),
                                           use_transformer_engine=False, moe=moe)
    kinds = [s.submodules.mlp.module for s in block.layer_specs]
    assert kinds[0] is tmm.MegatronMoE and kinds[2] is tmm.MegatronMoE and kinds[3] is tmm.MegatronMoE
    assert kinds[1] is not tmm.MegatronMoE and kinds[1] is not MegatronMoELayer
    model4 = gpt(tconfig(num_layers=4, moe_layer_freq=[1, 0, 1, 1]), block)
    heads = [getattr(layer.mlp, "alignment_head", None) is not None for layer in model4.decoder.layers]
    assert heads == [False, False, False, True]

    # Transformer-Engine layer spec, structurally: TE is not installed here, so stand in for its
    # spec provider with Megatron's local one (no TE module is built)
    class FakeTE(LocalSpecProvider):
        def column_parallel_layer_norm_linear(self):
            return self.column_parallel_linear()
    gpt_layer_specs.TESpecProvider = FakeTE
    te = tmm.get_gpt_layer_with_transformer_engine_spec(moe)
    assert te.submodules.mlp is moe
    assert te.submodules.pre_mlp_layernorm is FakeTE().layer_norm()
    dense_te = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    with pytest.raises(ValueError, match="no pre-MLP norm"):
        tmm.with_moe(dense_te, moe)

    # a task-aware router without a task context is a user error
    with pytest.raises(ValueError, match="task_context"):
        gpt(config, tmm.get_gpt_layer_local_spec(tmm.moe_spec(task_schema=SCHEMA,
                                                                router="task_aware")))


def test_specs_and_parameter_flags():
    run_distributed(_specs_and_flags, 1)


def _same_as_moe_layer_and_scaled(rank, world):
    """The MLP slot computes exactly our MoELayer, and its routing losses follow Megatron's
    MoEAuxLossAutoScaler scale (set by the schedule) in backward."""
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                         clear_aux_losses_tracker,
                                                         get_moe_layer_wise_logging_tracker)
    from tagmoe_dist.integrations import megatron as tmm

    ctx = TaskContext()
    for router in ("topk", "task_level", "task_aware"):
        moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router=router, align_dim=8,
                           align_hidden=8, capacity_factor=1.5)
        model = gpt(tconfig(), tmm.get_gpt_layer_local_spec(moe))
        mlp = model.decoder.layers[1].mlp
        seen = {}
        mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out[0]))
        b = batches(1)[0]
        run_model(model, ctx, b)
        plain = tm.MoELayer(mlp.cfg, task_schema=SCHEMA)
        plain.load_state_dict(mlp.moe.state_dict(), strict=False)
        with torch.no_grad():
            assert_rel_close(plain(seen["x"], task=b["task"]), seen["y"], REL_FP32, router)

        # only the routing losses reach the router when the output is multiplied by zero
        router_grads = []
        for scale in (1.0, 0.25):
            MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), scale))
            model.zero_grad()
            out = run_model(model, ctx, b)
            (out * 0).sum().backward()
            first = model.decoder.layers[0].mlp.moe.router
            router_grads.append(torch.cat([p.grad.reshape(-1) for p in first.parameters()]))
        assert router_grads[0].abs().sum() > 0, router
        assert_rel_close(router_grads[1], 0.25 * router_grads[0], REL_FP32, router)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))

        # logged in Megatron's tracker under its names, per layer
        clear_aux_losses_tracker()
        run_model(model, ctx, b).sum().backward()
        tracker = get_moe_layer_wise_logging_tracker()
        want = {"load_balancing_loss", "z_loss"} | ({"align_loss"} if router == "task_aware" else set())
        assert {k for k, v in tracker.items() if v["values"].abs().sum() > 0} == want, router
        assert_rel_close(tracker["z_loss"]["values"][1], mlp.moe.last_losses["z"], REL_FP32, router)
        clear_aux_losses_tracker()


def test_mlp_slot_is_our_layer_and_losses_follow_megatron_scale():
    run_distributed(_same_as_moe_layer_and_scaled, 1)


def _alignment_against_autograd(rank, world):
    """The pooled alignment loss, injected layer by layer, gives the gradients of plain autograd
    on L = sum(out * cot) + coeff * L_align(mean over layers of the signatures)."""
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from tagmoe_dist.integrations import megatron as tmm

    ctx = TaskContext()
    moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router="task_aware", align_dim=8,
                       align_hidden=8, align_loss_coeff=0.7, task_conditioning="add")
    config = tconfig(num_layers=3, moe_layer_freq=[1, 0, 1])
    block = tmm.get_gpt_decoder_block_spec(config, use_transformer_engine=False, moe=moe)
    model, ref = gpt(config, block), gpt(config, block)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "task_weight" in n:
                p.normal_(0, 0.5)
    ref.load_state_dict(model.state_dict())
    b = batches(1, seed=3)[0]
    b["task"] = torch.tensor([[-1, -1], [1, 2]])      # an unannotated sample, an annotated one
    b["cot"] = 0.02 * b["cot"]                        # so that the alignment term is not drowned

    (run_model(model, ctx, b) * b["cot"]).sum().backward()

    # reference: collect the signatures with their graphs, pool them, plain autograd
    signatures = []
    moes = [layer.mlp for layer in ref.decoder.layers if isinstance(layer.mlp, tmm.MegatronMoE)]
    for m in moes:
        m._alignment = lambda y, mb, replay, m=m: (signatures.append(m._slot.take()), y)[1]
    out = run_model(ref, ctx, b)
    g_BE = sum(s for s, _ in signatures) / len(signatures)
    align, _ = moes[-1].alignment_head.loss(g_BE, signatures[0][1])
    ((out * b["cot"]).sum() + 0.7 * align).backward()
    assert len(signatures) == 2
    head = model.decoder.layers[2].mlp.alignment_head
    assert all(p.grad.abs().sum() > 0 for p in head.parameters())
    assert_rel_close(model.decoder.layers[2].mlp.last_align["loss"], align.detach(), REL_FP32)
    assert_grads_close(grads(model), grads(ref), "alignment vs autograd")


def test_alignment_injection_equals_autograd():
    run_distributed(_alignment_against_autograd, 1)


def _recompute(rank, world):
    """Full and selective ("mlp") recomputation give the gradients and logs of no recomputation,
    with micro-batches run by Megatron's schedule (the task context is read again in backward)."""
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                         get_moe_layer_wise_logging_tracker)
    from tagmoe_dist.integrations import megatron as tmm

    data = batches(3, seed=5)
    results = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1),
                      dict(recompute_granularity="selective", recompute_modules=["mlp"])):
        torch.manual_seed(11)
        ctx = TaskContext()
        config = tconfig(num_layers=2, **recompute)
        moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router="task_aware",
                           align_dim=8, align_hidden=8, align_loss_coeff=0.5)
        model = gpt(config, tmm.get_gpt_layer_local_spec(moe))
        if results:
            model.load_state_dict(results[0][2])

        def step(it, m):
            b = next(it)
            out = run_model(m, ctx, b)
            return out, lambda o, b=b: ((o * b["cot"]).sum(), {})
        clear_aux_losses_tracker()
        forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter(data),
                                       model=[model], num_microbatches=3, seq_length=SEQ,
                                       micro_batch_size=MBS, forward_only=False)
        logs = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        results.append((grads(model), logs, copy.deepcopy(model.state_dict())))
    for (g, logs, _), name in zip(results[1:], ("full", "selective")):
        assert_grads_close(g, results[0][0], f"recompute {name}")
        assert set(logs) == set(results[0][1]) == {"load_balancing_loss", "z_loss", "align_loss"}
        for k in logs:
            assert_rel_close(logs[k], results[0][1][k], REL_FP32, f"{name} log {k}")


def test_recomputation_sees_the_right_micro_batch():
    run_distributed(_recompute, 1)


def _parity(rank, world):
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from tests.gpu import megatron_parity
    diffs = megatron_parity.compare("cpu")
    assert diffs["logits"] <= REL_FP32
    megatron_parity.task_aware_smoke("cpu")


def test_topk_equals_megatron_moe_layer_on_cpu():
    """The GPU script's comparison (tests/gpu/megatron_parity.py), on CPU: Megatron's own
    MoELayer runs here only under the test fixture."""
    run_distributed(_parity, 1)


def _inside_tp2_ep2(rank, world):
    """Inside Megatron's GPTModel at TP=2 x EP=2 (4 ranks, 2 data-parallel replicas), each rank's
    MoE output equals the single-process layer with the gathered (global) weights, and the TP
    ranks of a replica agree on the routing losses. (Sequence parallelism inside GPTModel needs
    apex or Transformer Engine norms, absent here; the layer-level SP tests are in
    test_tensor_parallel.py.)"""
    from tests.megatron_cpu import init_megatron
    import torch.distributed as dist
    init_megatron(tp=2, ep=2, etp=2)
    from tagmoe_dist.integrations import megatron as tmm
    torch.manual_seed(1)                      # as Megatron's training: one seed for the TP group
    ctx = TaskContext()
    config = tconfig(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                     expert_tensor_parallel_size=2, moe_shared_expert_intermediate_size=16)
    moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router="task_aware", align_dim=8,
                       align_hidden=8)
    model = gpt(config, tmm.get_gpt_layer_local_spec(moe))
    mlp = model.decoder.layers[1].mlp
    assert mlp.moe.experts.w1.shape == (2, 16, 32)       # 2 of 4 experts, half of 2F = 32
    assert mlp.moe.experts.w1.tensor_model_parallel and mlp.moe.experts.w1.partition_dim == 2
    seen = {}
    mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out[0]))
    b = batches(1, seed=10 + rank // 2)[0]                # one batch per data-parallel replica
    out = run_model(model, ctx, b)                        # logits are vocab-parallel
    (out * b["cot"].chunk(2, dim=-1)[rank % 2]).sum().backward()
    # the model-wide alignment lives outside the layer, as in the Megatron module
    plain = tm.MoELayer(mlp.cfg, task_schema=SCHEMA, alignment=SignatureSlot())
    plain.load_full_state_dict(mlp.moe.full_state_dict())
    with torch.no_grad():
        assert_rel_close(plain(seen["x"], task=b["task"]), seen["y"].detach(), REL_FP32)
    losses = torch.tensor([tmm.moe_losses(model)[k] for k in ("aux", "z", "align")])
    both = [torch.empty_like(losses) for _ in range(2)]
    dist.all_gather(both, losses, group=mlp.groups.tp_group)
    assert_exact(both[0], both[1])


def test_inside_megatron_gpt_tp2_ep2():
    run_distributed(_inside_tp2_ep2, 4)


# ---------------------------------------------------------------- Megatron-LM --spec helpers
def _megatron_lm_spec_and_blend(rank, world, settings):
    """What `--spec tagmoe_dist.integrations.megatron_lm gpt_spec` builds from Megatron-LM's
    arguments, and the forward_step wrapper that takes task ids from the blend's dataset index."""
    import types
    from tests.megatron_cpu import init_megatron
    init_megatron()
    from tagmoe_dist.integrations import megatron as tmm
    from tagmoe_dist.integrations import megatron_lm
    assert not hasattr(megatron_lm, "gpt_spec")     # not inside a Megatron-LM run: helpers only
    loaded = megatron_lm.load_settings(settings)
    overrides, schema = loaded.moe, loaded.task_schema
    assert overrides == {"router": "task_aware", "align_dim": 8, "align_hidden": 8}
    assert schema.num_tags == SCHEMA.num_tags
    args = types.SimpleNamespace(transformer_impl="local", normalization="LayerNorm",
                                 qk_l2_norm=False, virtual_pipeline_model_parallel_size=None)
    config = tconfig(num_layers=3, moe_layer_freq=[1, 0, 1])
    ctx = TaskContext()
    spec = megatron_lm.spec_from_args(args, config, overrides, schema, ctx)
    model = gpt(config, spec)
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert [isinstance(m, tmm.MegatronMoE) for m in mlps] == [True, False, True]
    assert mlps[0].cfg.router == "task_aware" and mlps[2].alignment_head is not None

    # task ids: dataset 0 -> (local, a), dataset 1 -> (global, unknown), dataset 2 -> unknown
    table = loaded.task_table()
    torch.testing.assert_close(table, SCHEMA.to_multi_hot(torch.tensor([[0, 0], [1, -1], [-1, -1]])))
    data = [dict(tokens=b["tokens"], dataset_id=torch.tensor([2, 0])) for b in batches(2)]
    seen = []

    def forward_step(it, m):        # stands in for pretrain_gpt's: reads the batch, runs the model
        b = next(it)
        seen.append((b["tokens"], ctx.current.task.clone()))
        pos = torch.arange(SEQ)[None].expand(MBS, SEQ)
        return m(b["tokens"], pos, torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5)
    step = megatron_lm.blend_forward_step(forward_step, table, ctx, mlps[0].groups)
    it = iter(data)
    step(it, model).sum().backward()
    step(it, model)
    assert [t for t, _ in seen] == [d["tokens"] for d in data]     # no batch lost or repeated
    for _, task in seen:
        torch.testing.assert_close(task, table[torch.tensor([2, 0])])
    assert ctx.current is None
    assert mlps[2].last_align            # the alignment loss ran: task ids reached the layers
    bad = tm.ParallelGroups(pp_size=2, pp_rank=0)
    with pytest.raises(ValueError, match="pipeline-model-parallel-size 1"):
        megatron_lm.blend_forward_step(forward_step, table, ctx, bad)
    with pytest.raises(ValueError, match="--spec tagmoe_dist.integrations.megatron_lm"):
        megatron_lm.blend_forward_step(forward_step)(iter(data), model)   # no model built by --spec


def test_megatron_lm_spec_and_blend_task_ids(tmp_path):
    import yaml
    schema_file = tmp_path / "tasks.yaml"
    schema_file.write_text(yaml.safe_dump({"levels": {
        "scope": ["local", "global"], "type": {"values": ["a", "b", "c"], "multi": True}}}))
    settings = tmp_path / "moe.yaml"
    settings.write_text(yaml.safe_dump({"moe": {"router": "task_aware", "align_dim": 8,
                                                "align_hidden": 8},
                                        "task_schema": "tasks.yaml",
                                        "blend_tasks": [{"scope": "local", "type": ["a"]},
                                                        {"scope": "global"}, None]}))
    run_distributed(_megatron_lm_spec_and_blend, 1, str(settings))
