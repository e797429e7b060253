"""Parity of our MoE layer with Megatron-core's own MoELayer/TopKRouter inside GPTModel, at the
same weights: logits, every gradient and the logged routing losses. Used by the GPU script
(tests/gpu/test_megatron_gpu.py, NCCL, one GPU) and, on CPU, by tests/test_megatron.py under the
test-only fixture tests/megatron_cpu.py. Call after parallel_state.initialize_model_parallel
with TP = PP = EP = 1."""

from __future__ import annotations

import dataclasses
import re
from typing import Dict

import torch
import torch.nn.functional as F

from tests.tolerance import rel_diff

SEQ, MBS, VOCAB, E, FFN = 16, 2, 61, 8, 32


def transformer_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                moe_ffn_hidden_size=FFN, num_moe_experts=E, moe_router_topk=2,
                moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3, add_bias_linear=False,
                gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0,
                attention_dropout=0.0, init_method_std=0.1, moe_shared_expert_intermediate_size=48,
                moe_shared_expert_gate=True,
                use_cpu_initialization=True, moe_token_dispatcher_type="alltoall")
    base.update(kw)
    return TransformerConfig(**base)


def build_pair(config, device):
    """(Megatron's MoE GPT, ours) with identical weights."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from tagmoe_dist.integrations import megatron as tmm

    def gpt(spec):
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                        max_sequence_length=SEQ, share_embeddings_and_output_weights=False)
    torch.manual_seed(0)
    # Megatron's layer with its default dispatcher (its all-to-all one creates CUDA streams, so
    # it cannot run on CPU); the dispatcher does not change its numbers
    mconfig = dataclasses.replace(config, moe_token_dispatcher_type="allgather")
    theirs = GPTModel(config=mconfig, transformer_layer_spec=get_gpt_layer_local_spec(
        num_experts=E, moe_grouped_gemm=False), vocab_size=VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=False).to(device)
    ours = gpt(tmm.get_gpt_layer_local_spec(tmm.moe_spec(router="topk"))).to(device)
    ours.load_state_dict(to_ours(theirs.state_dict()))
    return theirs, ours


_EXPERT = re.compile(r"(.*)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight$")


def to_ours(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Megatron MoE GPT state dict -> ours (Megatron stores Linear weights [out, in])."""
    out, experts = {}, {}
    for k, v in sd.items():
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v.t()
        elif k.endswith("._extra_state"):
            continue
        elif ".mlp.router." in k:
            out[k.replace(".mlp.router.", ".mlp.moe.router.")] = v
        elif ".mlp.shared_experts.gate_weight" in k:
            out[k.replace(".mlp.shared_experts.gate_weight", ".mlp.moe.shared_expert.gate.weight")] = v
        elif ".mlp.shared_experts.linear_fc" in k:
            w = "w1" if ".linear_fc1." in k else "w2"
            out[k.split(".mlp.")[0] + f".mlp.moe.shared_expert.mlp.{w}"] = v.t()
        else:
            out[k] = v
    for (prefix, fc), per in experts.items():
        out[f"{prefix}.mlp.moe.experts.w{fc}"] = torch.stack([per[i] for i in range(len(per))])
    return out


def _grads_as_state(model) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compare(device, rtol: float = 2e-5) -> Dict[str, float]:
    """Forward + backward of both models on the same batch; returns the largest differences, each
    as max|ours - theirs| / max|theirs| in float64, and raises AssertionError if any exceeds `rtol`."""
    from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                         get_moe_layer_wise_logging_tracker)
    theirs, ours = build_pair(transformer_config(), device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g).to(device)
    cot = torch.randn(MBS, SEQ, VOCAB, generator=g).to(device)
    pos = torch.arange(SEQ, device=device)[None].expand(MBS, SEQ)
    mask = (torch.tril(torch.ones(1, 1, SEQ, SEQ, device=device)) < 0.5)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device))   # the shape Megatron uses
    report, logs = {}, {}
    for name, model in (("megatron", theirs), ("tagmoe", ours)):
        get_moe_layer_wise_logging_tracker().clear()
        model.train()
        out = model(tokens, pos, mask)
        (out * cot).sum().backward()
        report[f"{name}_logits"] = out.detach()
        logs[name] = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    diffs = {"logits": rel_diff(report["tagmoe_logits"], report["megatron_logits"])}
    want, got = to_ours(_grads_as_state(theirs)), _grads_as_state(ours)
    assert set(want) == set(got), sorted(set(want) ^ set(got))
    for k in want:
        diffs[f"grad {k}"] = rel_diff(got[k], want[k])
    for k in ("load_balancing_loss", "z_loss"):
        diffs[f"log {k}"] = rel_diff(logs["tagmoe"][k], logs["megatron"][k])
    bad = {k: v for k, v in diffs.items() if not v <= rtol}
    assert not bad, f"tagmoe differs from Megatron's MoELayer: {bad}"
    return diffs


def task_aware_smoke(device) -> Dict[str, float]:
    """Our task-aware router through Megatron's schedule with full recomputation, on `device`:
    forward, backward, finite gradients, the alignment loss logged."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    import tagmoe_dist as tm
    from tagmoe_dist.integrations import megatron as tmm
    from tagmoe_dist.task_context import TaskContext
    schema = tm.TaskSchema.from_dict({"levels": {"scope": ["local", "global"],
                                                 "type": {"values": ["a", "b"], "multi": True}}})
    config = transformer_config(recompute_granularity="full", recompute_method="uniform",
                                recompute_num_layers=1)
    ctx = TaskContext()
    spec = tmm.get_gpt_layer_local_spec(tmm.moe_spec(task_context=ctx, task_schema=schema,
                                                     router="task_aware", align_dim=16))
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, share_embeddings_and_output_weights=False).to(device)
    g = torch.Generator().manual_seed(2)
    data = [dict(tokens=torch.randint(0, VOCAB, (MBS, SEQ), generator=g).to(device),
                 task=torch.tensor([[0, 1], [1, -1]], device=device)) for _ in range(2)]
    pos = torch.arange(SEQ, device=device)[None].expand(MBS, SEQ)
    mask = (torch.tril(torch.ones(1, 1, SEQ, SEQ, device=device)) < 0.5)

    def step(it, m):
        b = next(it)
        with ctx.micro_batch(b["task"]):
            out = m(b["tokens"], pos, mask)
        return out, lambda o: (o.float().pow(2).mean(), {})
    forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter(data), model=[model],
                                   num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS,
                                   forward_only=False)
    norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    assert all(map(torch.isfinite, torch.tensor(norms))), "non-finite gradient"
    losses = tmm.moe_losses(model)
    assert set(losses) == {"aux", "z", "align"}, losses
    return {f"task_aware {k}": v for k, v in losses.items()}
