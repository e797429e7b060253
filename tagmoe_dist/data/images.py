"""A built-in multi-task image workload: generation and editing of tiny synthetic pictures.

The paper's setting (one diffusion transformer for generation and local editing) at toy scale,
generated from a seed, nothing downloaded. A canvas is `image_size` x `image_size` RGB (default
16x16) with a black background and 1-3 objects; an object is a 5x5 shape (square, plus, diamond)
in one of six saturated colours, and the colours on one canvas are distinct, so an instruction
can name an object by its colour. Pixel values lie in [-1, 1]: black -1, colours are +-1 per
channel, and the inpainting hole is grey (0 in every channel), a value no object has.

  task      source                        instruction tokens             target
  generate  blank canvas                  [generate, shape, colour]      one such object, anywhere
  recolour  1-3 objects                   [recolour, colour, new colour] that object recoloured
  move      1-3 objects                   [move, colour, direction]      that object shifted 3 px
  remove    1-3 objects                   [remove, colour, none]         that object gone
  inpaint   1-3 objects, grey 6x6 hole    [inpaint, none, none]          the canvas without the hole

Descriptors follow configs/tasks/image_tasks.yaml (scope / type / preservation). A sample is a
dict (see `ImageTasks.__getitem__`); `ImageTaskCollator` stacks them. Sample i is a pure function
of (seed, split, i), as in synthetic.py; `describe(i)` gives the scene behind it (for tests).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from tagmoe_dist.data.collate import level_ids
from tagmoe_dist.tasks import TaskSchema

IMAGE_TASKS_YAML = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "image_tasks.yaml"

SHAPES = ("square", "plus", "diamond")
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1)}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
OBJECT_SIZE, MOVE_STEP, HOLE_SIZE, HOLE_VALUE, BACKGROUND = 5, 3, 6, 0.0, -1.0

IMAGE_TASK_NAMES = ("generate", "recolour", "move", "remove", "inpaint")
IMAGE_TASK_DESCRIPTORS = {
    "generate": {"scope": "generation", "type": ["object"]},
    "recolour": {"scope": "local_edit", "type": ["attribute"],
                 "preservation": ["background", "other_objects", "shape", "position"]},
    "move": {"scope": "local_edit", "type": ["object", "position"],
             "preservation": ["other_objects", "shape", "colour"]},
    "remove": {"scope": "local_edit", "type": ["object"],
               "preservation": ["background", "other_objects"]},
    "inpaint": {"scope": "region_fill", "type": ["content"],
                "preservation": ["background", "other_objects"]},
}

# Instruction vocabulary: one table for every slot (the model embeds each slot separately).
INSTRUCTION_TOKENS = ("none",) + IMAGE_TASK_NAMES + SHAPES + COLOUR_NAMES + tuple(DIRECTIONS)
INSTRUCTION_VOCAB = len(INSTRUCTION_TOKENS)
INSTRUCTION_LEN = 3
_TOKEN_ID = {t: i for i, t in enumerate(INSTRUCTION_TOKENS)}


def image_task_schema(path: str | Path | None = None) -> TaskSchema:
    """The schema of the built-in image tasks (default: configs/tasks/image_tasks.yaml)."""
    return TaskSchema.from_yaml(IMAGE_TASKS_YAML if path is None else path)


@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str) -> torch.Tensor:
    r = torch.arange(OBJECT_SIZE) - OBJECT_SIZE // 2
    dy, dx = r[:, None], r[None, :]
    if shape == "square":
        return torch.ones(OBJECT_SIZE, OBJECT_SIZE, dtype=torch.bool)
    if shape == "plus":
        return (dy == 0) | (dx == 0)
    if shape == "diamond":
        return dy.abs() + dx.abs() <= OBJECT_SIZE // 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def shape_mask(shape: str) -> torch.Tensor:
    """Bool [5, 5] footprint of a shape."""
    return _shape_mask(shape).clone()


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    y: int          # top-left corner of the 5x5 box
    x: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """What sample i shows: source and target objects, the instruction, the hole (inpaint)."""
    task: str
    source_objects: tuple
    target_objects: tuple
    instruction: tuple              # three token names
    hole: Optional[tuple] = None    # (y0, x0, y1, x1), half-open


def render(objects: Sequence[Obj], size: int) -> torch.Tensor:
    """Float [3, size, size] in [-1, 1]; later objects paint over earlier ones (they never overlap)."""
    img_CHW = torch.full((3, size, size), BACKGROUND)
    for o in objects:
        m = _shape_mask(o.shape)
        colour_C = torch.tensor(COLOURS[o.colour], dtype=torch.float32) * 2 - 1
        box = img_CHW[:, o.y:o.y + OBJECT_SIZE, o.x:o.x + OBJECT_SIZE]
        box[:, m] = colour_C[:, None]
    return img_CHW


def _rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.blake2b(f"images/{seed}/{split}/{index}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _overlaps(a: Obj, b: Obj, gap: int = 1) -> bool:
    s = OBJECT_SIZE + gap
    return abs(a.y - b.y) < s and abs(a.x - b.x) < s


def _place(rng: random.Random, size: int, n: int) -> list:
    """n non-overlapping objects with distinct colours (rejection sampling, always succeeds for
    n <= 3 on a 16x16 canvas within a few tries)."""
    colours = rng.sample(COLOUR_NAMES, n)
    while True:
        objs = []
        for c in colours:
            for _ in range(50):
                o = Obj(rng.choice(SHAPES), c, rng.randint(0, size - OBJECT_SIZE),
                        rng.randint(0, size - OBJECT_SIZE))
                if not any(_overlaps(o, p) for p in objs):
                    objs.append(o)
                    break
        if len(objs) == n:
            return objs


def _scene(task: str, rng: random.Random, size: int) -> Scene:
    if task == "generate":
        shape, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
        o = Obj(shape, colour, rng.randint(0, size - OBJECT_SIZE), rng.randint(0, size - OBJECT_SIZE))
        return Scene(task, (), (o,), ("generate", shape, colour))
    while True:
        objs = _place(rng, size, rng.randint(1, 3))
        k = rng.randrange(len(objs))
        o, others = objs[k], objs[:k] + objs[k + 1:]
        if task == "recolour":
            new = rng.choice([c for c in COLOUR_NAMES if c not in {p.colour for p in objs}])
            after = objs[:k] + [dataclasses.replace(o, colour=new)] + objs[k + 1:]
            return Scene(task, tuple(objs), tuple(after), ("recolour", o.colour, new))
        if task == "remove":
            return Scene(task, tuple(objs), tuple(others), ("remove", o.colour, "none"))
        if task == "move":
            valid = []
            for name, (dy, dx) in DIRECTIONS.items():
                m = dataclasses.replace(o, y=o.y + dy * MOVE_STEP, x=o.x + dx * MOVE_STEP)
                inside = 0 <= m.y <= size - OBJECT_SIZE and 0 <= m.x <= size - OBJECT_SIZE
                if inside and not any(_overlaps(m, p) for p in others):
                    valid.append((name, m))
            if not valid:
                continue                      # boxed in: draw another layout
            name, m = rng.choice(valid)
            after = objs[:k] + [m] + objs[k + 1:]
            return Scene(task, tuple(objs), tuple(after), ("move", o.colour, name))
        if task == "inpaint":
            hole = _hole(rng, o, size)
            if hole is None:
                continue
            return Scene(task, tuple(objs), tuple(objs), ("inpaint", "none", "none"), hole)
        raise ValueError(f"unknown image task {task!r}; expected one of {list(IMAGE_TASK_NAMES)}")


def _hole(rng: random.Random, o: Obj, size: int) -> Optional[tuple]:
    """A 6x6 hole that covers part, never all, of object o's pixels (the rest shows its shape)."""
    mask = _shape_mask(o.shape)
    for _ in range(20):
        y0 = min(max(o.y + rng.randint(-3, 3), 0), size - HOLE_SIZE)
        x0 = min(max(o.x + rng.randint(-3, 3), 0), size - HOLE_SIZE)
        ys = torch.arange(OBJECT_SIZE)[:, None] + o.y
        xs = torch.arange(OBJECT_SIZE)[None, :] + o.x
        inside = (ys >= y0) & (ys < y0 + HOLE_SIZE) & (xs >= x0) & (xs < x0 + HOLE_SIZE)
        hidden = int((inside & mask).sum())
        if 0 < hidden < int(mask.sum()):
            return (y0, x0, y0 + HOLE_SIZE, x0 + HOLE_SIZE)
    return None


