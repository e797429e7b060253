"""Supported dense architectures and their Hugging Face MoE counterparts.

Source (dense)          Target (--format hf)    why this target
llama, mistral      ->  mixtral                 same attention; Mixtral renormalises top-k weights
qwen2               ->  qwen2_moe               q/k/v biases; norm_topk_prob=True, no shared expert

Configs are translated key by key from a whitelist instead of copied wholesale: a dense-only key
(mlp_bias, pretraining_tp) has no meaning in the MoE class, and a key the source left implicit must
be written with the *source* class's default, not inherited from the target class's default
(Mixtral defaults rope_theta to 1e6 and rms_norm_eps to 1e-5; Llama uses 1e4 and 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from tagmoe_dist.checkpoint.files import is_train_checkpoint
from tagmoe_dist.upcycle.hf import TensorSpec


@dataclasses.dataclass(frozen=True)
class Arch:
    source_type: str
    source_class: str
    target_type: str
    target_class: str
    defaults: Mapping[str, Any]  # source class defaults for keys that change the forward pass

    @property
    def supports_dense_layers(self) -> bool:
        # Qwen2-MoE has mlp_only_layers; Mixtral puts an MoE block in every decoder layer.
        return self.target_type == "qwen2_moe"


_COMMON_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
                    "rope_theta": 10000.0, "pad_token_id": None}
SUPPORTED = {
    "llama": Arch("llama", "LlamaForCausalLM", "mixtral", "MixtralForCausalLM",
                  {**_COMMON_DEFAULTS, "max_position_embeddings": 2048, "bos_token_id": 1,
                   "eos_token_id": 2, "sliding_window": None}),
    "mistral": Arch("mistral", "MistralForCausalLM", "mixtral", "MixtralForCausalLM",
                    {**_COMMON_DEFAULTS, "max_position_embeddings": 4096 * 32, "bos_token_id": 1,
                     "eos_token_id": 2, "num_key_value_heads": 8, "sliding_window": 4096}),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", "qwen2_moe", "Qwen2MoeForCausalLM",
                  {**_COMMON_DEFAULTS, "max_position_embeddings": 32768, "bos_token_id": None,
                   "eos_token_id": None, "num_key_value_heads": 32, "use_sliding_window": False,
                   "sliding_window": 4096, "max_window_layers": 28}),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")
_COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
           "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
           "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
           "dtype", "transformers_version")


def _supported_text() -> str:
    return ", ".join(f"{a.source_type} ({a.source_class})" for a in SUPPORTED.values())


def detect(config: Mapping[str, Any]) -> Arch:
    """The Arch of a dense config.json; unsupported models are refused, listing the supported ones."""
    model_type = config.get("model_type")
    classes = config.get("architectures") or []
    if model_type is None and classes:
        model_type = next((a.source_type for a in SUPPORTED.values()
                           if a.source_class in classes), None)
    arch = SUPPORTED.get(model_type)
    if arch is None:
        raise ValueError(f"config.json model_type {config.get('model_type')!r} (architectures "
                         f"{classes}) is not supported; supported dense sources: {_supported_text()}")
    if classes and arch.source_class not in classes:
        raise ValueError(f"config.json architectures {classes} is not a causal LM of "
                         f"{model_type!r}; supported dense sources: {_supported_text()}")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}; a dense {model_type} config must state them")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"config.json sets attention_bias/mlp_bias; {arch.target_class} has no "
                         "such biases, so the upcycled model could not equal the dense one")
    return arch


def _rope_parameters(src: Mapping[str, Any], arch: Arch) -> dict:
    # transformers v5 writes rope_parameters; v4 wrote rope_theta + rope_scaling. Normalise to the
    # v5 form and always state rope_theta, since the target class's default differs.
    if src.get("rope_parameters"):
        rope = dict(src["rope_parameters"])
    else:
        rope = dict(src.get("rope_scaling") or {})
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        if "rope_theta" in src:
            rope["rope_theta"] = src["rope_theta"]
    rope.setdefault("rope_theta", arch.defaults["rope_theta"])
    rope.setdefault("rope_type", "default")
    return rope


def _qwen2_layer_types(src: Mapping[str, Any], arch: Arch) -> list[str]:
    # Qwen2 and Qwen2-MoE derive layer_types by different rules, so state the dense one explicitly.
    if src.get("layer_types"):
        return list(src["layer_types"])
    use_sw = src.get("use_sliding_window", arch.defaults["use_sliding_window"])
    window = src.get("sliding_window", arch.defaults["sliding_window"]) if use_sw else None
    first_sliding = src.get("max_window_layers", arch.defaults["max_window_layers"])
    return ["sliding_attention" if window is not None and i >= first_sliding else "full_attention"
            for i in range(src["num_hidden_layers"])]


def moe_config(src: Mapping[str, Any], arch: Arch, *, num_experts: int, top_k: int,
               granularity: int, moe_layers: tuple[int, ...]) -> dict:
    """config.json of the MoE model: the dense one's attention/embedding settings plus MoE fields."""
    out = {k: src.get(k, arch.defaults.get(k)) for k in _COPIED
           if k in src or k in arch.defaults}
    out["num_key_value_heads"] = src.get("num_key_value_heads",
                                         arch.defaults.get("num_key_value_heads",
                                                           src["num_attention_heads"]))
    out["rope_parameters"] = _rope_parameters(src, arch)
    out["model_type"] = arch.target_type
    out["architectures"] = [arch.target_class]
    expert_size = src["intermediate_size"] // granularity
    if arch.target_type == "mixtral":
        out.update(sliding_window=src.get("sliding_window", arch.defaults["sliding_window"]),
                   intermediate_size=expert_size, num_local_experts=num_experts,
                   num_experts_per_tok=top_k, router_jitter_noise=0.0,
                   output_router_logits=False)
    else:
        use_sw = src.get("use_sliding_window", arch.defaults["use_sliding_window"])
        out.update(
            qkv_bias=True, use_sliding_window=use_sw,
            sliding_window=src.get("sliding_window", arch.defaults["sliding_window"]),
            max_window_layers=src.get("max_window_layers", arch.defaults["max_window_layers"]),
            layer_types=_qwen2_layer_types(src, arch),
            intermediate_size=src["intermediate_size"], moe_intermediate_size=expert_size,
            num_experts=num_experts, num_experts_per_tok=top_k,
            # Renormalised top-k makes the upcycled model exact; the default (False) does not.
            norm_topk_prob=True,
            # Qwen2-MoE always builds a shared expert; size 0 makes it an empty matmul whose output
            # is exactly zero (checked against the installed transformers in the tests).
            shared_expert_intermediate_size=0,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(src["num_hidden_layers"]) if i not in moe_layers],
            output_router_logits=False)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Output tensor names.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoeNames:
    router: str
    experts: tuple[tuple[str, str, str], ...]  # per expert: (gate, up, down)
    zeros: tuple[TensorSpec, ...]  # tensors that must exist and be zero (Qwen2-MoE shared expert)


