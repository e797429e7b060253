"""A tiny Hugging Face model directory to try the "Train your own model" walkthrough without a
download: random weights of a small Llama (or another supported family), a word-level tokenizer
with a chat template, and chat records over the built-in text task schema.

    python tools/make_tiny_hf.py --family llama --out models/llama-tiny \
        --chat-data data/chat_tiny.jsonl

Refuses to write into an existing --out or --chat-data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

FAMILY_SIZES = {
    "llama": dict(intermediate_size=256), "mistral": dict(intermediate_size=256),
    "qwen2": dict(intermediate_size=256),
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=128),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)] + ["copy", "reverse"]
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def make_model(family: str, out: Path, seed: int = 0) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               **FAMILY_SIZES[family])
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIALS[3:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(out))


def write_chat(path: Path, n: int = 256, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        payload = [rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))]
        reverse = i % 2 == 1
        answer = list(reversed(payload)) if reverse else payload
        task = ({"scope": "sequence_transform", "type": ["order_changing", "positional"]}
                if reverse else {"scope": "sequence_transform", "type": ["order_preserving"]})
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": ("reverse " if reverse else "copy ") + " ".join(payload)},
            {"role": "assistant", "content": " ".join(answer)}], "task": task}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llama", choices=sorted(FAMILY_SIZES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--chat-data", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in (args.out, args.chat_data):
        if p is not None and p.exists():
            ap.error(f"{p} already exists; choose another path")
    make_model(args.family, args.out, args.seed)
    print(f"wrote {args.out} ({args.family}, random weights)")
    if args.chat_data is not None:
        write_chat(args.chat_data, seed=args.seed)
        print(f"wrote {args.chat_data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
