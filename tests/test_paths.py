"""Outputs never swallow their inputs (tagmoe_dist/paths.py): `upcycle --force` with a --dst that
is, contains or lies inside --src (symlinks resolved) is refused before anything is written, and
--force removes --dst itself and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tagmoe_dist.paths import check_output_dir

transformers = pytest.importorskip("transformers")

from tagmoe_dist.upcycle.__main__ import main as upcycle_main  # noqa: E402


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dense(tmp_path) -> Path:
    """runs/dense: a tiny HF Llama, with an unrelated sibling file next to it."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    src = tmp_path / "runs" / "dense"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    return src


def _upcycle(src: Path, dst: Path, *extra: str) -> int:
    try:
        return upcycle_main(["--src", str(src), "--dst", str(dst), "--num-experts", "2",
                             "--top-k", "1", "--no-progress", *extra])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("where", ["parent", "grandparent", "same", "inside", "parent-via-link"])
def test_force_never_deletes_the_source(dense, tmp_path, where, capsys):
    runs = tmp_path / "runs"
    (tmp_path / "link").symlink_to(runs)
    dst = {"parent": runs, "grandparent": tmp_path, "same": dense, "inside": dense / "moe",
           "parent-via-link": tmp_path / "link"}[where]
    before = _tree(tmp_path)
    assert _upcycle(dense, dst, "--force") == 2
    err = capsys.readouterr().err
    assert "--dst" in err and "--src" in err, err
    assert _tree(tmp_path) == before, "the source or its neighbours changed"


def test_force_replaces_only_dst(dense, tmp_path):
    dst = tmp_path / "out" / "moe"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old output")
    (tmp_path / "out" / "sibling.txt").write_text("sibling")
    src_before = _tree(dense)
    assert _upcycle(dense, dst, "--force") == 0
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    assert (tmp_path / "out" / "sibling.txt").read_text() == "sibling"
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"
    assert _tree(dense) == src_before
    assert sorted(os.listdir(tmp_path / "out")) == ["moe", "sibling.txt"]   # no temp dirs left


def test_check_output_dir_rules(tmp_path):
    src = tmp_path / "a" / "src"
    src.mkdir(parents=True)
    check_output_dir(src, tmp_path / "a" / "other")          # a sibling is fine
    check_output_dir(src, tmp_path / "a" / "src2")           # a name prefix is not containment
    for dst, word in [(src, "itself"), (src / "x" / "y", "inside"), (tmp_path / "a", "contains"),
                      (tmp_path, "contains")]:
        with pytest.raises(ValueError, match=word):
            check_output_dir(src, dst)
    (tmp_path / "alias").symlink_to(src)
    with pytest.raises(ValueError, match="itself"):
        check_output_dir(src, tmp_path / "alias")
    with pytest.raises(ValueError, match="--ckpt .* contains --out|--out .* contains --ckpt"):
        check_output_dir(src, tmp_path, src_flag="--ckpt", dst_flag="--out")
