"""Megatron-core dense GPT checkpoint (torch_dist / dist_checkpointing) -> dense HF Llama directory.

`--format hf` upcycling of a Megatron source goes in two steps:
  1. this module reads the checkpoint on CPU with torch.distributed.checkpoint (no process group,
     no Megatron import) and writes an equivalent dense Hugging Face Llama directory
     (config.json + model.safetensors) into a temporary directory;
  2. the ordinary HF -> Mixtral converter (convert.py) upcycles that directory.
Step 1 holds the whole dense model in memory (not streamed); step 2 streams as usual.

Supported: a Llama-like GPT: RMSNorm, SwiGLU (gated_linear_unit + silu), rotary embeddings
(non-interleaved, rotary_percent 1, no rope scaling), no biases, untied output layer, GQA allowed,
no QK layernorm, default softmax scale. Everything else is refused with the setting named.

Hyper-parameters: the `args` Namespace that Megatron-LM's training loop stores in the
checkpoint's common state (common.pt). A checkpoint written without it (megatron-core used on its
own) needs a `megatron_config.json` beside it (in the iteration directory or the directory
holding latest_checkpointed_iteration.txt; when present it takes precedence over `args`), holding the same
keys as Megatron-LM's arguments,
e.g. {"num_attention_heads": 32, "num_query_groups": 8, "group_query_attention": true,
"kv_channels": 128, "normalization": "RMSNorm", "norm_epsilon": 1e-5, "swiglu": true,
"add_bias_linear": false, "position_embedding_type": "rope", "rotary_base": 500000,
"untie_embeddings_and_output_weights": true, "max_position_embeddings": 8192}.
The TransformerConfig names (layernorm_epsilon, gated_linear_unit + activation "silu") are
accepted too. Shapes (layers, hidden size, FFN width, vocabulary) come from the tensors.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from tagmoe_dist.checkpoint import loading

CONFIG_NAME = "megatron_config.json"
_PREFIX = "decoder.layers."


def _fail(src: Path, why: str) -> ValueError:
    return ValueError(f"--src {src} looks like a Megatron-core checkpoint, but {why}")


def checkpoint_dir(src: Path) -> Path:
    """The directory holding .metadata/*.distcp: `src` itself or the iteration `latest` names."""
    src = Path(src)
    if (src / ".metadata").is_file():
        return src
    latest = src / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        text = latest.read_text().strip()
        name = ("release" if text == "release"
                else f"iter_{int(text):07d}" if text.isdigit() else None)
        if name is None:
            raise _fail(src, f"latest_checkpointed_iteration.txt holds {text!r}, not an iteration")
        d = src / name
        if (d / ".metadata").is_file():
            return d
        if (d / "mp_rank_00").is_dir():
            raise _fail(src, f"{d} is in the legacy torch format (mp_rank_*/model_optim_rng.pt); "
                             "only torch_dist (dist_checkpointing) checkpoints are read. Re-save "
                             "it with --ckpt-format torch_dist")
        raise _fail(src, f"latest_checkpointed_iteration.txt names {d}, which holds no torch_dist "
                         "checkpoint (.metadata + *.distcp)")
    if (src / "mp_rank_00").is_dir():
        raise _fail(src, "it is in the legacy torch format (mp_rank_*/model_optim_rng.pt); only "
                         "torch_dist (dist_checkpointing) checkpoints are read")
    raise _fail(src, "it holds no torch_dist checkpoint (.metadata + *.distcp) and no "
                     "latest_checkpointed_iteration.txt; pass the iteration directory or its "
                     "parent")


def _settings(src: Path, ckpt: Path) -> dict[str, Any]:
    for d in (ckpt, Path(src)):
        if (d / CONFIG_NAME).is_file():
            return json.loads((d / CONFIG_NAME).read_text())
    common = ckpt / "common.pt"
    if common.is_file():
        try:
            state = loading.load(common, allow=[argparse.Namespace])
        except ValueError as e:
            raise _fail(src, f"{e} Write a {CONFIG_NAME} beside it instead (see "
                             "docs/upcycling.md)") from None
        args = state.get("args") if isinstance(state, dict) else None
        if isinstance(args, argparse.Namespace):
            return vars(args)
        if isinstance(args, dict):
            return dict(args)
    raise _fail(src, f"its common state stores no Megatron-LM `args`, so the attention layout "
                     f"(heads, query groups, rotary base, norm epsilon) is unknown; write a "
                     f"{CONFIG_NAME} beside it (see docs/upcycling.md)")


