"""Data layer for training: fixed-length token samples with task descriptors.

- `SyntheticTextTasks` / `eval_splits`: the built-in multi-task text workload (copy, reverse,
  sort, shift, add), generated from a seed; schema `text_task_schema()`.
- `JsonlTextDataset`: users' own {"text", "task"} JSONL files.
- `ByteTokenizer` / `load_tokenizer`: byte-level ids (default) or a local Hugging Face tokenizer.
- `TaskCollator`: samples -> batch dict (input_ids, labels, attention_mask, task_ids,
  task_multi_hot, task_index, task_name). Labels are same-position (not shifted), -100 = ignore.
- `shard_indices` / `ShardSampler`: disjoint per-rank shards, reproducible and resumable.
"""

from tagmoe_dist.data.collate import IGNORE_INDEX, TaskCollator, level_ids, make_sample
from tagmoe_dist.data.jsonl import JsonlTextDataset, task_key
from tagmoe_dist.data.sharding import ShardSampler, shard_indices
from tagmoe_dist.data.synthetic import (TASK_NAMES, TEXT_TASKS, SyntheticTextTasks, eval_splits,
                                        text_task_schema)
from tagmoe_dist.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, check_vocab,
                                        load_tokenizer)

__all__ = [
    "IGNORE_INDEX", "TaskCollator", "level_ids", "make_sample",
    "JsonlTextDataset", "task_key",
    "ShardSampler", "shard_indices",
    "TASK_NAMES", "TEXT_TASKS", "SyntheticTextTasks", "eval_splits", "text_task_schema",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "check_vocab", "load_tokenizer",
]
