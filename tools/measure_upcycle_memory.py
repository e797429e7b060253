#!/usr/bin/env python
"""Measure the converter's peak memory on multi-shard dense checkpoints of growing size.

Writes random Llama-style checkpoints (bf16, ~200 MB safetensors shards, config.json, index; no
transformers model is built), runs `python -m tagmoe_dist.upcycle` on each in a child process and
reads the child's peak RSS (ru_maxrss from os.wait4, i.e. getrusage of that one child). If the
converter streams, peak RSS stays flat as the checkpoint grows: about the Python + torch baseline
plus one layer's FFN and one embedding matrix.

Linux folds the parent's RSS high-water mark into a child's ru_maxrss at exec (the child starts
from a copy of, or with vfork the very, parent address space). So this parent never imports torch:
checkpoints are generated in a child too, and the parent stays at a few MiB.

    python tools/measure_upcycle_memory.py                      # 0.5 GB and 1.2 GB checkpoints
    python tools/measure_upcycle_memory.py --sizes-gb 2 --keep  # keep the files under --workdir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, HEADS = 1536, 4096, 32000, 12


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    shapes = {f"{p}self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"}
    shapes.update({f"{p}mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}mlp.up_proj.weight": (INTER, HIDDEN),
                   f"{p}mlp.down_proj.weight": (HIDDEN, INTER),
                   f"{p}input_layernorm.weight": (HIDDEN,),
                   f"{p}post_attention_layernorm.weight": (HIDDEN,)})
    return shapes


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def write_dense_checkpoint(path: Path, target_bytes: int, shard_bytes: int) -> tuple[int, int]:
    """A random bf16 Llama-style checkpoint of about `target_bytes`; returns (bytes, shards)."""
    import torch
    from safetensors.torch import save_file

    fixed = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
             "model.norm.weight": (HIDDEN,)}
    per_layer = sum(_nbytes(s) for s in _layer_shapes(0).values())
    num_layers = max(1, round((target_bytes - sum(_nbytes(s) for s in fixed.values())) / per_layer))
    shapes = {"model.embed_tokens.weight": fixed["model.embed_tokens.weight"]}
    for i in range(num_layers):
        shapes.update(_layer_shapes(i))
    shapes.update({k: fixed[k] for k in ("model.norm.weight", "lm_head.weight")})

    # Group into shards first so file names can carry the final count.
    groups, size = [[]], 0
    for name, shape in shapes.items():
        if groups[-1] and size + _nbytes(shape) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(shape)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for idx, names in enumerate(groups):
        fname = f"model-{idx + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: fname for n in names})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": num_layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "dtype": "bfloat16"}))
    return total, len(groups)


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one child process, from its own rusage."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", default="0.5,1.2", help="dense checkpoint sizes (default: 0.5,1.2)")
    p.add_argument("--shard-mb", type=int, default=200, help="dense shard size (default: 200)")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--generate", nargs=3, metavar=("DIR", "BYTES", "SHARD_BYTES"),
                   help=argparse.SUPPRESS)  # child mode: write one checkpoint, print JSON
    args = p.parse_args(argv)
    if args.generate:
        total, shards = write_dense_checkpoint(Path(args.generate[0]), int(args.generate[1]),
                                               int(args.generate[2]))
        print(json.dumps([total, shards]))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    base_cmd = [sys.executable, "-m", "tagmoe_dist.upcycle"]
    baseline, _ = peak_rss_of([sys.executable, "-c", "import tagmoe_dist.upcycle.convert"])
    runs = [("G=1", [], "5GB"), ("G=2 drop=0.5", ["--granularity", "2", "--drop-ratio", "0.5"], "200MB")]
    rows = []
    try:
        for size_gb in (float(s) for s in args.sizes_gb.split(",")):
            src = work / f"dense-{size_gb}gb"
            src.mkdir(exist_ok=True)
            gen = subprocess.run([sys.executable, __file__, "--generate", str(src),
                                  str(int(size_gb * 1e9)), str(args.shard_mb * 10**6)],
                                 check=True, capture_output=True, text=True)
            dense_bytes, shards = json.loads(gen.stdout.strip().splitlines()[-1])
            for label, extra, out_shard in runs:
                dst = work / f"moe-{size_gb}gb"
                cmd = base_cmd + ["--src", str(src), "--dst", str(dst), "--num-experts",
                                  str(args.num_experts), "--top-k", str(args.top_k), "--format", "hf",
                                  "--max-shard-size", out_shard, "--force", "--no-progress", *extra]
                rss, secs = peak_rss_of(cmd)
                out_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
                rows.append((dense_bytes / 1e9, shards, args.shard_mb, label, out_bytes / 1e9,
                             out_shard, rss, rss - baseline, secs))
            if not args.keep:
                shutil.rmtree(src)
                shutil.rmtree(work / f"moe-{size_gb}gb", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"baseline (python + import tagmoe_dist.upcycle.convert): {baseline:.0f} MiB peak RSS")
    print(f"E={args.num_experts} K={args.top_k}; dense bf16 hidden={HIDDEN} intermediate={INTER}")
    header = ("dense GB", "shards", "shard MB", "recipe", "MoE GB", "out shard", "peak RSS MiB",
              "above baseline MiB", "seconds")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r[0]:.2f} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]} | {r[6]:.0f} | "
              f"{r[7]:.0f} | {r[8]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
