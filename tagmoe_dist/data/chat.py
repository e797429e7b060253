"""Chat records for Hugging Face models: one JSON object per line,

    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "task": {"scope": "arithmetic"}}                    # "task" optional, as in jsonl.py

rendered with the tokenizer's own chat template; the loss is on the assistant turns only.

Tokens: for every assistant turn i, the conversation up to turn i is rendered twice, as a prompt
(`messages[:i]`, add_generation_prompt=True) and with the answer (`messages[:i + 1]`); the text
the answer adds is tokenized separately and supervised, the text between answers (user turns,
role headers) is not. A template whose renderings are not prefixes of each other is refused.
A conversation longer than `seq_len` is truncated (its tail is lost); shorter ones are padded at
the end (attention_mask 0). A record without an assistant turn is an error: it would train on
nothing. Errors name "<file>:<line>".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Tuple

from torch.utils.data import Dataset

from tagmoe_dist.data.collate import make_sample
from tagmoe_dist.data.jsonl import _check_descriptor, task_key
from tagmoe_dist.tasks import TaskSchema

ROLES = ("system", "user", "assistant", "tool")


def is_chat_file(path: str | Path) -> bool:
    """Whether the first record of a JSONL file is a chat record ("messages")."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and "messages" in rec
    return False


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ROLES:
            raise ValueError(f'"messages"[{j}] must be {{"role": one of {list(ROLES)}, '
                             f'"content": "<text>"}}, got {m!r}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError('chat record has no assistant turn ("role": "assistant"), so it has '
                         "nothing to train on; add the answer or drop the record")


def render(tokenizer, messages: List[dict]) -> Tuple[List[int], List[bool]]:
    """(token ids, supervised flags) of one conversation (module docstring)."""
    def text(msgs, prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    def ids(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    out_ids: List[int] = []
    sup: List[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = text(messages[:i], True), text(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render a conversation as a "
                             "prefix of its continuation; the assistant tokens cannot be located")
        for piece, flag in ((prompt[len(done):], False), (full[len(prompt):], True)):
            t = ids(piece)
            out_ids += t
            sup += [flag] * len(t)
        done = full
    return out_ids, sup


class ChatDataset(Dataset):
    """Map-style dataset of chat records (module docstring). `tokenizer`: a transformers
    tokenizer with a chat template."""

    def __init__(self, path: str | Path, schema: TaskSchema, seq_len: int, tokenizer):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"ChatDataset: 'seq_len' must be an int >= 2, got {seq_len!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("ChatDataset: the tokenizer has no chat_template; use a model "
                             "directory whose tokenizer_config.json defines one, or plain "
                             '{"text": ...} records')
        self.path, self.schema, self.seq_len = Path(path), schema, seq_len
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.task_names: List[str] = []
        self._descriptors: List[Any] = []
        self._samples: List[Tuple[List[int], List[bool], int]] = []
        index_of: dict = {}
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    ids, sup, descriptor = self._parse(raw)
                except ValueError as e:
                    raise ValueError(f"{self.path}:{lineno}: {e}") from e
                key = task_key(descriptor)
                if key not in index_of:
                    index_of[key] = len(self.task_names)
                    self.task_names.append(key)
                    self._descriptors.append(descriptor)
                self._samples.append((ids[:seq_len], sup[:seq_len], index_of[key]))
        if not self._samples:
            raise ValueError(f"{self.path}: no chat records")

    def _parse(self, raw: bytes):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"invalid JSON: {e}") from e
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError('a chat record must be a JSON object {"messages": [...], "task": ...}')
        check_messages(record["messages"])
        descriptor = _check_descriptor(record.get("task"), self.schema)
        ids, sup = render(self.tokenizer, record["messages"])
        return ids, sup, descriptor

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        ids, sup, t = self._samples[index]
        return make_sample(ids, sup, self.seq_len, self.pad_id, self._descriptors[t],
                           self.task_names[t], t)