def moe_names(arch: Arch, prefix: str, num_experts: int, hidden: int, dtype: str) -> MoeNames:
    """Names of one MoE layer's tensors; `prefix` is e.g. 'model.layers.3.'.

    Written in the classic per-expert layout, which every transformers version loads (v5 packs the
    experts into gate_up_proj/down_proj in memory and converts these keys on load).
    """
    if arch.target_type == "mixtral":
        base = f"{prefix}block_sparse_moe."
        experts = tuple((f"{base}experts.{e}.w1.weight", f"{base}experts.{e}.w3.weight",
                         f"{base}experts.{e}.w2.weight") for e in range(num_experts))
        return MoeNames(f"{base}gate.weight", experts, ())
    base = f"{prefix}mlp."
    experts = tuple((f"{base}experts.{e}.gate_proj.weight", f"{base}experts.{e}.up_proj.weight",
                     f"{base}experts.{e}.down_proj.weight") for e in range(num_experts))
    shared = f"{base}shared_expert."
    zeros = (TensorSpec(f"{shared}gate_proj.weight", (0, hidden), dtype),
             TensorSpec(f"{shared}up_proj.weight", (0, hidden), dtype),
             TensorSpec(f"{shared}down_proj.weight", (hidden, 0), dtype),
             TensorSpec(f"{base}shared_expert_gate.weight", (1, hidden), dtype))
    return MoeNames(f"{base}gate.weight", experts, zeros)


