#!/usr/bin/env python
"""Forward+backward time and peak memory of one MoE layer on one GPU, bf16: tagmoe_dist against
Megatron-core's MoELayer (grouped GEMM with Transformer Engine or the grouped_gemm package when
installed, else its SequentialMLP, said in the table), DeepSpeed AutoEP's layer and Hugging
Face's Mixtral sparse block (its default experts implementation and grouped_mm).

    python tools/bench_gpu.py                        # all shapes and implementations, one GPU
    python tools/bench_gpu.py --json out.json --runs 20
    python tools/bench_gpu.py --cpu-smoke            # the same code on CPU, tiny shapes (gloo;
                                                     # Megatron under the test shim)

Shapes (hidden D, expert width F, experts E, top-k k), whole layers of the models they are named
after, 8192 tokens (4 sequences of 2048): mixtral D4096 F14336 E8 k2, fine D2048 F1408 E64 k8
(DeepSeek-MoE-like widths), qwen3 D2048 F768 E128 k8 (Qwen3-30B-A3B). SwiGLU experts, softmax
top-k routing renormalised over the k chosen, a load-balancing loss where the layer has one, no
token dropping. Every implementation gets the same input; each routes with its own router
weights, so loads differ slightly between them. Times: median of --runs steps after --warmup,
CUDA events around forward + backward. Memory: peak allocated during the timed steps, and the
allocation before them (weights, their gradients, the input). One process, one implementation after another, cache
emptied in between. Prints a markdown table and a JSON report (also to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagmoe_dist.ports import free_port  # noqa: E402

SHAPES = {"mixtral": (4096, 14336, 8, 2), "fine": (2048, 1408, 64, 8), "qwen3": (2048, 768, 128, 8)}
SMOKE_SHAPES = {"mixtral": (64, 32, 8, 2), "fine": (64, 16, 16, 4), "qwen3": (32, 16, 32, 4)}
IMPLS = ("tagmoe", "megatron", "autoep", "hf", "hf-grouped_mm")
AUX = 1e-2


# ---------------------------------------------------------------- the implementations
# Each builder returns (module, forward(x_SBD) -> y_SBD, variant text).

def build_tagmoe(D, F_, E, K, device, dtype, smoke):
    import tagmoe_dist as tm
    cfg = tm.MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K,
                       activation="swiglu", aux_loss_coeff=AUX, input_layout="sbh",
                       expert_kernel="auto")
    layer = tm.MoELayer(cfg).to(device=device, dtype=dtype)
    x = torch.zeros(8, D, device=device, dtype=dtype)
    kernel = layer.experts.kernel_for(x).name
    return layer, layer, f"kernel {kernel}"


def _megatron_init(smoke):
    from megatron.core import parallel_state as ps
    if smoke:
        from tests.megatron_cpu import patch      # Megatron's CUDA calls, on CPU (test-only shim)
        patch()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)


def build_megatron(D, F_, E, K, device, dtype, smoke):
    _megatron_init(smoke)
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import grouped_gemm_util
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig
    try:
        import transformer_engine  # noqa: F401
        te = True
    except ImportError:
        te = False
    grouped = te or grouped_gemm_util.grouped_gemm_is_available()
    config = TransformerConfig(
        num_layers=1, hidden_size=D, num_attention_heads=8, ffn_hidden_size=F_,
        moe_ffn_hidden_size=F_, num_moe_experts=E, moe_router_topk=K,
        moe_aux_loss_coeff=AUX, moe_router_load_balancing_type="aux_loss",
        # the all-to-all dispatcher is the one for EP; it needs CUDA streams, so not on CPU
        moe_token_dispatcher_type="allgather" if smoke else "alltoall",
        moe_grouped_gemm=grouped, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=smoke, moe_router_dtype="fp32", hidden_dropout=0.0)
    spec = get_moe_module_spec(use_te=te, num_experts=E, moe_grouped_gemm=grouped)
    layer = build_module(spec, config=config, layer_number=1).to(device=device, dtype=dtype)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device))
    variant = (f"{type(layer.experts).__name__}, {config.moe_token_dispatcher_type} dispatcher"
               + ("" if grouped else " (no TE / grouped_gemm installed)"))
    return layer, lambda x: layer(x)[0], variant


def _hf_config(D, F_, E, K, **kw):
    from transformers import MixtralConfig
    return MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                         num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=128, **kw)


def build_hf(D, F_, E, K, device, dtype, smoke, impl=None):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    kw = {} if impl is None else {"experts_implementation": impl}
    with torch.device(device):
        block = MixtralSparseMoeBlock(_hf_config(D, F_, E, K, **kw))
        for p in block.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02)
    block = block.to(dtype)

    def fwd(x_SBD):     # the block takes [B, S, D]; no aux loss inside (the model adds it)
        return block(x_SBD.transpose(0, 1)).transpose(0, 1)
    return block, fwd, f"experts_implementation={impl or 'default'}"


def build_autoep(D, F_, E, K, device, dtype, smoke):
    import deepspeed
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.utils import groups
    from transformers import MixtralForCausalLM
    deepspeed.init_distributed(dist_backend="gloo" if smoke else "nccl")
    if "ep_size_1" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(1)
    with torch.device(device):
        model = MixtralForCausalLM(_hf_config(D, F_, E, K))
    ae = AutoEP(model, parse_autoep_config({"enabled": True, "autoep_size": 1}))
    spec, = ae.ep_parser()
    # the public replace_moe_layers also re-targets transformers' output recorders, which fails
    # with transformers 5.25 (a registry signature change); only the layer is benchmarked here
    layer, _ = ae._replace_moe_layer_without_retarget(spec, 1, 0)
    del model
    layer = layer.to(device=device, dtype=dtype)

    def fwd(x_SBD):
        y = layer(x_SBD.transpose(0, 1))
        return (y[0] if isinstance(y, tuple) else y).transpose(0, 1)
    return layer, fwd, "AutoEPMoELayer, ep_size 1"


BUILDERS = {"tagmoe": build_tagmoe, "megatron": build_megatron, "autoep": build_autoep,
            "hf": build_hf,
            "hf-grouped_mm": lambda *a: build_hf(*a, impl="grouped_mm")}


# ---------------------------------------------------------------- measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl, shape, tokens, runs, warmup, device, dtype, smoke):
    D, F_, E, K = shape
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    module, fwd, variant = BUILDERS[impl](D, F_, E, K, device, dtype, smoke)
    module.train()
    B = max(1, tokens // 2048)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens // B, B, D, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(x.shape, device=device, dtype=dtype, generator=g)

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        fwd(x).backward(dy)

    for _ in range(warmup):
        step()
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del module, fwd, x, dy
    gib = 1 << 30
    return {"ms": statistics.median(times), "variant": variant,
            "peak_gib": None if peak is None else peak / gib,
            "resident_gib": None if base is None else base / gib}


def table(results, shapes) -> str:
    lines = ["| shape | D | F | E | k | implementation | variant | ms (fwd+bwd) | x Megatron | "
             "peak GiB | resident GiB |", "|" + "---|" * 11]
    for name in shapes:
        D, F_, E, K = shapes[name]
        rows = [r for r in results if r["shape"] == name]
        ref = next((r["ms"] for r in rows if r["impl"] == "megatron" and "ms" in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {D} | {F_} | {E} | {K} | {r['impl']} | error: "
                             f"{r['error'][:80]} | | | | |")
                continue
            ratio = f"{r['ms'] / ref:.2f}" if ref else ""
            fmt = (lambda v: "" if v is None else f"{v:.2f}")
            lines.append(f"| {name} | {D} | {F_} | {E} | {K} | {r['impl']} | {r['variant']} | "
                         f"{r['ms']:.2f} | {ratio} | {fmt(r['peak_gib'])} | "
                         f"{fmt(r['resident_gib'])} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write the JSON report here too")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, tiny shapes, 2 runs: checks the script, measures nothing")
    a = ap.parse_args()
    import torch.distributed as dist
    if a.cpu_smoke:
        device, backend, shapes = torch.device("cpu"), "gloo", SMOKE_SHAPES
        a.tokens, a.runs, a.warmup = 64, 2, 1
    else:
        if not torch.cuda.is_available():
            print("bench_gpu.py: no CUDA device; use --cpu-smoke to check the script on CPU",
                  file=sys.stderr)
            return 2
        device, backend, shapes = torch.device("cuda", 0), "nccl", SHAPES
        torch.cuda.set_device(device)
    shapes = {k: shapes[k] for k in a.shapes}
    # Megatron's parallel_state and DeepSpeed's groups need a (one-rank) process group
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))   # one process
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1)
    results = []
    for name, shape in shapes.items():
        for impl in a.impl:
            row = {"shape": name, "impl": impl}
            try:
                row.update(measure(impl, shape, a.tokens, a.runs, a.warmup, device,
                                   torch.bfloat16, a.cpu_smoke))
            except Exception as e:     # a missing or failing peer is a row, not the end
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    ours = {r["shape"]: r["ms"] for r in results if r["impl"] == "tagmoe" and "ms" in r}
    meg = {r["shape"]: r["ms"] for r in results if r["impl"] == "megatron" and "ms" in r}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bfloat16", "tokens": a.tokens,
              "runs": a.runs, "warmup": a.warmup, "smoke": a.cpu_smoke,
              "shapes": {k: dict(zip("DFEk", v)) for k, v in shapes.items()},
              "target_le_1x_megatron": {k: ours[k] <= meg[k] for k in ours if k in meg},
              "results": results}
    print(table(results, shapes))
    print(json.dumps(report))
    if a.json:
        tmp = a.json + ".tmp"
        Path(tmp).write_text(json.dumps(report, indent=1))
        os.replace(tmp, a.json)
    dist.destroy_process_group()
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
