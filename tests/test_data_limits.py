"""Untrusted JSONL input: a lone surrogate gets its file:line, a huge line is refused after
reading no more than the bound (memory measured with tracemalloc), token ids are stored compactly,
and a model whose vocab_size is smaller than its tokenizer is refused before anything starts."""

from __future__ import annotations

import tracemalloc

import pytest

from tagmoe_dist.data import ByteTokenizer, JsonlTextDataset, check_vocab, text_task_schema

SCHEMA = text_task_schema()


def test_lone_surrogate_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: \"text\" holds a lone surrogate '\\ud800' "
                                         r"at character 1"):
        JsonlTextDataset(path, SCHEMA, seq_len=8)
    # a proper pair (an emoji written as two escapes) is fine
    path.write_text('{"text": "a\\ud83d\\ude00b"}\n', encoding="utf-8")
    assert len(JsonlTextDataset(path, SCHEMA, seq_len=8)) == 1


def test_line_length_bound(tmp_path):
    path = tmp_path / "d.jsonl"
    body = '{"text": "' + "q" * 88 + '"}'            # 100 bytes
    path.write_text(body + "\n" + body.replace("q", "qq", 1) + "\n")   # 100 and 101 bytes
    assert len(JsonlTextDataset(path, SCHEMA, seq_len=128, max_line_bytes=101)) == 2
    with pytest.raises(ValueError, match=rf"^{path}:2: line longer than max_line_bytes=100 bytes"):
        JsonlTextDataset(path, SCHEMA, seq_len=128, max_line_bytes=100)
    path.write_text(body)                              # no final newline, exactly at the bound
    assert len(JsonlTextDataset(path, SCHEMA, seq_len=128, max_line_bytes=100)) == 1
    with pytest.raises(ValueError, match="max_line_bytes"):
        JsonlTextDataset(path, SCHEMA, seq_len=8, max_line_bytes=0)


def test_huge_line_costs_no_more_than_the_bound(tmp_path):
    """A 40 MB line (one record): refused after reading 16 MiB; the Python heap's peak stays
    within a few times the bound, where reading and tokenizing it whole took GBs."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "ok"}\n{"text": "')
        for _ in range(40):
            f.write("z" * 2 ** 20)
        f.write('"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"^{path}:2: line longer than max_line_bytes"):
            JsonlTextDataset(path, SCHEMA, seq_len=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 16 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


def test_token_ids_are_stored_compactly(tmp_path):
    path = tmp_path / "d.jsonl"
    n = 300_000
    path.write_text('{"text": "' + "abc" * (n // 3) + '"}\n')
    tracemalloc.start()
    ds = JsonlTextDataset(path, SCHEMA, seq_len=512)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert ds[0]["input_ids"].tolist()[1:4] == list(b"abc")          # after BOS
    assert size < 6 * n, f"{size / n:.1f} bytes per token"   # 4 (int32), where a list took 8+


def test_vocab_smaller_than_tokenizer_is_refused():
    check_vocab(ByteTokenizer(), 260)
    with pytest.raises(ValueError, match=r"vocab_size=200 is smaller than the tokenizer's 260 ids"
                                         r".*set vocab_size >= 260"):
        check_vocab(ByteTokenizer(), 200)
