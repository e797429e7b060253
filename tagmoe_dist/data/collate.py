"""The sample and batch formats shared by every dataset of this package.

Legend: B batch, S sequence length (fixed per dataset), L task levels, N tags (all levels' values).

A sample (what `dataset[i]` returns) is a dict:
  input_ids       LongTensor [S]   token ids, padded with the tokenizer's pad_id
  labels          LongTensor [S]   same-position targets: labels[t] = input_ids[t] where the token
                                   is supervised, -100 elsewhere (prompt, special prefix, padding)
  attention_mask  LongTensor [S]   1 on real tokens, 0 on padding (padding is at the end)
  task            dict | None      the task descriptor ({level: value or [values]}, None = unknown)
  task_name       str              the name per-task losses are logged under
  task_index      int              index of task_name in the dataset's `task_names`

Labels are NOT shifted (the Hugging Face convention): the loss of a causal LM is
`cross_entropy(logits_BSV[:, :-1], labels_BS[:, 1:], ignore_index=-100)`, i.e. the logit at
position t predicts labels[t + 1]. HF `*ForCausalLM(labels=...)` does this shift internally.

`TaskCollator(schema)` stacks samples into a batch dict holding the same keys plus the two forms
of the task descriptor that `TaskSchema.to_multi_hot` accepts (see the class docstring).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from tagmoe_dist.tasks import TaskSchema

IGNORE_INDEX = -100


def make_sample(ids: Sequence[int], supervised: Sequence[bool], seq_len: int, pad_id: int,
                task: Mapping[str, Any] | None, task_name: str, task_index: int) -> dict:
    """Pad `ids` (len <= seq_len) to `seq_len`; labels = ids where `supervised`, else -100."""
    assert len(ids) == len(supervised) and len(ids) <= seq_len, (len(ids), seq_len)
    n = len(ids)
    input_ids_S = torch.full((seq_len,), pad_id, dtype=torch.long)
    input_ids_S[:n] = torch.tensor(list(ids), dtype=torch.long)
    supervised_S = torch.zeros(seq_len, dtype=torch.bool)
    supervised_S[:n] = torch.tensor(list(supervised), dtype=torch.bool)
    labels_S = torch.where(supervised_S, input_ids_S, torch.full_like(input_ids_S, IGNORE_INDEX))
    attention_mask_S = torch.zeros(seq_len, dtype=torch.long)
    attention_mask_S[:n] = 1
    return {"input_ids": input_ids_S, "labels": labels_S, "attention_mask": attention_mask_S,
            "task": None if task is None else dict(task), "task_name": task_name,
            "task_index": int(task_index)}


def level_ids(schema: TaskSchema, descriptors: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
    """Descriptors -> LongTensor [B, L]: the value id of each level, -1 where the level is unknown
    OR holds several values (a multi-valued level with two tags has no single id; the multi-hot
    form keeps them). Unlike `TaskSchema.ids` this never raises on several values."""
    ids_BL = torch.full((len(descriptors), schema.num_levels), -1, dtype=torch.long)
    for b, d in enumerate(descriptors):
        for l, ids in enumerate(schema.encode(d)):
            if len(ids) == 1:
                ids_BL[b, l] = ids[0]
    return ids_BL


class TaskCollator:
    """Collate samples into a batch dict (a picklable callable, fit for DataLoader workers).

    The batch holds:
      input_ids       LongTensor [B, S]
      labels          LongTensor [B, S]   same-position targets, -100 = ignore (see module doc)
      attention_mask  LongTensor [B, S]   1 = real token, 0 = padding
      task_ids        LongTensor [B, L]   per-level value id; -1 = unknown, and also -1 for a
                                          multi-valued level holding several values (lossy)
      task_multi_hot  float [B, N]        exact descriptor over schema.tag_names (all zero = unknown)
      task_index      LongTensor [B]      index into the dataset's task_names, for per-task losses
      task_name       list[str] (len B)
    Pass `task_multi_hot` to the model when the descriptor matters: it is the lossless form.
    """

    def __init__(self, schema: TaskSchema):
        if not isinstance(schema, TaskSchema):
            raise ValueError(f"TaskCollator: 'schema' must be a TaskSchema, got "
                             f"{type(schema).__name__}; load one with TaskSchema.from_yaml(path)")
        self.schema = schema

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict:
        if len(samples) == 0:
            raise ValueError("TaskCollator: got an empty list of samples; use batch_size >= 1")
        lengths = {int(s["input_ids"].shape[0]) for s in samples}
        if len(lengths) != 1:
            raise ValueError(f"TaskCollator: samples have different lengths {sorted(lengths)}; "
                             "every dataset pads to a fixed seq_len, so mix only datasets built "
                             "with the same seq_len")
        descriptors = [s["task"] for s in samples]
        return {
            "input_ids": torch.stack([s["input_ids"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "attention_mask": torch.stack([s["attention_mask"] for s in samples]),
            "task_ids": level_ids(self.schema, descriptors),
            "task_multi_hot": self.schema.multi_hot(descriptors),
            "task_index": torch.tensor([int(s["task_index"]) for s in samples], dtype=torch.long),
            "task_name": [str(s["task_name"]) for s in samples],
        }
