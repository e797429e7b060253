"""Upcycling a Megatron-core dense GPT (torch_dist checkpoint) to a Hugging Face Mixtral.

A tiny Llama-like Megatron GPTModel (RMSNorm, SwiGLU, rotary, GQA, no biases, untied output) is
built on CPU under the test-only fixture tests/megatron_cpu.py in one spawned gloo rank, saved
with megatron.core.dist_checkpointing in Megatron-LM's layout (latest_checkpointed_iteration.txt
+ iter_0000001/, the `args` Namespace in the common state), and its logits on fixed tokens are
stored. The converter output is loaded with transformers.AutoModelForCausalLM (no code of ours)
and compared in fp32. Saving needs no extra patch beyond the fixture: dist_checkpointing.save on
CPU with gloo works (it starts a multiprocessing Manager, hence the spawned rank).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from tagmoe_dist.upcycle import UpcycleOptions, upcycle  # noqa: E402
from tagmoe_dist.upcycle.__main__ import main as cli_main  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close  # noqa: E402

VOCAB, SEQ = 128, 9
TOKENS_BT = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
ARGS = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            group_query_attention=True, num_query_groups=2, kv_channels=16,
            normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
            add_qkv_bias=False, position_embedding_type="rope", rotary_base=5000,
            rotary_percent=1.0, rotary_interleaved=False, untie_embeddings_and_output_weights=True,
            max_position_embeddings=32, seq_length=32, qk_layernorm=False, num_experts=None)


def _build_and_save(rank, world, root: str, tokens_bt):
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tests.megatron_cpu import init_megatron

    init_megatron(seed=7)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        init_method_std=0.2)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
                         normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=32,
                     share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     rotary_base=5000).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them matter
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        pos = torch.arange(SEQ)[None].expand(tokens_bt.shape[0], SEQ)
        mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5
        logits = model(tokens_bt, pos, mask)
    root = Path(root)
    torch.save(logits, root / "megatron_logits.pt")
    # Megatron-LM layout, args in the common state
    with_args = root / "with_args"
    (with_args / "iter_0000001").mkdir(parents=True)
    (with_args / "latest_checkpointed_iteration.txt").write_text("1")
    sd = model.sharded_state_dict()
    sd["args"] = argparse.Namespace(**ARGS)
    sd["iteration"] = 1
    dist_checkpointing.save(sd, str(with_args / "iter_0000001"))
    # megatron-core on its own: no args stored
    bare = root / "bare"
    bare.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(bare))


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    run_distributed(_build_and_save, 1, str(root), TOKENS_BT)
    return root


def _logits(path: Path) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(TOKENS_BT).logits


def _convert(src: Path, dst: Path, **kw) -> Path:
    base = dict(num_experts=4, top_k=2, format="hf")
    base.update(kw)
    return upcycle(UpcycleOptions(src=src, dst=dst, **base), progress=False)


@pytest.mark.parametrize("num_experts,top_k,granularity", [(4, 2, 1), (8, 4, 2)])
def test_megatron_to_mixtral_logits_equal_dense(megatron_ckpt, tmp_path, num_experts, top_k,
                                                granularity):
    out = _convert(megatron_ckpt / "with_args", tmp_path / "moe", num_experts=num_experts,
                   top_k=top_k, granularity=granularity)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == num_experts
    assert cfg["num_key_value_heads"] == 2 and cfg["rope_parameters"]["rope_theta"] == 5000.0
    meta = json.loads((out / "upcycle_metadata.json").read_text())
    assert meta["source"]["model_type"] == "megatron_gpt"
    assert meta["options"]["src"] == str(megatron_ckpt / "with_args")
    ref = torch.load(megatron_ckpt / "megatron_logits.pt")
    assert 0 < ref.abs().max().item()
    diff = assert_rel_close(_logits(out), ref, REL_FP32)
    print(f"max |diff| / max |ref| = {diff:.2e}")
    assert not list(tmp_path.glob(".moe*")), "temporary directories left behind"


def test_megatron_config_json_and_cli(megatron_ckpt, tmp_path, capsys):
    src = tmp_path / "bare"
    shutil.copytree(megatron_ckpt / "bare", src)
    with pytest.raises(ValueError, match="stores no Megatron-LM `args`.*megatron_config.json"):
        _convert(src, tmp_path / "x")
    (src / "megatron_config.json").write_text(json.dumps(ARGS))
    assert cli_main(["--src", str(src), "--dst", str(tmp_path / "moe"), "--num-experts", "4",
                     "--top-k", "2", "--no-progress"]) == 0
    ref = torch.load(megatron_ckpt / "megatron_logits.pt")
    assert_rel_close(_logits(tmp_path / "moe"), ref, REL_FP32)


@pytest.mark.parametrize("change,match", [
    (dict(normalization="LayerNorm"), "normalization='LayerNorm': Mixtral uses RMSNorm"),
    (dict(swiglu=False), "swiglu/activation.*SwiGLU"),
    (dict(add_bias_linear=True), "add_bias_linear.*no linear biases"),
    (dict(rotary_interleaved=True), "rotary_interleaved=True"),
    (dict(position_embedding_type="learned_absolute"), "position_embedding_type"),
    (dict(num_query_groups=3), "linear_qkv has 128 rows"),
], ids=["layernorm", "gelu", "bias", "interleaved", "learned-pos", "groups"])
def test_unsupported_variants_are_named(megatron_ckpt, tmp_path, change, match):
    src = tmp_path / "src"
    shutil.copytree(megatron_ckpt / "bare", src)
    (src / "megatron_config.json").write_text(json.dumps({**ARGS, **change}))
    with pytest.raises(ValueError, match="looks like a Megatron-core checkpoint, but .*" + match):
        _convert(src, tmp_path / "moe")
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob(".moe*"))


def test_megatron_source_needs_format_hf(megatron_ckpt, tmp_path):
    with pytest.raises(ValueError, match="Megatron-core checkpoint .*--format hf only"):
        _convert(megatron_ckpt / "with_args", tmp_path / "checkpoints", format="tagmoe")
