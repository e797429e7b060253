"""A built-in multi-task text workload, generated on the fly from a seed (nothing downloaded).

Five tasks read the same kind of input (a short lowercase string, or two numbers) and map it in
conflicting ways, so a single shared FFN suffers interference between them:

  copy     "copy:hello"   -> "hello"      reverse  "reverse:hello" -> "olleh"
  sort     "sort:hello"   -> "ehllo"      shift    "shift3:hello"  -> "khoor"  (Caesar, k in 1..9)
  add      "add:17+25"    -> "42"

Their descriptors live under the schema `configs/tasks/text_tasks.yaml` (`text_task_schema()`).

Sample layout (byte-level ids, see tokenizer.py), padded to `seq_len`:

  [BOS] prompt-bytes [SEP] answer-bytes [EOS] [PAD] ...
  labels: -100 ...   -100   answer-bytes  EOS  -100 ...

so the loss covers exactly the answer and its EOS (labels are not shifted: see collate.py).

Sample i is a pure function of (seed, split, i): its own `random.Random` is seeded from a hash
of the three, which makes data order reproducible and resumable at any index and lets any
sampler shard the indices across ranks (see sharding.py). The task of sample i is drawn
uniformly from `tasks` by that same generator. `split` names a seed stream: the eval split
("eval") never shares a generator with "train"; short payloads may still coincide by chance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset

from tagmoe_dist.data.collate import make_sample
from tagmoe_dist.data.tokenizer import ByteTokenizer
from tagmoe_dist.tasks import TaskSchema

TEXT_TASKS_YAML = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "text_tasks.yaml"


def text_task_schema(path: str | Path | None = None) -> TaskSchema:
    """The schema of the built-in tasks (default: configs/tasks/text_tasks.yaml of this repo)."""
    return TaskSchema.from_yaml(TEXT_TASKS_YAML if path is None else path)


@dataclasses.dataclass(frozen=True)
class _Limits:
    min_len: int      # letters in a string payload
    max_len: int
    max_digits: int   # digits in each operand of `add`


@dataclasses.dataclass(frozen=True)
class TextTask:
    """One built-in task: its descriptor, a generator and a bound on its character counts."""
    name: str
    descriptor: dict
    generate: Callable[[random.Random, _Limits], tuple[str, str]]   # -> (prompt, answer)
    max_chars: Callable[[_Limits], tuple[int, int]]                 # -> (prompt, answer) bounds


def _letters(rng: random.Random, lim: _Limits) -> str:
    n = rng.randint(lim.min_len, lim.max_len)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _shift(s: str, k: int) -> str:
    return "".join(chr((ord(c) - ord("a") + k) % 26 + ord("a")) for c in s)


def _gen_copy(rng, lim):
    s = _letters(rng, lim)
    return "copy:" + s, s


def _gen_reverse(rng, lim):
    s = _letters(rng, lim)
    return "reverse:" + s, s[::-1]


def _gen_sort(rng, lim):
    s = _letters(rng, lim)
    return "sort:" + s, "".join(sorted(s))


def _gen_shift(rng, lim):
    k = rng.randint(1, 9)
    s = _letters(rng, lim)
    return f"shift{k}:" + s, _shift(s, k)


def _operand(rng: random.Random, lim: _Limits) -> int:
    digits = rng.randint(1, lim.max_digits)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def _gen_add(rng, lim):
    a, b = _operand(rng, lim), _operand(rng, lim)
    return f"add:{a}+{b}", str(a + b)


def _letters_bound(prefix_len: int):
    return lambda lim: (prefix_len + lim.max_len, lim.max_len)


_SEQ = "sequence_transform"
TEXT_TASKS: tuple[TextTask, ...] = (
    TextTask("copy", {"scope": _SEQ, "type": ["order_preserving"],
                      "preservation": ["alphabet", "multiset", "order", "length"]},
             _gen_copy, _letters_bound(len("copy:"))),
    TextTask("reverse", {"scope": _SEQ, "type": ["order_changing", "positional"],
                         "preservation": ["alphabet", "multiset", "length"]},
             _gen_reverse, _letters_bound(len("reverse:"))),
    TextTask("sort", {"scope": _SEQ, "type": ["order_changing", "comparison"],
                      "preservation": ["alphabet", "multiset", "length"]},
             _gen_sort, _letters_bound(len("sort:"))),
    TextTask("shift", {"scope": _SEQ, "type": ["order_preserving", "symbol_mapping"],
                       "preservation": ["alphabet", "order", "length"]},
             _gen_shift, _letters_bound(len("shift9:"))),
    TextTask("add", {"scope": "arithmetic", "type": ["numeric", "positional"],
                     "preservation": ["alphabet"]},
             _gen_add, lambda lim: (len("add:+") + 2 * lim.max_digits, lim.max_digits + 1)),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TEXT_TASKS)


def _rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


class SyntheticTextTasks(Dataset):
    """Map-style dataset of `num_samples` built-in task samples; sample i depends on (seed, split, i).

    tasks:      names from TASK_NAMES to draw from (default all). `task_index` of a sample is its
                task's position in TASK_NAMES (not in `tasks`), so per-task logs line up across
                a training set and per-task eval sets; `task_names` is TASK_NAMES.
    seq_len:    fixed length; must hold the longest sample (checked here, not at sample time).
    min_len, max_len: letters in the payload of copy/reverse/sort/shift.
    max_digits: digits of each operand of add.
    schema:     the schema the descriptors are checked against (default text_task_schema()).
    """

    def __init__(self, num_samples: int, seq_len: int = 64, seed: int = 0, split: str = "train",
                 tasks: Sequence[str] | None = None, min_len: int = 1, max_len: int = 16,
                 max_digits: int = 6, schema: TaskSchema | None = None):
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"SyntheticTextTasks: 'num_samples' must be an int >= 0, got {num_samples!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"SyntheticTextTasks: 'split' must be a non-empty string such as "
                             f"'train' or 'eval', got {split!r}")
        if min_len < 1 or max_len < min_len:
            raise ValueError(f"SyntheticTextTasks: need 1 <= 'min_len' <= 'max_len', got "
                             f"min_len={min_len}, max_len={max_len}")
        if max_digits < 1:
            raise ValueError(f"SyntheticTextTasks: 'max_digits' must be >= 1, got {max_digits}")
        names = list(TASK_NAMES if tasks is None else tasks)
        unknown = [n for n in names if n not in TASK_NAMES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"SyntheticTextTasks: 'tasks' must be distinct names from "
                             f"{list(TASK_NAMES)}, got {names}")
        self.tasks = tuple(TEXT_TASKS[TASK_NAMES.index(n)] for n in names)
        self.limits = _Limits(min_len, max_len, max_digits)
        # [BOS] prompt [SEP] answer [EOS]
        longest = max(p + a + 3 for p, a in (t.max_chars(self.limits) for t in self.tasks))
        if seq_len < longest:
            raise ValueError(f"SyntheticTextTasks: 'seq_len'={seq_len} cannot hold the longest "
                             f"sample ({longest} tokens with max_len={max_len}, max_digits="
                             f"{max_digits}); raise seq_len to >= {longest} or lower max_len/max_digits")
        self.schema = text_task_schema() if schema is None else schema
        for t in self.tasks:
            try:
                self.schema.encode(t.descriptor)
            except ValueError as e:
                raise ValueError(f"SyntheticTextTasks: task {t.name!r} does not fit 'schema': {e}; "
                                 "use configs/tasks/text_tasks.yaml") from e
        self.num_samples, self.seq_len, self.seed, self.split = num_samples, seq_len, seed, split
        self.tokenizer = ByteTokenizer()
        self.task_names = list(TASK_NAMES)

    def __len__(self) -> int:
        return self.num_samples

    def text(self, index: int) -> tuple[str, str, str]:
        """(task name, prompt, answer) of sample `index`, as strings."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = _rng(self.seed, self.split, index)
        task = self.tasks[rng.randrange(len(self.tasks))]
        prompt, answer = task.generate(rng, self.limits)
        return task.name, prompt, answer

    def __getitem__(self, index: int) -> dict:
        name, prompt, answer = self.text(int(index))
        tok = self.tokenizer
        prompt_ids = [tok.bos_id] + tok.encode(prompt) + [tok.sep_id]
        answer_ids = tok.encode(answer) + [tok.eos_id]
        task = self.tasks[[t.name for t in self.tasks].index(name)]
        return make_sample(prompt_ids + answer_ids,
                           [False] * len(prompt_ids) + [True] * len(answer_ids),
                           self.seq_len, tok.pad_id, task.descriptor, name, TASK_NAMES.index(name))


def eval_splits(num_per_task: int, seq_len: int = 64, seed: int = 0,
                tasks: Sequence[str] | None = None, **kwargs) -> dict[str, SyntheticTextTasks]:
    """One eval dataset per task ({name: dataset}), on the "eval" seed stream, for per-task losses.

    `kwargs` (min_len, max_len, max_digits, schema) should match the training set's. The sets
    share the "eval" stream, so sample i of copy, reverse and sort holds the same payload: their
    losses are compared on paired inputs.
    """
    return {name: SyntheticTextTasks(num_per_task, seq_len=seq_len, seed=seed, split="eval",
                                     tasks=[name], **kwargs)
            for name in (TASK_NAMES if tasks is None else tasks)}
