"""Megatron-core distributed checkpointing of our MoE layer inside Megatron's GPTModel, on CPU
with gloo: `dist_checkpointing.save(model.sharded_state_dict(), dir)` at one layout and
`dist_checkpointing.load` at another (EP 2 -> 1 and 4, EP 2 -> TP 2 x ETP 2 x EP 2, and back to
one process) give the same global weights, bit for bit, and the same logits. The layer is
task-aware with a gated shared expert, SwiGLU experts and an expert-bias buffer, so every kind of
tensor (EP-sharded, expert-TP-sharded with the SwiGLU split, TP-sharded shared expert,
replicated router and alignment head, buffers) crosses a layout change."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from tagmoe_dist.task_context import TaskContext  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.test_megatron import SCHEMA, batches, gpt, run_model, tconfig  # noqa: E402

LAYOUTS = {"ep1": dict(), "ep2": dict(ep=2), "ep4": dict(ep=4), "tp2ep2": dict(tp=2, ep=2, etp=2)}


def _build(layout: str, seed: int):
    from tests.megatron_cpu import init_megatron
    from tagmoe_dist.integrations import megatron as tmm
    par = LAYOUTS[layout]
    init_megatron(**par)
    torch.manual_seed(seed)      # a different seed per build: only loading can make them agree
    ctx = TaskContext()
    config = tconfig(tensor_model_parallel_size=par.get("tp", 1),
                     expert_model_parallel_size=par.get("ep", 1),
                     expert_tensor_parallel_size=par.get("etp", 1),
                     moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True,
                     moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    moe = tmm.moe_spec(task_context=ctx, task_schema=SCHEMA, router="task_aware", align_dim=8,
                       align_hidden=8, task_conditioning="add")
    model = gpt(config, tmm.get_gpt_layer_local_spec(moe))
    with torch.no_grad():                # buffers and zero-initialised weights get values too
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith(("expert_bias", "task_weight")):
                t.normal_(0, 0.3)
    return model.eval(), ctx


def _logits(model, ctx):
    """Full-vocabulary logits of a fixed batch (the same on every rank)."""
    from megatron.core import parallel_state as ps
    with torch.no_grad():
        out = run_model(model, ctx, batches(1, seed=7)[0])
    if ps.get_tensor_model_parallel_world_size() > 1:        # vocab-parallel output
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _moe_weights(model):
    """Global weights of every MoE layer (collective over its EP / TP groups)."""
    from tagmoe_dist.integrations import megatron as tmm
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        if isinstance(layer.mlp, tmm.MegatronMoE):
            out.update({f"{i}.{k}": v for k, v in layer.mlp.moe.full_state_dict().items()})
            if layer.mlp.alignment_head is not None:
                out.update({f"{i}.head.{k}": v.detach().clone()
                            for k, v in layer.mlp.alignment_head.state_dict().items()})
    return out


def _job(rank, world, root, layout, steps):
    from megatron.core import dist_checkpointing
    for action, name in steps:
        path = os.path.join(root, name)
        if action == "save":
            model, ctx = _build(layout, seed=1)
            ref = {"logits": _logits(model, ctx), "weights": _moe_weights(model)}
            if rank == 0:
                os.makedirs(path)
                torch.save(ref, path + ".ref.pt")
            dist.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), path)
            dist.barrier()
            continue
        ref = torch.load(path + ".ref.pt", weights_only=True)
        model, ctx = _build(layout, seed=100 + len(name))
        before = _logits(model, ctx)
        assert (before - ref["logits"]).abs().max() > 1e-3, "the test would pass without loading"
        state = dist_checkpointing.load(model.sharded_state_dict(), path)
        model.load_state_dict(state)
        weights = _moe_weights(model)
        assert set(weights) == set(ref["weights"])
        for k, v in ref["weights"].items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=0,
                                       msg=lambda m: f"{layout} <- {name}: {k} {m}")
        got, want = _logits(model, ctx), ref["logits"]
        scale = want.abs().max()
        err = (got - want).abs().max() / scale
        assert err < 1e-5, f"{layout} <- {name}: logits differ by {err:.2e} (relative)"


def test_dist_checkpoint_reshards_ep_and_tp(tmp_path):
    root = str(tmp_path)
    run_distributed(_job, 2, root, "ep2", [("save", "from_ep2")])
    run_distributed(_job, 4, root, "tp2ep2", [("load", "from_ep2"), ("save", "from_tp2ep2")])
    run_distributed(_job, 4, root, "ep4", [("load", "from_ep2"), ("load", "from_tp2ep2")])
    run_distributed(_job, 1, root, "ep1", [("load", "from_ep2"), ("load", "from_tp2ep2")])
