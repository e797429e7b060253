"""Users' own text data: one JSON object per line, with an optional task descriptor.

    {"text": "the quick brown fox", "task": {"scope": "arithmetic", "type": ["numeric"]}}
    {"text": "no descriptor here"}                      # "task" missing or null -> unknown

The descriptor's levels and values must exist in the schema; a level may be left out or set
to "unknown". Blank lines are skipped. A bad record raises ValueError("<file>:<line>: <what>").

Tokenization: [bos] + tokenizer.encode(text) + [eos] (each only when the tokenizer has one). A
sequence longer than `seq_len` is CHUNKED, not truncated: cut into consecutive non-overlapping
windows of `seq_len` tokens, each a sample carrying the record's descriptor; the last window is
padded. Windows of a single token (no next-token target) are dropped. Every real token is
labelled (labels = input_ids, -100 on padding; same-position labels, see collate.py).

Per-task logging: `task_names` lists the DISTINCT descriptors seen in the file, in first-seen
order, written canonically ("scope=arithmetic,type=numeric+positional", or "unknown"); a
sample's `task_index` points into it.

The whole file is read, validated and tokenized at construction, so errors surface before
training starts; memory holds all token ids, 4 bytes each. A line is read with a bound
(`max_line_bytes`, default 16 MiB): a longer one is refused with its `file:line` after reading
no more than the bound, instead of costing gigabytes per rank (split a long text into several
records: it is cut into `seq_len` windows anyway).
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

from tagmoe_dist.data.collate import make_sample
from tagmoe_dist.data.tokenizer import ByteTokenizer, Tokenizer
from tagmoe_dist.tasks import TaskSchema


def _check_descriptor(task: Any, schema: TaskSchema) -> dict | None:
    """Validate a record's "task" value; return it normalised ({level: value or [values]})."""
    if task is None:
        return None
    if not isinstance(task, dict):
        raise ValueError(f'"task" must be an object {{"<level>": "<value>" or [values]}} or null, '
                         f"got {type(task).__name__}")
    for level, value in task.items():
        ok = isinstance(value, str) or (isinstance(value, list)
                                         and all(isinstance(v, str) for v in value))
        if not ok:
            raise ValueError(f'"task" level {level!r}: value must be a string or a list of '
                             f"strings, got {value!r}")
    ids = schema.encode(task)  # raises on unknown level / value, several values in single level
    out = {}
    for lv, level_ids in zip(schema.levels, ids):
        if level_ids:
            names = [lv.values[i] for i in level_ids]
            out[lv.name] = names if lv.multi else names[0]
    return out or None


def _check_encodable(text: str) -> None:
    """JSON's \\uXXXX escapes can spell half of a surrogate pair, which no UTF-8 text holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f'"text" holds a lone surrogate {text[e.start]!r} at character '
                         f"{e.start} (a \\uD800-\\uDFFF escape without its pair); fix the "
                         "escape or write the character itself") from None


def task_key(descriptor: Mapping[str, Any] | None) -> str:
    """Canonical name of a normalised descriptor: "level=v1+v2,level=v" or "unknown"."""
    if not descriptor:
        return "unknown"
    return ",".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}"
                    for k, v in descriptor.items())


class JsonlTextDataset(Dataset):
    """Map-style dataset over a JSONL file's texts, chunked to `seq_len` (see module docstring).

    path:      the .jsonl file
    schema:    the TaskSchema that descriptors are validated against
    seq_len:   fixed sample length (>= 2)
    tokenizer: a Tokenizer (tokenizer.py); default ByteTokenizer. For a local Hugging Face
               tokenizer pass `load_tokenizer("/path/to/dir")`.
    max_line_bytes: the longest line accepted (see module docstring).
    """

    def __init__(self, path: str | Path, schema: TaskSchema, seq_len: int = 512,
                 tokenizer: Tokenizer | None = None, max_line_bytes: int = 16 * 2 ** 20):
        if not isinstance(schema, TaskSchema):
            raise ValueError(f"JsonlTextDataset: 'schema' must be a TaskSchema, got "
                             f"{type(schema).__name__}; load one with TaskSchema.from_yaml(path)")
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"JsonlTextDataset: 'seq_len' must be an int >= 2, got {seq_len!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JsonlTextDataset: file not found: {self.path}")
        if not isinstance(max_line_bytes, int) or max_line_bytes < 1:
            raise ValueError(f"JsonlTextDataset: 'max_line_bytes' must be an int >= 1, got "
                             f"{max_line_bytes!r}")
        self.schema, self.seq_len, self.max_line_bytes = schema, seq_len, max_line_bytes
        self.tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        self.task_names: list[str] = []
        self._descriptors: list[dict | None] = []   # per task_index
        self._records: list[tuple[array, int]] = []  # (token ids, task_index)
        self._windows: list[tuple[int, int]] = []   # (record, start token)
        self._read()
        if not self._windows:
            raise ValueError(f'{self.path}: no samples (no record, or texts too short to hold a '
                             'next-token target); write one JSON object per line, e.g. '
                             '{"text": "...", "task": {"<level>": "<value>"}}')

    def _read(self) -> None:
        index_of: dict[str, int] = {}
        limit = self.max_line_bytes
        with open(self.path, "rb") as f:
            lineno = 0
            while raw := f.readline(limit + 1):     # never more than the bound in memory
                lineno += 1
                try:
                    if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                        raise ValueError(f"line longer than max_line_bytes={limit} bytes; split "
                                         "the text into several records (long texts are cut "
                                         "into seq_len windows anyway) or raise max_line_bytes")
                    text, descriptor = self._parse(raw)
                    if text is None:
                        continue
                    key = task_key(descriptor)
                    if key not in index_of:
                        index_of[key] = len(self.task_names)
                        self.task_names.append(key)
                        self._descriptors.append(descriptor)
                    self._add_record(text, index_of[key])
                except ValueError as e:
                    raise ValueError(f"{self.path}:{lineno}: {e}") from e

    def _parse(self, raw: bytes) -> tuple[str | None, dict | None]:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
        if not line.strip():
            return None, None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(record, dict):
            raise ValueError(f'a record must be a JSON object {{"text": ...}}, got '
                             f"{type(record).__name__}")
        if "text" not in record:
            raise ValueError(f'missing "text" (keys: {sorted(record)}); add "text": "<string>"')
        if not isinstance(record["text"], str):
            raise ValueError(f'"text" must be a string, got {type(record["text"]).__name__}')
        _check_encodable(record["text"])
        return record["text"], _check_descriptor(record.get("task"), self.schema)

    def _add_record(self, text: str, task_index: int) -> None:
        tok = self.tokenizer
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text) \
            + ([tok.eos_id] if tok.eos_id is not None else [])
        r = len(self._records)
        self._records.append((array("i", ids), task_index))
        for start in range(0, len(ids), self.seq_len):
            if len(ids) - start >= 2:
                self._windows.append((r, start))

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> dict:
        r, start = self._windows[index]
        ids, task_index = self._records[r]
        window = ids[start:start + self.seq_len]
        return make_sample(window, [True] * len(window), self.seq_len, self.tokenizer.pad_id,
                           self._descriptors[task_index], self.task_names[task_index], task_index)