class ImageTasks(Dataset):
    """Map-style dataset of `num_samples` image-task samples; sample i depends on (seed, split, i).

    tasks: names from IMAGE_TASK_NAMES to draw from (uniformly; default all). `task_index` is the
    position in IMAGE_TASK_NAMES, so per-task results line up across datasets.
    """

    def __init__(self, num_samples: int, seed: int = 0, split: str = "train",
                 tasks: Sequence[str] | None = None, image_size: int = 16,
                 schema: TaskSchema | None = None):
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"ImageTasks: 'num_samples' must be an int >= 0, got {num_samples!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"ImageTasks: 'split' must be a non-empty string, got {split!r}")
        if not isinstance(image_size, int) or image_size < 12:
            raise ValueError(f"ImageTasks: 'image_size' must be an int >= 12 (three 5x5 objects "
                             f"must fit), got {image_size!r}")
        names = list(IMAGE_TASK_NAMES if tasks is None else tasks)
        if not names or len(set(names)) != len(names) or any(n not in IMAGE_TASK_NAMES for n in names):
            raise ValueError(f"ImageTasks: 'tasks' must be distinct names from "
                             f"{list(IMAGE_TASK_NAMES)}, got {names}")
        self.schema = image_task_schema() if schema is None else schema
        for n in names:
            try:
                self.schema.encode(IMAGE_TASK_DESCRIPTORS[n])
            except ValueError as e:
                raise ValueError(f"ImageTasks: task {n!r} does not fit 'schema': {e}; use "
                                 "configs/tasks/image_tasks.yaml") from e
        self.tasks, self.num_samples, self.seed, self.split = tuple(names), num_samples, seed, split
        self.image_size = image_size
        self.task_names = list(IMAGE_TASK_NAMES)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> Scene:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = _rng(self.seed, self.split, index)
        return _scene(self.tasks[rng.randrange(len(self.tasks))], rng, self.image_size)

    def __getitem__(self, index: int) -> dict:
        """source, target float [3, H, W]; instruction LongTensor [3]; task descriptor dict;
        task_name; task_index."""
        sc = self.describe(int(index))
        source_CHW = render(sc.source_objects, self.image_size)
        if sc.hole is not None:
            y0, x0, y1, x1 = sc.hole
            source_CHW[:, y0:y1, x0:x1] = HOLE_VALUE
        return {"source": source_CHW, "target": render(sc.target_objects, self.image_size),
                "instruction": torch.tensor([_TOKEN_ID[t] for t in sc.instruction]),
                "task": dict(IMAGE_TASK_DESCRIPTORS[sc.task]), "task_name": sc.task,
                "task_index": IMAGE_TASK_NAMES.index(sc.task)}


