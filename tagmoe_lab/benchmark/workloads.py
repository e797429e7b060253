"""The two built-in multi-task workloads of the router comparison: what a batch is, how a model is
built from a config, and what its per-sample loss is. Everything the training loop needs to stay
workload-agnostic, nothing more.

  text   tagmoe_dist.data.synthetic (copy / reverse / sort / shift / add) on a GPT; per-sample loss
         = mean cross-entropy over the answer tokens.
  image  tagmoe_dist.data.images (generate / recolour / move / remove / inpaint) on a DiT; per-sample
         loss = flow-matching MSE. Training noise and t are drawn per (seed, step), outside the
         model, so every variant sees the same; evaluation uses a fixed t grid and fixed noise.

Both workloads build their training batches for a seed once (`train_batches`), and every variant
of that seed trains on exactly those tensors in exactly that order.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml

from tagmoe_dist.data import SyntheticTextTasks, TaskCollator, eval_splits, text_task_schema
from tagmoe_dist.data.images import (IMAGE_TASK_DESCRIPTORS, IMAGE_TASK_NAMES, ImageTaskCollator, ImageTasks,
                                     image_eval_splits, image_task_schema)
from tagmoe_dist.data import interference
from tagmoe_dist.data.synthetic import TASK_NAMES, TEXT_TASKS
from tagmoe_dist.models.dit import DiT, DiTConfig, flow_matching_loss
from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss
from tagmoe_dist.tasks import TaskSchema

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("dense", "topk", "tag")
EVAL_SEED = 0           # eval sets are the same for every training seed: spread = training seeds


def load_model_config(path) -> "GPTConfig | DiTConfig":
    """A GPT or DiT config from YAML (a DiT config has `image_size`; a diffusers transformer's,
    a `diffusers:` section)."""
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f)
    if isinstance(d, dict) and "diffusers" in d:
        from tagmoe_dist.integrations.diffusers.training import DiffusersModelConfig
        return DiffusersModelConfig.from_yaml(path)
    cls = DiTConfig if isinstance(d, dict) and "image_size" in d else GPTConfig
    try:
        return cls.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def build_model(cfg, schema: Optional[TaskSchema] = None) -> torch.nn.Module:
    if hasattr(cfg, "build_model"):            # a diffusers transformer (one process, EP=1)
        return cfg.build_model(None, schema)
    return (DiT if isinstance(cfg, DiTConfig) else GPT)(cfg, task_schema=schema)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One multi-task workload; `configs` maps each variant to its model YAML."""

    name: str
    task_names: tuple
    schema: TaskSchema
    configs: Dict[str, str]
    make_train: Callable[[int, int, int], List[dict]]          # (seed, steps, batch) -> batches
    make_eval: Callable[[int, int], List[dict]]                # (per task, batch) -> batches
    per_sample_loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    token_mask: Callable[[dict], Optional[torch.Tensor]]       # [B, S] real tokens, or None = all
    task_tags: tuple = ()                                      # descriptor of each task, in order
    # multi-hot [K, N] of every task under a schema (default: task_tags under it); a workload
    # that offers several tag schemas (flat / hierarchical) maps each one
    tag_table: Optional[Callable[[TaskSchema], torch.Tensor]] = None
    schema_from_config: bool = False          # a model config's task_schema overrides `schema`

    def config(self, variant: str):
        if variant not in self.configs:
            raise ValueError(f"unknown variant {variant!r} of workload {self.name!r}; choose from "
                             f"{sorted(self.configs)}")
        path = Path(self.configs[variant])
        return load_model_config(path if path.is_absolute() else REPO_ROOT / path)

    def build(self, cfg) -> torch.nn.Module:
        if self.schema_from_config and getattr(cfg, "task_schema", None):
            return build_model(cfg, cfg.load_task_schema())
        return build_model(cfg, self.schema)

    def task_table(self, schema: TaskSchema) -> torch.Tensor:
        """Every task's tags under `schema`, one row per task (the alignment's candidates)."""
        if self.tag_table is not None:
            return self.tag_table(schema)
        return schema.multi_hot(list(self.task_tags))

    def train_batches(self, seed: int, steps: int, batch_size: int) -> List[dict]:
        return self.make_train(seed, steps, batch_size)

    def eval_batches(self, per_task: int, batch_size: int) -> List[dict]:
        return self.make_eval(per_task, batch_size)


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield range(a, min(n, a + size))


# ---------------------------------------------------------------------- text
TEXT_DATA = dict(seq_len=24, max_len=6, max_digits=3)     # 23 tokens at most: fits seq_len 24


def _text_train(data: dict, seed: int, steps: int, batch: int) -> List[dict]:
    ds = SyntheticTextTasks(steps * batch, seed=seed, **data)
    collate = TaskCollator(ds.schema)
    return [collate([ds[i] for i in idx]) for idx in _chunks(steps * batch, batch)]


