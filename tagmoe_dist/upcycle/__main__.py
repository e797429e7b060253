"""Command line: python -m tagmoe_dist.upcycle --help."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from tagmoe_dist.upcycle.convert import upcycle
from tagmoe_dist.upcycle.options import FORMATS, ROUTERS, UpcycleOptions
from tagmoe_dist.upcycle.recipes import ROUTER_INITS, SCALINGS

_EPILOG = """\
At initialisation the output equals the dense model (fp32 logits within 1e-5 of their largest
magnitude) for plain and fine-grained (--granularity G) upcycling with --expert-noise 0 and
--drop-ratio 0, in both formats.
Drop-Upcycling, noise and --scaling cube-root (with SiLU) trade that exactness for training quality.

--format tagmoe example (a dense GPT trained with tagmoe_dist.train, then 8 experts, EP=2):
  python -m tagmoe_dist.upcycle --src runs/dense/checkpoints --dst runs/moe/checkpoints \
      --format tagmoe --num-experts 8 --top-k 2 --ep-size 2
  python -m torch.distributed.run --nproc_per_node 2 -m tagmoe_dist.train \
      --config runs/moe/checkpoints/model_config.yaml --deepspeed_config configs/deepspeed/zero2.json --resume
See docs/upcycling.md.
"""


def grouped_experts_note(dst: Path) -> str | None:
    """transformers 5.x runs MoE experts with torch's grouped GEMM by default
    (experts_implementation="grouped_mm"), which on CPU in fp32 needs every row stride to be a
    multiple of 16 bytes: an expert width (or hidden size) that is not a multiple of 4 fails with
    "strides should be multiple of 16 bytes" (seen with transformers 5.25, torch 2.13). Returns
    how to load such an export, or None."""
    try:
        cfg = json.loads((Path(dst) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    width = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    hidden = cfg.get("hidden_size")
    bad = {k: v for k, v in (("expert width", width), ("hidden size", hidden))
           if isinstance(v, int) and v % 4}
    if not bad:
        return None
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    return (f"{what} is not a multiple of 4: transformers' default grouped expert kernel fails "
            "on CPU in fp32 for it ('strides should be multiple of 16 bytes'); load this "
            "checkpoint with AutoModelForCausalLM.from_pretrained(path, "
            "experts_implementation=\"eager\") (see docs/upcycling.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tagmoe_dist.upcycle",
        description="Upcycle a dense checkpoint into a Mixture-of-Experts checkpoint: a Hugging "
                    "Face Llama/Mistral/Qwen2 directory into Mixtral/Qwen2-MoE (--format hf), a "
                    "Megatron-core dense Llama-like GPT (torch_dist) into Mixtral (--format hf), or a "
                    "tagmoe_dist dense GPT (DeepSpeed) checkpoint into a tagmoe_dist MoE GPT "
                    "checkpoint that the trainer resumes from (--format tagmoe).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="DIR",
                   help="dense checkpoint: a HF directory (config.json + model.safetensors or "
                        "sharded model-*.safetensors with model.safetensors.index.json), or a "
                        "tagmoe_dist.train checkpoints directory (latest + model_config.yaml), one "
                        "of its step_N directories or its run directory, or a Megatron-core "
                        "torch_dist GPT checkpoint (the directory holding "
                        "latest_checkpointed_iteration.txt, or one iter_* directory; "
                        "hyper-parameters from its stored args or a megatron_config.json beside it)")
    p.add_argument("--dst", required=True, metavar="DIR",
                   help="output directory; must not exist unless --force, and must neither be, "
                        "contain nor lie inside --src (symlinks resolved). For --format tagmoe it "
                        "is the new run's checkpoints directory, named 'checkpoints' (e.g. "
                        "runs/moe/checkpoints)")
    p.add_argument("--num-experts", required=True, type=int, metavar="N",
                   help="experts per MoE layer (a multiple of --granularity and of --ep-size)")
    p.add_argument("--top-k", required=True, type=int, metavar="K",
                   help="experts per token (<= N, a multiple of --granularity)")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: Mixtral layout for llama/mistral, Qwen2-MoE layout for qwen2, "
                        "loadable by transformers.AutoModelForCausalLM (HF sources). tagmoe: a "
                        "DeepSpeed checkpoint of the tagmoe_dist MoE GPT that `python -m "
                        "tagmoe_dist.train --resume` continues from, weights only (tagmoe_dist "
                        "GPT sources). Megatron sources: hf (Mixtral) (default: hf)")
    p.add_argument("--layers", default="all", metavar="all|every-other|LIST",
                   help="layers to upcycle: all, every-other (1,3,5,...) or a comma list such as "
                        "1,3; partial lists need a target with dense layers (Qwen2-MoE; for "
                        "tagmoe: every m-th block, and --top-k equal to --granularity) "
                        "(default: all)")
    p.add_argument("--granularity", type=int, default=1, metavar="G",
                   help="fine-grained upcycling: split each FFN's intermediate dimension into G "
                        "slices, one slice per expert, N/G copies of each (default: 1)")
    p.add_argument("--router", default="topk", choices=ROUTERS,
                   help="topk: plain top-k router. task_aware: TAG task-aware router, only for "
                        "--format tagmoe; its task terms start at zero, so step 0 is unchanged "
                        "(default: topk)")
    p.add_argument("--task-schema", default=None, metavar="YAML",
                   help="task schema for --router task_aware (--format tagmoe only; default: the "
                        "task_schema.yaml the source run wrote beside its checkpoints)")
    p.add_argument("--ep-size", type=int, default=1, metavar="P",
                   help="expert-parallel size the model will train with; N must be a multiple "
                        "of P. --format tagmoe writes it as train.ep_size; expert files are named "
                        "by global id, so the checkpoint also loads at other sizes (default: 1)")
    p.add_argument("--router-init", default="normal", choices=ROUTER_INITS,
                   help="normal: N(0, initializer_range) rows, one per virtual group. zeros: all "
                        "logits tie; exact on CPU via the recorded tie-break layout (default: normal)")
    p.add_argument("--scaling", default="down", choices=SCALINGS,
                   help="where the factor G of fine-grained upcycling goes: down (down_proj x G, "
                        "exact) or cube-root (G**(1/3) on gate, up and down; exact only for ReLU) "
                        "(default: down)")
    p.add_argument("--expert-noise", type=float, default=0.0, metavar="F",
                   help="add N(0, (F*std(w))^2) noise to every expert weight; breaks exactness "
                        "(default: 0)")
    p.add_argument("--drop-ratio", type=float, default=0.0, metavar="R",
                   help="Drop-Upcycling: per expert, re-initialise a fraction R of the "
                        "intermediate neurons from N(mean, std) of the weights; 0.5 is the paper's "
                        "choice; breaks exactness (default: 0)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB or 200MB; memory use does not depend "
                        "on it; --format hf only (tagmoe writes one file per expert) (default: 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --dst (atomically, after the new one is complete); "
                        "removes --dst itself and nothing else")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed for router, Drop-Upcycling and noise draws (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = UpcycleOptions(
            src=args.src, dst=args.dst, num_experts=args.num_experts, top_k=args.top_k,
            format=args.format, layers=args.layers, granularity=args.granularity,
            router=args.router, task_schema=args.task_schema, ep_size=args.ep_size,
            router_init=args.router_init, scaling=args.scaling, expert_noise=args.expert_noise,
            drop_ratio=args.drop_ratio, force=args.force, seed=args.seed,
            max_shard_size=args.max_shard_size)
        dst = upcycle(opts, progress=False if args.no_progress else None)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {dst}")
    note = grouped_experts_note(dst) if opts.format == "hf" else None
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if opts.format == "tagmoe":
        print(f"continue training with: python -m tagmoe_dist.train --config {dst}/model_config.yaml "
              "--deepspeed_config <ds.json> --resume   (under your launcher, "
              f"train.ep_size={opts.ep_size}); the optimizer state starts fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
