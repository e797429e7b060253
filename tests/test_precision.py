"""bf16 and fp16: layer parameters in low precision, routing (logits, softmax, top-k) and the
routing losses in fp32; DeepSpeed bf16 and fp16 (dynamic loss scaling) engines with ZeRO-2 and
EP = 2 on CPU/gloo, each against an fp32 run of the same model.

Tolerances: bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) and fp16 11 (4.9e-4); one
layer's output rounds a few times, so outputs are compared relative to their scale at 3e-2
(bf16) and 5e-3 (fp16); routing losses, computed in fp32 from the same logits up to the input's
rounding, at 1e-2 relative. A top-k choice can flip between precisions when two experts' scores
tie within bf16's rounding; the inputs here are drawn so that no margin is that small (checked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tagmoe_dist as tm
from tests.dist_utils import run_distributed

SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation"],
    "type": {"values": ["object", "style"], "multi": True}}})
D, F_, E, K = 32, 16, 4, 2
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def _layer_pair(router: str, kernel: str, dtype, groups=None):
    cfg = tm.MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K, router=router,
                       z_loss_coeff=1e-3, expert_kernel=kernel, init_std=0.2)
    torch.manual_seed(0)
    low = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA).to(dtype)
    ref = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA)
    # the reference holds the same (rounded) weights in fp32: only the arithmetic differs
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in low.state_dict().items()})
    return low, ref


def _inputs(rank: int = 0):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(3, 8, D, generator=g)
    task = torch.tensor([[0, 1], [2, -1], [-1, 0]])
    return x, task


def _check_layer(low, ref, x, task, dtype):
    xl = x.to(dtype).requires_grad_(True)
    xr = x.to(dtype).float().requires_grad_(True)      # the same rounded input
    y_low, y_ref = low(xl, task=task), ref(xr, task=task)
    assert y_low.dtype == dtype
    # the routing decision is the same: computed in fp32 from the same input
    tol = TOL[dtype]
    assert _rel(y_low, y_ref) < tol, _rel(y_low, y_ref)
    for name, v in ref.last_losses.items():
        got = low.last_losses[name]
        assert got.dtype == torch.float32, (name, got.dtype)      # routing losses in fp32
        assert torch.isfinite(got), name
        assert abs(float(got) - float(v)) <= 1e-2 * max(abs(float(v)), 1e-6), (name, got, v)
    y_low.float().sum().backward()
    y_ref.sum().backward()
    assert _rel(xl.grad, xr.grad) < 2 * tol
    for (n, p), (_, q) in zip(low.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if q.grad.abs().max() > 0:
            assert _rel(p.grad, q.grad) < 5 * tol, (n, _rel(p.grad, q.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["torch", "grouped_mm"])
@pytest.mark.parametrize("router", ["topk", "task_aware"])
def test_low_precision_layer_matches_fp32(router, kernel, dtype):
    low, ref = _layer_pair(router, kernel, dtype)
    x, task = _inputs()
    _check_layer(low, ref, x, task, dtype)


def test_auto_kernel_in_bf16_runs_without_native():
    low, _ = _layer_pair("topk", "auto", torch.bfloat16)
    x, _ = _inputs()
    low(x.bfloat16())
    assert low.experts.kernel_for(x.bfloat16()).name == "torch"   # native is float32 only


def _ep_worker(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    groups = tm.ParallelGroups.build(ep_size=world)
    low, ref = _layer_pair("task_aware", "torch", dtype, groups)
    x, task = _inputs(rank)
    _check_layer(low, ref, x, task, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_layer_ep2(dtype):
    run_distributed(_ep_worker, 2, dtype)


# ---------------------------------------------------------------- DeepSpeed engines, ZeRO-2, EP=2
deepspeed = pytest.importorskip("deepspeed")
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(__file__).resolve().parents[1] / ".torch_extensions"))


class _Net(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        cfg = tm.MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K,
                           router="task_aware", z_loss_coeff=1e-3, init_std=0.2,
                           expert_kernel="torch", overlap_chunks=2)
        self.inp = torch.nn.Linear(D, D)
        self.moe = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA)

    def forward(self, x, task):
        return self.moe(torch.tanh(self.inp(x)), task=task).float().pow(2).mean()


def _engine_worker(rank, world, out_dir):
    from tagmoe_dist.integrations import deepspeed as tds
    deepspeed.init_distributed(dist_backend="gloo")
    groups = tds.parallel_groups(2)
    for precision in ("fp32", "bf16", "fp16"):      # one process group, three engines
        _one_engine(rank, precision, groups, tds, out_dir)


def _one_engine(rank, precision, groups, tds, out_dir):
    torch.manual_seed(0)
    model = tds.prepare_model(_Net(groups))
    params = tds.optimizer_param_groups(model)
    cfg = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg,
                                      optimizer=torch.optim.SGD(params, lr=0.1))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    out = []
    for step in range(3):
        x, task = _inputs(100 * step + rank)
        loss = engine(x.to(dtype), task)
        engine.backward(loss)
        engine.step()
        out.append({"loss": float(loss), "aux": {k: float(v) for k, v in model.moe.last_losses.items()},
                    "scale": float(getattr(engine.optimizer, "cur_scale", 1.0)),
                    "param_dtype": str(model.moe.experts.w1.dtype)})
    if rank == 0:
        (Path(out_dir) / f"{precision}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    run_distributed(_engine_worker, 2, str(out))
    return {p: json.loads((out / f"{p}.json").read_text()) for p in ("fp32", "bf16", "fp16")}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_low_precision_zero2_ep2(engine_runs, precision):
    ref, got = engine_runs["fp32"], engine_runs[precision]
    want_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
    for step, (a, b) in enumerate(zip(got, ref)):
        # step 0: one forward's rounding; later steps also carry the updates' rounding
        tol = (2e-2 if precision == "bf16" else 5e-3) * (1 if step == 0 else 4)
        assert a["param_dtype"] == want_dtype, a
        assert abs(a["loss"] - b["loss"]) <= tol * abs(b["loss"]), (step, a, b)
        for name, v in b["aux"].items():
            assert abs(a["aux"][name] - v) <= tol * max(abs(v), 1e-6), (step, name, a, b)
    if precision == "fp16":
        assert got[0]["scale"] == 2.0 ** 8     # dynamic loss scaling is on
