"""Pipeline parallelism: a GPTModel with our MoE layers split over 2 stages and run by
Megatron-core's 1F1B schedule equals the same model on one stage, in every gradient (routing
losses aux and z, and the alignment loss pooled over the MoE layers of BOTH stages) and in the
MoE logs (Megatron's tracker after its pipeline reduction, and `moe_losses`). Also with full
activation recomputation, where layers re-run in backward and read their micro-batch again."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import tagmoe_dist as tm  # noqa: E402
from tagmoe_dist.task_context import TaskContext  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close  # noqa: E402

SCHEMA = tm.TaskSchema.from_dict({"levels": {"scope": ["local", "global", "gen"],
                                             "type": {"values": ["a", "b", "c"], "multi": True}}})
LAYERS, SEQ, MBS, VOCAB, MICRO = 4, 8, 3, 29, 4


def config(pp: int, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig
    base = dict(
        num_layers=LAYERS, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=4, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, moe_aux_loss_coeff=0.05, moe_z_loss_coeff=1e-2,
        moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True, init_method_std=0.2,
        moe_layer_freq=[1, 1, 0, 1], pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, moe_token_dispatcher_type="alltoall")
    base.update(kw)
    return TransformerConfig(**base)


def data():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(MICRO):
        task = torch.stack([torch.randint(0, 3, (MBS,), generator=g),
                            torch.randint(-1, 3, (MBS,), generator=g)], 1)
        task[0] = -1                                      # one unannotated sample
        out.append(dict(tokens=torch.randint(0, VOCAB, (MBS, SEQ), generator=g), task=task,
                        cot=torch.randn(MBS, SEQ, VOCAB, generator=g) * 0.05))
    return out


def build(cfg, ctx, groups):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from tagmoe_dist.integrations import megatron as tmm
    moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, groups=groups, router="task_aware",
                       align_dim=8, align_hidden=8, align_loss_coeff=0.5)
    spec = tmm.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, moe=moe)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def run(model, ctx, schedule, cfg):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    pos = torch.arange(SEQ)[None].expand(MBS, SEQ)
    mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        with ctx.micro_batch(b["task"]):      # on every stage, around the model call
            out = m(b["tokens"], pos, mask)
        return out, lambda o: ((o * b["cot"]).sum(), {})

    get_moe_layer_wise_logging_tracker().clear()      # a host global: no entries from earlier runs
    schedule(forward_step_func=forward_step, data_iterator=iter(data()), model=[model],
             num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)


def global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _pipeline(rank, world):
    from tests.megatron_cpu import init_megatron
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_no_pipelining, forward_backward_pipelining_without_interleaving)
    from megatron.core.transformer.moe.moe_utils import (get_moe_layer_wise_logging_tracker,
                                                         reduce_aux_losses_tracker_across_ranks)
    from tagmoe_dist.integrations import megatron as tmm

    # the single-stage reference (each rank computes its own copy)
    init_megatron(pp=1)
    groups = tm.ParallelGroups.from_megatron()
    ctx = TaskContext(groups)
    torch.manual_seed(3)
    ref = build(config(1), ctx, groups)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "task_weight" in n:
                p.normal_(0, 0.5)
    run(ref, ctx, forward_backward_no_pipelining, config(1))
    ref_state = ref.state_dict()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    ref_logs = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    ref_losses = tmm.moe_losses(ref)
    assert set(ref_logs) == {"load_balancing_loss", "z_loss", "align_loss"}
    # the alignment head learns (its predictor; the default tag targets are fixed, a buffer)
    head = {n: g for n, g in ref_grads.items() if "alignment_head." in n}
    assert head and all(g.abs().sum() > 0 for g in head.values()), sorted(head)

    # two stages: layers 1-2 (MoE, MoE) on stage 0, layers 3-4 (dense, MoE) on stage 1
    init_megatron(pp=2)
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1)):
        where = f"pp=2 {recompute or 'no recompute'} rank {rank}"
        groups = tm.ParallelGroups.from_megatron()
        assert (groups.pp_size, groups.pp_rank) == (2, rank)
        ctx = TaskContext(groups)
        cfg = config(2, **recompute)
        stage = build(cfg, ctx, groups)
        offset = rank * LAYERS // 2
        stage.load_state_dict({n: ref_state[global_name(n, offset)] for n in stage.state_dict()})
        run(stage, ctx, forward_backward_pipelining_without_interleaving, cfg)

        for n, p in stage.named_parameters():
            want = ref_grads.get(global_name(n, offset), torch.zeros_like(p))
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            assert_rel_close(got, want, REL_FP32, f"{where}: grad {n}")
        # logs: Megatron's tracker, reduced over the pipeline as its training loop does
        reduce_aux_losses_tracker_across_ranks()
        logs = {k: v["values"] for k, v in get_moe_layer_wise_logging_tracker().items()}
        assert set(logs) == set(ref_logs), where
        for k in logs:
            assert_rel_close(logs[k], ref_logs[k], REL_FP32, f"{where}: log {k}")
        losses = tmm.moe_losses(stage)
        assert set(losses) == set(ref_losses) == {"aux", "z", "align"}, where
        for k in losses:
            assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5), (where, k)

    # the layer that computes the alignment loss must be on the last stage
    if rank == 0:
        with pytest.raises(ValueError, match="last pipeline stage"):
            build(config(2, moe_layer_freq=[1, 1, 0, 0]), TaskContext(),
                  tm.ParallelGroups.from_megatron())


def test_two_stages_equal_one_stage():
    run_distributed(_pipeline, 2)
