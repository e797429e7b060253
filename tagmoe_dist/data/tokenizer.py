"""Tokenizers for the data layer: a byte-level one (default) and a local Hugging Face one.

Both expose the same small interface (`Tokenizer`):
  vocab_size            number of ids the model's embedding must hold
  pad_id                id written in padded positions (never a target: labels there are -100)
  bos_id / eos_id       ids put before / after a text, or None when the tokenizer has none
  sep_id                id between a prompt and its answer, or None
  encode(text) -> ids   without special tokens
  decode(ids) -> text   special tokens dropped

Byte-level ids: 0..255 are the UTF-8 bytes of the text; the special tokens sit above them
(pad 256, bos 257, eos 258, sep 259), so `vocab_size` is 260.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    sep_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, special tokens pad/bos/eos/sep = 256..259."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    sep_id = 259
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (never downloaded).

    Its own bos/eos/sep tokens are used when it defines them; the pad id falls back to eos, then
    to 0 — harmless, since padded positions are found by position (attention_mask), not by id.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer: {str(path)!r} is not a local directory; name a folder "
                             "holding a saved Hugging Face tokenizer (tokenizer.json / "
                             "tokenizer_config.json), or 'byte' for the byte-level tokenizer. "
                             "Nothing is downloaded.")
        from transformers import AutoTokenizer  # optional dependency, imported only when used

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.sep_id = self._tok.sep_token_id
        pad = self._tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """ValueError unless the model's embedding (vocab_size rows) holds every id the tokenizer
    can produce: checked before any process group or engine exists, instead of an IndexError in
    the first forward."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids ({tokenizer!r}); set vocab_size >= "
                         f"{tokenizer.vocab_size} in the model YAML")


def load_tokenizer(name_or_path: str | Path | None = None) -> Tokenizer:
    """`None` or `"byte"` -> ByteTokenizer; a local directory -> HFTokenizer (local files only)."""
    if name_or_path is None or str(name_or_path) == "byte":
        return ByteTokenizer()
    return HFTokenizer(name_or_path)
