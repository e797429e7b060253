"""Upcycling to Hugging Face MoE layouts: the MoE model must reproduce the dense logits at init.

Tiny dense Llama / Mistral / Qwen2 models with random weights are saved with transformers
(single-file and sharded), upcycled with `tagmoe_dist.upcycle`, loaded back with
AutoModelForCausalLM (no code of ours) and compared in fp32.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
# Qwen2-MoE builds its (size-0) shared expert with a no-op init that warns; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

from tagmoe_dist.upcycle import METADATA_NAME, UpcycleOptions, recipes, upcycle  # noqa: E402
from tagmoe_dist.upcycle.__main__ import main as cli_main  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close, assert_rel_far  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # A window shorter than the test sequence, so that copying sliding_window matters.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Qwen2 and Qwen2-MoE derive layer_types by different rules: layer 1 slides, layer 0 not.
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
}
TOKENS_BT = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def _save_dense(root: Path, arch: str, sharded: bool, **overrides) -> Path:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    path = root / f"{arch}-{'sharded' if sharded else 'single'}-{len(overrides)}"
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "1GB")
    return path


@pytest.fixture(scope="session")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    cache = {}

    def get(arch: str, sharded: bool = False) -> Path:
        if (arch, sharded) not in cache:
            cache[arch, sharded] = _save_dense(root, arch, sharded)
        return cache[arch, sharded]

    return get


def _logits(path: Path) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(TOKENS_BT).logits


def _convert(src: Path, dst: Path, **kw) -> Path:
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 2)
    return upcycle(UpcycleOptions(src=src, dst=dst, **kw), progress=False)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("granularity,num_experts,top_k,sharded", [
    (1, 4, 2, False), (2, 8, 4, True), (4, 8, 4, False)])
def test_upcycled_logits_equal_dense(dense, tmp_path, arch, granularity, num_experts, top_k,
                                     sharded):
    src = dense(arch, sharded)
    out = _convert(src, tmp_path / "moe", num_experts=num_experts, top_k=top_k,
                   granularity=granularity, max_shard_size="100KB" if sharded else "5GB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen2_moe" if arch.startswith("qwen2") else "mixtral")
    if arch.startswith("qwen2"):
        assert config["norm_topk_prob"] is True and config["shared_expert_intermediate_size"] == 0
    if sharded:
        assert len(set(json.loads((out / "model.safetensors.index.json").read_text())
                       ["weight_map"].values())) > 1
    assert_rel_close(_logits(out), _logits(src), REL_FP32, msg=f"{arch} G={granularity}: MoE vs dense")


@pytest.mark.parametrize("arch,granularity,num_experts,top_k", [
    ("llama", 2, 12, 8), ("llama", 4, 8, 4), ("mistral", 2, 8, 2), ("qwen2", 2, 12, 8),
    ("qwen2", 1, 4, 2)])
def test_tied_router_zeros_stays_exact(dense, tmp_path, arch, granularity, num_experts, top_k):
    out = _convert(dense(arch), tmp_path / "moe", num_experts=num_experts, top_k=top_k,
                   granularity=granularity, router_init="zeros")
    meta = json.loads((out / METADATA_NAME).read_text())
    if granularity > 1:
        assert meta["expert_layout"]["tie_set"] == list(recipes.topk_tie_set(num_experts, top_k))
    assert_rel_close(_logits(out), _logits(dense(arch)), REL_FP32)


def _slice_counts(layout: recipes.ExpertLayout, chosen) -> list[int]:
    return [sum(layout.slice_E[e] == s for e in chosen) for s in range(layout.granularity)]


def test_tie_break_needs_the_tie_set_layout(dense, tmp_path, monkeypatch):
    # torch.topk on CPU picks {1,3,6,...} among 12 tied experts, not the 8 lowest: a plain
    # group-major layout then over-weights one slice. Show it, then show the converter avoids it.
    num_experts, top_k, g = 12, 8, 2
    chosen = recipes.topk_tie_set(num_experts, top_k)
    plain = recipes.virtual_group_layout(num_experts, g)
    if len(set(_slice_counts(plain, chosen))) == 1:
        pytest.skip("this torch build breaks ties in a group-aligned way")
    monkeypatch.setattr(recipes, "topk_tie_set", lambda e, k: ())
    out = _convert(dense("llama"), tmp_path / "bad", num_experts=num_experts, top_k=top_k,
                   granularity=g, router_init="zeros")
    assert_rel_far(_logits(out), _logits(dense("llama")), 1e-3)


def test_virtual_group_layout_properties():
    for g in (1, 2, 3, 4):
        for num_experts in range(g, 8 * g + 1, g):
            for top_k in range(g, num_experts + 1, g):
                tie = recipes.topk_tie_set(num_experts, top_k)
                for first in ((), tie):
                    layout = recipes.virtual_group_layout(num_experts, g, first)
                    for v in range(layout.num_groups):
                        members = [e for e in range(num_experts) if layout.group_E[e] == v]
                        assert sorted(layout.slice_E[e] for e in members) == list(range(g))
                # Tied logits pick `tie`; with the tie-set layout every slice gets K/G copies.
                layout = recipes.virtual_group_layout(num_experts, g, tie)
                assert _slice_counts(layout, tie) == [top_k // g] * g
                # Distinct group scores pick whole groups, whatever the order inside a group.
                router_EH = recipes.router_weight(layout, 16, "normal", 1.0,
                                                  torch.Generator().manual_seed(num_experts))
                x_TH = torch.randn(32, 16, generator=torch.Generator().manual_seed(top_k))
                ids_TK = torch.topk(torch.softmax(x_TH @ router_EH.T, -1), top_k, -1).indices
                for row in ids_TK.tolist():
                    assert _slice_counts(layout, row) == [top_k // g] * g


def test_qwen2_keeps_unselected_layers_dense(dense, tmp_path):
    out = _convert(dense("qwen2"), tmp_path / "moe", num_experts=8, top_k=4, granularity=2,
                   layers="every-other")
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_only_layers"] == [0]
    assert_rel_close(_logits(out), _logits(dense("qwen2")), REL_FP32)


def test_v4_style_config_and_packed_gate_up_source(dense, tmp_path):
    # A v4-era config (rope_theta/rope_scaling at top level, no rope_parameters) and a dense FFN
    # stored packed as mlp.gate_up_proj ([2F, H], gate first): both must convert exactly.
    config = json.loads((dense("llama") / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    legacy = _copy_edited(dense("llama"), tmp_path / "legacy",
                          lambda d: (d / "config.json").write_text(json.dumps(config)))
    tensors = {}
    with safe_open(str(legacy / "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        tensors[p + "gate_up_proj.weight"] = torch.cat(
            [tensors.pop(p + "gate_proj.weight"), tensors.pop(p + "up_proj.weight")])
    packed = _copy_edited(legacy, tmp_path / "packed", lambda d: save_file(
        tensors, str(d / "model.safetensors"), metadata={"format": "pt"}))
    out = _convert(packed, tmp_path / "moe", num_experts=4, top_k=2, granularity=2)
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope == {"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0}
    ref = _convert(legacy, tmp_path / "ref", num_experts=4, top_k=2, granularity=2)
    t_out, t_ref = _tensors(out), _tensors(ref)
    assert sorted(t_out) == sorted(t_ref) and all(torch.equal(t_out[k], t_ref[k]) for k in t_out)
    assert_rel_close(_logits(out), _logits(legacy), REL_FP32)


# --------------------------------------------------------------------------- recipes


def test_cube_root_scaling_follows_its_formula():
    gen = torch.Generator().manual_seed(0)
    gate_FH, up_FH, down_HF = (torch.randn(s, generator=gen) for s in ((32, 8), (32, 8), (8, 32)))
    recipe = recipes.ExpertRecipe(granularity=4, scale_factor=4.0, scaling="cube-root")
    gate, up, down = recipes.build_expert(gate_FH, up_FH, down_HF, 2, recipe, 0, 0, 0)
    c = 4.0 ** (1 / 3)
    assert_rel_close(gate, gate_FH[16:24] * c, REL_FP32)
    assert_rel_close(up, up_FH[16:24] * c, REL_FP32)
    assert_rel_close(down, down_HF[:, 16:24] * c, REL_FP32)
    assert not recipe.exact and recipes.ExpertRecipe(4, 4.0, "down").exact
    assert recipes.required_scale(8, 4, 2, renormalised=True) == 2.0
    assert recipes.required_scale(16, 4, 2, renormalised=False) == 8.0  # E*G/K, uniform router


def test_cube_root_is_exact_for_relu_only(dense, tmp_path):
    src = _save_dense(tmp_path, "llama", False, hidden_act="relu")
    out = _convert(src, tmp_path / "moe", num_experts=8, top_k=4, granularity=4,
                   scaling="cube-root")
    assert_rel_close(_logits(out), _logits(src), REL_FP32)
    silu = _convert(dense("llama"), tmp_path / "silu", num_experts=8, top_k=4, granularity=4,
                    scaling="cube-root")
    assert_rel_far(_logits(silu), _logits(dense("llama")), 1e-3)  # approximate


def test_config_keys_left_implicit_take_the_source_defaults(tmp_path):
    # Mixtral's own defaults (rope_theta 1e6, rms_norm_eps 1e-5, 8 kv heads) differ from Llama's;
    # a hand-written minimal config must still convert to the same model.
    src = _save_dense(tmp_path, "llama", False, num_key_value_heads=4)
    minimal = {k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "vocab_size")}
    (src / "config.json").write_text(json.dumps({"model_type": "llama", **minimal}))
    out = _convert(src, tmp_path / "moe")
    config = json.loads((out / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-6 and config["num_key_value_heads"] == 4
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert_rel_close(_logits(out), _logits(src), REL_FP32)


def test_drop_upcycling_reinitialises_the_expected_fraction():
    gen = torch.Generator().manual_seed(0)
    gate_FH = torch.randn(512, 256, generator=gen) * 0.02 + 0.01
    up_FH = torch.randn(512, 256, generator=gen) * 0.03
    down_HF = torch.randn(256, 512, generator=gen) * 0.05
    recipe = recipes.ExpertRecipe(granularity=2, scale_factor=2.0, drop_ratio=0.5)
    gate, up, down = recipes.build_expert(gate_FH, up_FH, down_HF, 1, recipe, 7, 0, 3)
    rows_gate = (gate != gate_FH[256:]).any(1)
    rows_up = (up != up_FH[256:]).any(1)
    cols_down = (down != down_HF[:, 256:] * 2).any(0)
    assert rows_gate.sum().item() == 128  # round(0.5 * 256) neurons per expert
    assert torch.equal(rows_gate, rows_up) and torch.equal(rows_gate, cols_down)
    for new, old in ((gate, gate_FH[256:]), (up, up_FH[256:]), (down / 2, down_HF[:, 256:])):
        assert abs(new.mean() - old.mean()) < 0.1 * old.std()
        assert abs(new.std() / old.std() - 1) < 0.05
    other = recipes.build_expert(gate_FH, up_FH, down_HF, 1, recipe, 7, 0, 4)[0]
    assert not torch.equal((other != gate_FH[256:]).any(1), rows_gate)  # per-expert draw


def test_drop_and_noise_end_to_end_are_seeded(dense, tmp_path):
    kw = dict(num_experts=4, top_k=2, drop_ratio=0.5, expert_noise=0.01)
    a = _convert(dense("mistral"), tmp_path / "a", seed=3, **kw)
    b = _convert(dense("mistral"), tmp_path / "b", seed=3, **kw)
    c = _convert(dense("mistral"), tmp_path / "c", seed=4, **kw)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # same seed, same weights
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    assert json.loads((a / METADATA_NAME).read_text())["recipe"]["exact_at_init"] is False
    w = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    assert not torch.equal(ta[w.format(0)], ta[w.format(1)])


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


# --------------------------------------------------------------------------- output files


def test_metadata_hashes_force_and_atomic_replace(dense, tmp_path):
    src = dense("llama", sharded=True)
    dst = tmp_path / "moe"
    _convert(src, dst, max_shard_size="80KB")
    meta = json.loads((dst / METADATA_NAME).read_text())
    for name, digest in meta["source"]["sha256"].items():
        assert hashlib.sha256((src / name).read_bytes()).hexdigest() == digest
    assert "model.safetensors.index.json" in meta["source"]["sha256"]
    assert meta["options"]["num_experts"] == 4 and meta["recipe"]["exact_at_init"] is True
    for shard in meta["output"]["shards"]:
        with safe_open(str(dst / shard), "pt") as f:
            provenance = json.loads(f.metadata()["tagmoe_upcycle"])
        assert provenance["options"]["top_k"] == 2 and provenance["source_sha256"]
    assert (dst / "generation_config.json").is_file()
    with pytest.raises(ValueError, match="--force"):
        _convert(src, dst)
    _convert(src, dst, force=True, num_experts=8, top_k=2)
    assert json.loads((dst / "config.json").read_text())["num_local_experts"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary leftovers


def test_bf16_source_stays_bf16(tmp_path):
    src = tmp_path / "bf16"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.bfloat16)
    model.save_pretrained(src)
    out = _convert(src, tmp_path / "moe", num_experts=4, top_k=2, granularity=2)
    tensors = _tensors(out)
    for key in ("model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.0.block_sparse_moe.experts.1.w2.weight"):
        assert tensors[key].dtype == torch.bfloat16


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=6, top_k=2, granularity=4), "--num-experts 6 is not a multiple of --granularity"),
    (dict(num_experts=4, top_k=6), "--top-k 6 is larger than --num-experts"),
    (dict(num_experts=8, top_k=2, granularity=4), "--top-k 2 is not a multiple of --granularity"),
    (dict(num_experts=8, top_k=2, ep_size=3), "--ep-size 3 does not divide"),
    (dict(num_experts=4, top_k=2, format="tagmoe", task_schema="t.yaml"), "--task-schema only applies"),
    (dict(num_experts=4, top_k=2, router="task_aware"), "--router task_aware"),
    (dict(num_experts=4, top_k=2, task_schema="t.yaml"), "--task-schema"),
    (dict(num_experts=4, top_k=2, drop_ratio=1.5), "--drop-ratio"),
    (dict(num_experts=4, top_k=2, layers="odd"), "--layers"),
    (dict(num_experts=0, top_k=2), "--num-experts must be a positive integer"),
])
def test_bad_flags_are_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        UpcycleOptions(src=tmp_path / "src", dst=tmp_path / "dst", **kw)


def _copy_edited(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    edit(dst)
    return dst


def _drop_down_proj(d: Path):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _set_config(**changes):
    def edit(d: Path):
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("edit,kw,match", [
    (lambda d: (d / "config.json").unlink(), {}, "no config.json"),
    (_drop_down_proj, {}, "model.layers.1.mlp.down_proj.weight' is missing"),
    (_set_config(model_type="gemma", architectures=["GemmaForCausalLM"]), {},
     "not supported; supported dense sources: llama"),
    (_set_config(intermediate_size=96), {}, "config.json and weights disagree"),
    (lambda d: None, dict(num_experts=6, top_k=3, granularity=3), "--granularity 3 does not divide"),
    (lambda d: None, dict(layers="every-other"), "MixtralForCausalLM .* every layer; use --layers all"),
    (lambda d: None, dict(layers="0,5"), r"layer\(s\) \[5\] out of range"),
])
def test_bad_checkpoints_are_named(dense, tmp_path, edit, kw, match):
    src = _copy_edited(dense("llama"), tmp_path / "src", edit)
    with pytest.raises(ValueError, match=match):
        _convert(src, tmp_path / "dst", **kw)
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------- command line


def test_cli_converts_and_reports_errors(dense, tmp_path, capsys):
    dst = tmp_path / "moe"
    args = ["--src", str(dense("qwen2")), "--dst", str(dst), "--num-experts", "4", "--top-k", "2",
            "--format", "hf", "--no-progress"]
    assert cli_main(args) == 0 and (dst / "config.json").is_file()
    with pytest.raises(SystemExit) as exc:
        cli_main(args[:-1] + ["--format", "tagmoe"])
    assert exc.value.code == 2
    assert "it upcycles to --format hf only" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[sys.executable, "-m", "tagmoe_dist.upcycle", "--help"],
                                     [sys.executable, str(ROOT / "tools" / "upcycle.py"), "--help"]])
def test_help_explains_flags(command):
    text = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for flag in ("--src", "--dst", "--num-experts", "--top-k", "--format", "--layers",
                 "--granularity", "--router", "--task-schema", "--ep-size", "--router-init",
                 "--expert-noise", "--drop-ratio", "--force", "--seed", "--scaling"):
        assert flag in text
