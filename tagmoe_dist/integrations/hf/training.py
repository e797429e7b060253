"""A Hugging Face model under `python -m tagmoe_dist.train`: the model YAML, the data, and a
wrapper that gives the trainer the reference models' interface.

    hf: /models/llama-tiny            # local Hugging Face directory (config.json + weights)
    upcycle: {num_experts: 8, top_k: 2, granularity: 1}    # dense sources only
    moe: {router: task_aware, aux_loss_coeff: 0.01}        # MoEConfig overrides
    task_schema: configs/tasks/text_tasks.yaml
    seq_len: 256
    gradient_checkpointing: false
    train: {data: chat.jsonl, ep_size: 2, steps: 100, ...} # the trainer's keys, as for the GPT

Data (`train.data`): JSONL of chat records ({"messages": [...], "task": ...}, data/chat.py) or of
text records ({"text": ..., "task": ...}, data/jsonl.py), told apart by the first record, tokenized
with the model directory's tokenizer (or `train.tokenizer`). Everything is checked before any
process group exists.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import yaml

from tagmoe_dist.integrations.hf import convert, families
from tagmoe_dist.integrations.hf.block import tasks
from tagmoe_dist.models.common import load_task_schema
from tagmoe_dist.tasks import TaskSchema



def is_hf_yaml(path) -> bool:
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f)
    return isinstance(d, Mapping) and "hf" in d


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    hf: str
    moe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    upcycle: Optional[Mapping[str, Any]] = None
    task_schema: Optional[str] = None
    seq_len: int = 256
    gradient_checkpointing: bool = False
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    is_dense = False          # the trainer's flag: this model always has MoE layers
    # ZeRO-3: from_pretrained cannot run under deepspeed.zero.Init (its tensor-constructor
    # patch breaks transformers); the engine partitions the built model (integrations/zero3.py).
    # The build itself reads only this rank's experts (integrations/hf/streaming.py).
    zero3_init = False

    def __post_init__(self):
        object.__setattr__(self, "hf", str(Path(self.hf).resolve()))
        raw = convert.read_source_config(self.hf)
        object.__setattr__(self, "model_type",
                           families.check_family(raw.get("model_type"), f"hf: {self.hf}"))
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"HFModelConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.moe, Mapping):
            raise ValueError("HFModelConfig.moe must be a mapping of MoEConfig fields")
        object.__setattr__(self, "hf_config", _auto_config(self.hf))
        object.__setattr__(self, "moe_config", convert.build_moe_config(
            self.hf_config, self.model_type, self.moe, self.upcycle))

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_yaml(cls, path) -> "HFModelConfig":
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown} of a Hugging Face model YAML; "
                             f"valid fields: {sorted(names)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"], d["train"] = dict(self.moe), dict(self.train)
        d["upcycle"] = None if self.upcycle is None else dict(self.upcycle)
        return d

    def load_task_schema(self) -> Optional[TaskSchema]:
        return load_task_schema(self.task_schema)

    # ------------------------------------------------------------------ data
    def tokenizer_dir(self, train: Dict[str, Any]) -> str:
        return self.hf if train["tokenizer"] == "byte" else train["tokenizer"]

    def tokenizer(self, train: Dict[str, Any]):
        from transformers import AutoTokenizer
        where = self.tokenizer_dir(train)
        try:
            return AutoTokenizer.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"no tokenizer in {where}: save one beside the model "
                             "(tokenizer.save_pretrained) or set train.tokenizer=<dir>") from e

    def build_data(self, train: Dict[str, Any], schema: Optional[TaskSchema]):
        """(training dataset, {task: eval dataset}); the trainer repeats the first."""
        convert.check_ep(self.moe_config, train["ep_size"])
        if train["data"] == "synthetic":
            raise ValueError("train.data: a Hugging Face model trains on your JSONL (chat records "
                             '{"messages": ...} or text records {"text": ...}); set '
                             "train.data=FILE.jsonl")
        if schema is None:
            raise ValueError("train.data needs a task schema: set task_schema in the model YAML")
        tok = self.tokenizer(train)
        if len(tok) > self.hf_config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tok)} ids but the model's vocab_size is "
                             f"{self.hf_config.vocab_size}; use the model's own tokenizer")
        data = self._dataset(train["data"], schema, tok, train)
        evals = {}
        if train["eval_data"]:
            ev = self._dataset(train["eval_data"], schema, tok, train)
            per_task: Dict[str, list] = {}
            for i in range(len(ev)):
                per_task.setdefault(ev[i]["task_name"], []).append(i)
            evals = {name: torch.utils.data.Subset(ev, idx[:train["eval_samples_per_task"]])
                     for name, idx in per_task.items()}
        return data, evals

    def _dataset(self, path, schema, tok, train):
        from tagmoe_dist.data.chat import ChatDataset, is_chat_file
        if not Path(path).is_file():
            raise ValueError(f"train.data: file not found: {path}")
        if is_chat_file(path):
            return ChatDataset(path, schema, self.seq_len, tok)
        from tagmoe_dist.data import HFTokenizer, JsonlTextDataset
        return JsonlTextDataset(path, schema, seq_len=self.seq_len,
                                tokenizer=HFTokenizer(self.tokenizer_dir(train)))

    # ------------------------------------------------------------------ model
    def build_model(self, groups, schema) -> "HFCausalLM":
        lm = convert.from_pretrained(self.hf, moe=self.moe, task_schema=schema, groups=groups,
                                     upcycle=self.upcycle)
        if self.gradient_checkpointing:
            lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        return HFCausalLM(lm)


def _auto_config(path: str):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, local_files_only=True)


class HFCausalLM(nn.Module):
    """The trainer's model interface around a converted Hugging Face causal LM:
    `forward(input_ids, task=None, attention_mask=None) -> logits`, `moe_layers()`,
    `set_aux_loss_scale()`, `last_align`. Its state dict is the LM's under the prefix `lm.`."""

    takes_attention_mask = True

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, task: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        with tasks(self.lm, task):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits

    def moe_layers(self):
        return convert.moe_layers(self.lm)

    def set_aux_loss_scale(self, scale: float) -> None:
        convert.set_aux_loss_scale(self.lm, scale)

    @property
    def last_align(self) -> Dict[str, torch.Tensor]:
        return convert.last_align(self.lm)
