"""Tiny Hugging Face models of every supported family, built locally from small configs with
uneven sizes (random weights, nothing downloaded), saved as a user would have them on disk."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
              tie_word_embeddings=False, initializer_range=0.1)

CONFIGS = {
    "mixtral": dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2),
    # shared expert with its sigmoid gate; layer 1 kept dense; top-k weights not renormalised
    "qwen2_moe": dict(intermediate_size=44, moe_intermediate_size=20, num_experts=6,
                      num_experts_per_tok=3, shared_expert_intermediate_size=36,
                      norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=44, moe_intermediate_size=28, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=12),
    "llama": dict(intermediate_size=40),
    "mistral": dict(intermediate_size=36, sliding_window=None),
    "qwen2": dict(intermediate_size=40),
}
UPCYCLE = {
    "llama": dict(num_experts=4, top_k=2, granularity=2),
    "mistral": dict(num_experts=4, top_k=2),
    "qwen2": dict(num_experts=6, top_k=2, granularity=2),
}
FAMILIES = tuple(CONFIGS)


def build(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, **COMMON, **CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():     # Qwen routers start at zero: give them real (untied) logits
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.eval()


def save(model_type: str, out: Path, seed: int = 0) -> Path:
    model = build(model_type, seed)
    model.save_pretrained(str(out))
    return Path(out)


def make_tokenizer(out: Path, vocab_size: int = 90) -> None:
    """A small word-level tokenizer with a chat template, saved beside a model (fewer ids than
    the model's 101 rows: some tokenizer classes add a token of their own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)]
    vocab = {t: i for i, t in enumerate(specials + words + [f"w{i}" for i in range(vocab_size)])}
    vocab = {t: i for t, i in vocab.items() if i < vocab_size}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=specials[3:])
    fast.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    fast.save_pretrained(str(out))


def make_user_dir(model_type: str, out: Path, seed: int = 0) -> Path:
    """A model directory as a user holds it: weights, config, tokenizer with a chat template."""
    save(model_type, out, seed)
    make_tokenizer(out)
    return Path(out)


def write_chat_data(path: Path, n: int = 40, seed: int = 0) -> Path:
    """Chat records over the text_tasks schema: two tasks with different answers."""
    import json
    import random
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        payload = " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        if i % 2:
            msgs = [{"role": "user", "content": f"copy {payload}"},
                    {"role": "assistant", "content": payload}]
            task = {"scope": "sequence_transform", "type": ["order_preserving"]}
        else:
            msgs = [{"role": "system", "content": "w1"},
                    {"role": "user", "content": f"reverse {payload}"},
                    {"role": "assistant", "content": " ".join(reversed(payload.split()))}]
            task = {"scope": "sequence_transform", "type": ["order_changing", "positional"]}
        lines.append(json.dumps({"messages": msgs, "task": task}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_yaml(path: Path, src: Path, data: Path, upcycle=None, router="task_aware",
               **train) -> Path:
    import yaml
    d = {"hf": str(src), "moe": {"router": router, "overlap_chunks": 1, "align_dim": 16,
                                 "align_hidden": 16, "aux_loss_coeff": 0.01},
         "task_schema": "configs/tasks/text_tasks.yaml", "seq_len": 24,
         "train": {"data": str(data), "ep_size": 2, "lr": 3e-3, "seed": 0, **train}}
    if upcycle:
        d["upcycle"] = upcycle
    path.write_text(yaml.safe_dump(d))
    return path