def _mixed(per_task_samples: List[list]) -> list:
    """Interleave the tasks' eval samples (task 0, 1, ..., K-1, 0, 1, ...), so that every eval
    batch mixes tasks: batch-level statistics (the alignment accuracy) cannot read the task off
    the batch. Per-sample losses do not depend on the batch's other samples."""
    out = []
    for group in zip(*per_task_samples):
        out += list(group)
    return out


def _text_eval(data: dict, per_task: int, batch: int) -> List[dict]:
    splits = list(eval_splits(per_task, seed=EVAL_SEED, **data).values())
    samples = _mixed([[ds[i] for i in range(len(ds))] for ds in splits])
    collate = TaskCollator(splits[0].schema)
    return [collate([samples[i] for i in idx]) for idx in _chunks(len(samples), batch)]


def _text_loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], task=batch["task_multi_hot"])
    return lm_loss(logits, batch["labels"], per_sample=True)


def text_workload(configs: Optional[Dict[str, str]] = None, data: Optional[dict] = None) -> Workload:
    """data: SyntheticTextTasks arguments (seq_len, max_len, max_digits); default TEXT_DATA."""
    data = dict(TEXT_DATA if data is None else data)
    return Workload("text", tuple(TASK_NAMES), text_task_schema(),
                    configs or {v: f"configs/models/cmp_text_{v}.yaml" for v in VARIANTS},
                    functools.partial(_text_train, data), functools.partial(_text_eval, data),
                    _text_loss, lambda b: b["attention_mask"],
                    tuple(dict(t.descriptor) for t in TEXT_TASKS))


# ---------------------------------------------------------------------- image
IMAGE_DATA = dict(image_size=16)
EVAL_T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


def _with_noise(batch: dict, gen: torch.Generator, t: Optional[float] = None) -> dict:
    B = batch["target"].shape[0]
    batch = dict(batch)
    batch["noise"] = torch.randn(batch["target"].shape, generator=gen)
    batch["t"] = torch.rand(B, generator=gen) if t is None else torch.full((B,), t)
    return batch


def _image_train(data: dict, seed: int, steps: int, batch: int) -> List[dict]:
    ds = ImageTasks(steps * batch, seed=seed, **data)
    collate = ImageTaskCollator(ds.schema)
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [_with_noise(collate([ds[i] for i in idx]), gen) for idx in _chunks(steps * batch, batch)]


def _image_eval(data: dict, per_task: int, batch: int) -> List[dict]:
    gen = torch.Generator().manual_seed(EVAL_SEED)
    splits = list(image_eval_splits(per_task, seed=EVAL_SEED, **data).values())
    samples = _mixed([[ds[i] for i in range(len(ds))] for ds in splits])
    collate = ImageTaskCollator(splits[0].schema)
    out = []
    for idx in _chunks(len(samples), batch):
        b = collate([samples[i] for i in idx])
        out += [_with_noise(b, gen, t) for t in EVAL_T_GRID]
    return out


# The five image tasks under the TAG-MoE paper's 18-tag schema (configs/tasks/tagmoe_paper.yaml),
# for configs/models/tagmoe_paper_dit.yaml: the nearest of the paper's tags, per tier.
PAPER_IMAGE_TAGS = {
    "generate": {"scope": "generation"},
    "recolour": {"scope": "local_edit", "type": ["attribute"],
                 "preservation": ["structure", "background"]},
    "move": {"scope": "local_edit", "type": ["object", "pose"],
             "preservation": ["background", "identity"]},
    "remove": {"scope": "local_edit", "type": ["object"], "preservation": ["background"]},
    "inpaint": {"scope": "local_edit", "type": ["background"], "preservation": ["structure"]},
}
PAPER_SCHEMA_YAML = REPO_ROOT / "configs" / "tasks" / "tagmoe_paper.yaml"


def image_tag_table(schema: TaskSchema) -> torch.Tensor:
    """Multi-hot [5, N] of the image tasks under the image schema or the paper's."""
    paper = schema == TaskSchema.from_yaml(PAPER_SCHEMA_YAML)
    table = PAPER_IMAGE_TAGS if paper else IMAGE_TASK_DESCRIPTORS
    return schema.multi_hot([table[n] for n in IMAGE_TASK_NAMES])


def _image_loss(model, batch) -> torch.Tensor:
    """Tags under the model's own schema (the image tasks' or the paper's)."""
    schema = getattr(model, "task_schema", None)
    task = None
    if schema is not None:
        task = image_tag_table(schema).to(batch["task_index"].device).index_select(0, batch["task_index"])
    return flow_matching_loss(model, batch["target"], batch["source"], batch["instruction"],
                              batch["noise"], batch["t"], task=task, per_sample=True)