def _check_variant(src: Path, a: dict[str, Any]):
    def bad(key, value, why):
        return _fail(src, f"it sets {key}={value!r}: {why}; only Llama-like GPTs (RMSNorm, SwiGLU, "
                          "non-interleaved rotary, no biases, untied output layer) upcycle to "
                          "--format hf")

    norm = a.get("normalization", "LayerNorm")
    if norm != "RMSNorm":
        raise bad("normalization", norm, "Mixtral uses RMSNorm")
    swiglu = a.get("swiglu", a.get("gated_linear_unit", False))
    act = a.get("activation", a.get("activation_func", "silu" if a.get("swiglu") else "gelu"))
    act = getattr(act, "__name__", act)
    if not swiglu or act != "silu":
        raise bad("swiglu/activation", (swiglu, act), "Mixtral experts are SwiGLU (gated SiLU)")
    bias = a.get("add_bias_linear", not a.get("disable_bias_linear", False))
    if bias or a.get("add_qkv_bias"):
        raise bad("add_bias_linear/add_qkv_bias", (bias, a.get("add_qkv_bias")),
                  "Mixtral has no linear biases")
    pos = a.get("position_embedding_type", "learned_absolute")
    if pos != "rope":
        raise bad("position_embedding_type", pos, "Mixtral uses rotary embeddings")
    for key, ok, why in (("rotary_interleaved", False, "HF rotary is non-interleaved"),
                         ("rotary_percent", 1.0, "HF Mixtral rotates the whole head"),
                         ("use_rope_scaling", False, "rope scaling is not translated"),
                         ("rotary_seq_len_interpolation_factor", None,
                          "rope interpolation is not translated"),
                         ("qk_layernorm", False, "Mixtral has no QK layernorm"),
                         ("apply_layernorm_1p", False, "Mixtral's RMSNorm has no 1+w form"),
                         ("multi_latent_attention", False, "MLA is not Llama attention"),
                         ("softmax_scale", None, "HF uses 1/sqrt(head_dim)")):
        if a.get(key, ok) not in (ok, None):
            raise bad(key, a[key], why)
    if not a.get("untie_embeddings_and_output_weights", a.get("untie", False)) and \
            not a.get("_untied_by_tensors"):
        raise bad("untie_embeddings_and_output_weights", False,
                  "tied embeddings are not translated (the upcycled Mixtral would tie them "
                  "differently); untie them first")
    if a.get("num_experts") or a.get("num_moe_experts"):
        raise bad("num_experts", a.get("num_experts") or a.get("num_moe_experts"),
                  "the source is already an MoE")


def _load_tensors(src: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt))
    meta = reader.read_metadata()
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in meta.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and
              (k.startswith(("embedding.", "decoder.", "output_layer.")))}
    if not wanted:
        raise _fail(src, f"{ckpt} holds no model tensors (embedding.*, decoder.*, output_layer.*)")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    return wanted


def _layer_tensor(t: dict, src: Path, *names: str) -> torch.Tensor:
    for n in names:
        if _PREFIX + n in t:
            return t[_PREFIX + n]
    raise _fail(src, f"it lacks {_PREFIX + names[0]} (a GPT saved with non-homogeneous or "
                     "per-layer keys, or another architecture, is not read)")


def to_hf_llama(src: Path, out: Path) -> dict[str, Any]:
    """Write the dense Megatron GPT in `src` as a HF Llama directory `out`; return its config."""
    from safetensors.torch import save_file

    src = Path(src)
    ckpt = checkpoint_dir(src)
    a = _settings(src, ckpt)
    t = _load_tensors(src, ckpt)
    if "output_layer.weight" not in t:
        raise _fail(src, "it has no output_layer.weight (tied embeddings); only untied GPTs "
                         "(--untie-embeddings-and-output-weights) upcycle to --format hf")
    a = {**a, "_untied_by_tensors": True}
    _check_variant(src, a)
    leftover = sorted(k for k in t if k.endswith(".bias"))
    if leftover:
        raise _fail(src, f"it holds biases {leftover}; Mixtral has no linear biases")
    qkv = _layer_tensor(t, src, "self_attention.linear_qkv.weight")
    proj = _layer_tensor(t, src, "self_attention.linear_proj.weight")
    fc1 = _layer_tensor(t, src, "mlp.linear_fc1.weight")
    fc2 = _layer_tensor(t, src, "mlp.linear_fc2.weight")
    ln1 = _layer_tensor(t, src, "self_attention.linear_qkv.layer_norm_weight",
                        "input_layernorm.weight")
    ln2 = _layer_tensor(t, src, "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
    num_layers, qkv_out, hidden = qkv.shape
    heads = int(a["num_attention_heads"])
    groups = int(a.get("num_query_groups") or heads) if a.get("group_query_attention", True) \
        else heads
    head_dim = int(a.get("kv_channels") or hidden // heads)
    if heads % groups or qkv_out != (heads + 2 * groups) * head_dim:
        raise _fail(src, f"linear_qkv has {qkv_out} rows, not (heads {heads} + 2 x query groups "
                         f"{groups}) x kv_channels {head_dim}; check {CONFIG_NAME}/args")
    ffn = fc2.shape[2]
    if fc1.shape[1] != 2 * ffn:
        raise _fail(src, f"linear_fc1 has {fc1.shape[1]} rows, not 2 x {ffn} (not SwiGLU)")
    per = heads // groups
    out_t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t["embedding.word_embeddings.weight"],
        "model.norm.weight": t["decoder.final_layernorm.weight"],
        "lm_head.weight": t["output_layer.weight"],
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w = qkv[i].reshape(groups, per + 2, head_dim, hidden)
        out_t[p + "self_attn.q_proj.weight"] = w[:, :per].reshape(heads * head_dim, hidden)
        out_t[p + "self_attn.k_proj.weight"] = w[:, per].reshape(groups * head_dim, hidden)
        out_t[p + "self_attn.v_proj.weight"] = w[:, per + 1].reshape(groups * head_dim, hidden)
        out_t[p + "self_attn.o_proj.weight"] = proj[i]
        out_t[p + "mlp.gate_proj.weight"] = fc1[i, :ffn]
        out_t[p + "mlp.up_proj.weight"] = fc1[i, ffn:]
        out_t[p + "mlp.down_proj.weight"] = fc2[i]
        out_t[p + "input_layernorm.weight"] = ln1[i]
        out_t[p + "post_attention_layernorm.weight"] = ln2[i]
    dtype = out_t["lm_head.weight"].dtype
    eps = a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": out_t["lm_head.weight"].shape[0], "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": float(eps),
        "rope_theta": float(a.get("rotary_base", 10000)),
        "max_position_embeddings": int(a.get("max_position_embeddings")
                                       or a.get("seq_length") or 4096),
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out_t.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