def image_eval_splits(num_per_task: int, seed: int = 0, tasks: Sequence[str] | None = None,
                      **kwargs) -> dict:
    """One eval dataset per task ({name: ImageTasks}) on the "eval" seed stream."""
    return {name: ImageTasks(num_per_task, seed=seed, split="eval", tasks=[name], **kwargs)
            for name in (IMAGE_TASK_NAMES if tasks is None else tasks)}


class ImageTaskCollator:
    """Samples -> batch dict: source, target [B, 3, H, W]; instruction [B, 3]; task_ids [B, L];
    task_multi_hot [B, N]; task_index [B]; task_name list. (Picklable, fit for DataLoader workers.)"""

    def __init__(self, schema: TaskSchema):
        if not isinstance(schema, TaskSchema):
            raise ValueError(f"ImageTaskCollator: 'schema' must be a TaskSchema, got "
                             f"{type(schema).__name__}")
        self.schema = schema

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict:
        if len(samples) == 0:
            raise ValueError("ImageTaskCollator: got an empty list of samples; use batch_size >= 1")
        descriptors = [s["task"] for s in samples]
        return {
            "source": torch.stack([s["source"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples]),
            "instruction": torch.stack([s["instruction"] for s in samples]),
            "task_ids": level_ids(self.schema, descriptors),
            "task_multi_hot": self.schema.multi_hot(descriptors),
            "task_index": torch.tensor([int(s["task_index"]) for s in samples], dtype=torch.long),
            "task_name": [str(s["task_name"]) for s in samples],
        }