def image_workload(configs: Optional[Dict[str, str]] = None, data: Optional[dict] = None) -> Workload:
    """data: ImageTasks arguments (image_size); default IMAGE_DATA."""
    data = dict(IMAGE_DATA if data is None else data)
    return Workload("image", tuple(IMAGE_TASK_NAMES), image_task_schema(),
                    configs or {v: f"configs/models/dit_{v}.yaml" for v in VARIANTS},
                    functools.partial(_image_train, data), functools.partial(_image_eval, data),
                    _image_loss, lambda b: None,
                    tuple(dict(IMAGE_TASK_DESCRIPTORS[n]) for n in IMAGE_TASK_NAMES),
                    image_tag_table, schema_from_config=True)


# ---------------------------------------------------------------------- latent editing (diffusers)
def editing_workload(cfg) -> Workload:
    """The synthetic latent editing tasks (tagmoe_dist.data.editing) at the shapes of a diffusers
    model config; per-sample loss = Qwen-Image's flow matching (integrations/diffusers/training.py)."""
    from tagmoe_dist.data.editing import EditingCollator, SyntheticEditing, synthetic_eval_splits
    from tagmoe_dist.integrations.diffusers.training import WORKLOAD_DEFAULTS
    schema = cfg.load_task_schema()
    shape = {k: v for k, v in {**WORKLOAD_DEFAULTS, **cfg.workload}.items() if k != "num_samples"}
    collate = EditingCollator(schema)

    def make_train(seed, steps, batch):
        ds = SyntheticEditing(steps * batch, schema, seed=seed, **shape)
        return [collate([ds[i] for i in idx]) for idx in _chunks(steps * batch, batch)]

    def make_eval(per_task, batch):
        out = []
        for ds in synthetic_eval_splits(per_task, schema, seed=EVAL_SEED, **shape).values():
            out += [collate([ds[i] for i in idx]) for idx in _chunks(len(ds), batch)]
        return out

    names = tuple(SyntheticEditing(1, schema, **shape).task_names)
    return Workload("editing", names, schema, {}, make_train, make_eval,
                    lambda model, batch: cfg.batch_loss(model, batch, "cpu"), lambda b: None)


# ---------------------------------------------------------------------- interference
def _interference_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the 8 mapped positions; tags from the model's own schema."""
    schema = getattr(model, "task_schema", None)
    task = None
    if schema is not None:
        task = interference.tag_table(schema).index_select(0, batch["task_index"])
    logits = model(batch["input_ids"], task=task)
    return lm_loss(logits, batch["labels"], per_sample=True)


def interference_workload(configs: Optional[Dict[str, str]] = None, data: Optional[dict] = None,
                          control: bool = False) -> Workload:
    """tagmoe_dist.data.interference: 8 conflicting symbol maps (or, control=True, 8 tasks that
    agree). Variant configs: configs/models/intf_<variant>.yaml; a config's task_schema picks
    the flat or the hierarchical tags."""
    name = "control" if control else "interference"
    variants = ("dense", "topk", "tag", "tag_literal", "tag_l001", "tag_l02", "tag_flat", "oracle")
    return Workload(name, interference.TASK_NAMES,
                    TaskSchema.from_yaml(REPO_ROOT / "configs/tasks/interference.yaml"),
                    configs or {v: f"configs/models/intf_{v}.yaml" for v in variants},
                    lambda seed, steps, batch: interference.make_batches(seed, steps, batch, control),
                    lambda per_task, batch: interference.eval_batches(per_task, batch, control),
                    _interference_loss, lambda b: b["attention_mask"],
                    tuple(interference.task_descriptor(t) for t in interference.TASK_NAMES),
                    interference.tag_table, schema_from_config=True)


WORKLOADS = {"text": text_workload, "image": image_workload, "interference": interference_workload,
             "control": functools.partial(interference_workload, control=True)}


def get_workload(name: str, configs: Optional[Dict[str, str]] = None,
                 data: Optional[dict] = None) -> Workload:
    """text | image | interference | control (the interference workload without conflicts)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](configs, data)


def workload_for(cfg) -> Workload:
    """The built-in workload a model config is evaluated on: the image tasks for a DiT; for a
    GPT, the text tasks at the comparison's sizes when seq_len matches them, else at
    tagmoe_dist.train's (SyntheticTextTasks defaults, seq_len of the model)."""
    if hasattr(cfg, "batch_loss"):             # a diffusers transformer: latent editing
        return editing_workload(cfg)
    if isinstance(cfg, DiTConfig):
        return image_workload(data=dict(image_size=cfg.image_size))
    if cfg.seq_len == TEXT_DATA["seq_len"]:
        return text_workload()
    return text_workload(data=dict(seq_len=cfg.seq_len))
