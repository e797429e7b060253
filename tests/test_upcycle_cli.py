"""`python -m tagmoe_dist.upcycle` warns when transformers' default grouped expert kernel cannot
run the export on CPU in fp32 (an expert width not a multiple of 4), and the load it recommends
(`experts_implementation="eager"`) reproduces the dense logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tagmoe_dist.upcycle.__main__ import main as upcycle_main  # noqa: E402
from tests.tolerance import REL_FP32, assert_rel_close  # noqa: E402

TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _dense(root: Path, intermediate: int) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=intermediate,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    src = root / f"dense{intermediate}"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    return src


def _logits(path: Path, **kw) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()(TOKENS).logits


def test_warns_about_grouped_experts_and_eager_loading_works(tmp_path, capsys):
    src = _dense(tmp_path, 12)
    dst = tmp_path / "moe"                       # G=2: expert width 6, not a multiple of 4
    assert upcycle_main(["--src", str(src), "--dst", str(dst), "--num-experts", "4", "--top-k",
                         "2", "--granularity", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: expert width 6 is not a multiple of 4" in err
    assert 'experts_implementation="eager"' in err
    with pytest.raises(RuntimeError, match="strides should be multiple of 16 bytes"):
        _logits(dst)                             # what the warning is about (transformers 5.x)
    assert_rel_close(_logits(dst, experts_implementation="eager"), _logits(src), REL_FP32)


def test_no_warning_for_widths_the_grouped_kernel_runs(tmp_path, capsys):
    src = _dense(tmp_path, 16)
    assert upcycle_main(["--src", str(src), "--dst", str(tmp_path / "moe"), "--num-experts", "4",
                         "--top-k", "2", "--granularity", "2", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert_rel_close(_logits(tmp_path / "moe"), _logits(src), REL_FP32)