# ---------------------------------------------------------------------------------------------
# Source kinds: which --format each source upcycles to.
# ---------------------------------------------------------------------------------------------

SOURCE_KINDS = {
    "hf": "a Hugging Face dense decoder directory (config.json + *.safetensors) of "
          + _supported_text() + ", upcycled with --format hf (Mixtral / Qwen2-MoE)",
    "tagmoe": "a tagmoe_dist dense GPT checkpoint written by tagmoe_dist.train (the checkpoints "
              "directory holding 'latest' and model_config.yaml, one of its step_N directories, "
              "or the run directory), upcycled with --format tagmoe",
    "megatron": "a Megatron-core dense Llama-like GPT torch_dist checkpoint (the directory holding "
                "latest_checkpointed_iteration.txt or one iter_* directory; RMSNorm, SwiGLU, "
                "rotary, no biases, untied output layer), upcycled with --format hf (Mixtral)",
}

SOURCE_FORMATS = {"hf": "hf", "tagmoe": "tagmoe", "megatron": "hf"}  # the --format of each kind


def supported_sources_text() -> str:
    return "; ".join(f"{kind}: {text}" for kind, text in SOURCE_KINDS.items())


def _megatron_hint(src: Path) -> str | None:
    """Why `src` looks like a Megatron-core checkpoint, or None."""
    if (src / "latest_checkpointed_iteration.txt").is_file():
        return "latest_checkpointed_iteration.txt"
    meta = src / "metadata.json"
    if meta.is_file():
        try:
            if "sharded_backend" in json.loads(meta.read_text()):
                return "metadata.json names a sharded_backend (dist_checkpointing / torch_dist)"
        except (ValueError, OSError):
            pass
    if (src / ".metadata").is_file() and any(src.glob("*.distcp")):
        return "a torch.distributed.checkpoint directory (.metadata + *.distcp)"
    if (src / "mp_rank_00" / "model_optim_rng.pt").is_file():
        return "mp_rank_00/model_optim_rng.pt (legacy torch format)"
    if any(src.glob("iter_*")):
        return "iter_* directories"
    return None


def source_kind(src: Path) -> str:
    """'hf', 'tagmoe' or 'megatron' for a supported source; a ValueError listing the supported
    ones otherwise."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"--src {src} is not a directory; supported sources: "
                         f"{supported_sources_text()}")
    if (src / "config.json").is_file() or any(src.glob("*.safetensors")):
        return "hf"
    if is_train_checkpoint(src):
        return "tagmoe"
    if _megatron_hint(src) is not None:
        return "megatron"
    if any(src.glob("*model_states.pt")) or any(src.glob("*/*model_states.pt")):
        raise ValueError(f"--src {src} is a DeepSpeed checkpoint without tagmoe_dist's "
                         "model_config.yaml beside it, so the model is unknown. Supported sources: "
                         f"{supported_sources_text()}")
    raise ValueError(f"--src {src} is not a checkpoint this tool reads. Supported sources: "
                     f"{supported_sources_text()}")


def format_mismatch(kind: str, fmt: str, src: Path) -> str:
    if kind == "megatron":
        return (f"--src {src} looks like a Megatron-core checkpoint ({_megatron_hint(src)}); it "
                "upcycles to --format hf only (Megatron GPT -> Llama -> Mixtral); pass "
                "--format hf. "
                f"Supported sources: {supported_sources_text()}")
    if kind == "tagmoe":
        return (f"--src {src} is a tagmoe_dist GPT checkpoint; it upcycles to --format tagmoe "
                "only (the GPT's LayerNorm, learned positions and tied head have no Hugging Face "
                "MoE counterpart); pass --format tagmoe")
    return (f"--src {src} is a Hugging Face checkpoint; it upcycles to --format hf only (no "
            "tagmoe_dist model implements Llama/Mistral/Qwen2 attention); pass --format hf")
