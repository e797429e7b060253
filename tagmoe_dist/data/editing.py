"""Instruction-editing records for latent diffusion transformers (Qwen-Image-Edit style), tagged
with the TAG-MoE paper's 18-tag schema (configs/tasks/tagmoe_paper.yaml).

Legend: B batch, C latent channels, H W latent size, L instruction length, T text-encoder width.

On disk (`EditingDataset`): a JSONL index, one record per line,
    {"sample": "shard0/000123.safetensors",             # relative to the index file
     "task": {"scope": "local_edit", "type": ["object"], "preservation": ["background"]},
     "task_name": "remove_object",                       # optional: the per-task log name
     "instruction": "remove the red car"}                # optional: kept for inspection only
and per record a .safetensors file (no code inside, nothing executed on load) holding
    source         [C, H, W]   VAE latents of the source image, normalised as the model expects
                               (Qwen-Image: (z - latents_mean) / latents_std per channel)
    target         [C, H, W]   latents of the edited image (same shape)
    prompt_embeds  [L, T]      the instruction encoded by the pipeline's text encoder
                               (Qwen-Image: Qwen2.5-VL hidden states, T = 3584)
    prompt_mask    [L]         optional, 1 = real token (default: all ones)
Records of one dataset share C, H, W, L and T (pad the instruction to L and mask it).

`SyntheticEditing` generates such records from a seed (nothing downloaded): five edits of smooth
random latent "scenes" with one object, each with its own instruction embedding and descriptor.

Every sample also carries its flow-matching draws, `noise` [C, H, W] and `u` (a uniform number
the trainer maps to a noise level), taken from a generator seeded by (seed, split, index): a
resumed run sees exactly the draws of an uninterrupted one. `EditingCollator` stacks samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from tagmoe_dist.data.collate import level_ids
from tagmoe_dist.tasks import TaskSchema

PAPER_SCHEMA_YAML = Path(__file__).resolve().parents[2] / "configs" / "tasks" / "tagmoe_paper.yaml"

# The synthetic edits and their descriptors in the paper's schema.
SYNTHETIC_EDITS: Dict[str, Dict[str, Any]] = {
    "remove_object": {"scope": "local_edit", "type": ["object"], "preservation": ["background"]},
    "recolour_object": {"scope": "local_edit", "type": ["attribute"],
                        "preservation": ["structure", "background"]},
    "relight": {"scope": "global_edit", "type": ["illumination"], "preservation": ["structure"]},
    "mirror_view": {"scope": "viewpoint_edit", "type": ["pose"], "preservation": ["identity"]},
    "generate_object": {"scope": "generation", "type": ["object"]},
}


def _generator(seed: int, *ids) -> torch.Generator:
    digest = hashlib.sha256(repr((int(seed),) + tuple(ids)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def flow_draws(seed: int, split: str, index: int, shape) -> Dict[str, torch.Tensor]:
    """The per-sample noise [C, H, W] and uniform u of the flow-matching loss."""
    g = _generator(seed, split, index, "flow")
    return {"noise": torch.randn(tuple(shape), generator=g), "u": torch.rand((), generator=g)}


class SyntheticEditing(Dataset):
    """Tiny latent editing tasks: sample i is a pure function of (seed, split, i)."""

    def __init__(self, num_samples: int, schema: TaskSchema, seed: int = 0, split: str = "train",
                 channels: int = 16, size: int = 8, text_len: int = 6, text_dim: int = 24,
                 tasks: Optional[Sequence[str]] = None):
        for name, v in (("channels", channels), ("size", size), ("text_len", text_len),
                        ("text_dim", text_dim), ("num_samples", num_samples)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"SyntheticEditing.{name} must be a positive integer, got {v!r}")
        if size % 2 or size < 4:
            raise ValueError(f"SyntheticEditing.size={size} must be even and >= 4 (2x2 patches)")
        self.task_names = list(tasks or SYNTHETIC_EDITS)
        unknown = sorted(set(self.task_names) - set(SYNTHETIC_EDITS))
        if unknown:
            raise ValueError(f"SyntheticEditing.tasks: unknown {unknown}; choose from {list(SYNTHETIC_EDITS)}")
        for name in self.task_names:
            schema.encode(SYNTHETIC_EDITS[name])          # the schema must know the tags
        self.schema, self.num_samples, self.seed, self.split = schema, num_samples, seed, split
        self.C, self.S, self.L, self.T = channels, size, text_len, text_dim
        # one instruction embedding per edit (what a text encoder would give for its prompt)
        self._instr = {n: torch.randn(text_len, text_dim, generator=_generator(seed, "instr", n))
                       for n in SYNTHETIC_EDITS}
        self._palette = torch.randn(channels, channels, generator=_generator(seed, "palette")) / \
            channels ** 0.5

    def __len__(self) -> int:
        return self.num_samples

    def _scene(self, g: torch.Generator):
        C, S = self.C, self.S
        coarse = torch.randn(1, C, S // 2, S // 2, generator=g)
        background = torch.nn.functional.interpolate(coarse, size=(S, S), mode="bilinear",
                                                     align_corners=False)[0] * 0.5
        k = max(2, S // 4)
        r, c = (int(torch.randint(0, S - k + 1, (1,), generator=g)) for _ in range(2))
        mask = torch.zeros(1, S, S)
        mask[:, r:r + k, c:c + k] = 1.0
        colour = torch.randn(C, 1, 1, generator=g) * 1.5
        return background, mask, colour

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        g = _generator(self.seed, self.split, index, "scene")
        name = self.task_names[index % len(self.task_names)]
        background, mask, colour = self._scene(g)
        scene = background * (1 - mask) + colour * mask
        if name == "remove_object":
            source, target = scene, background
        elif name == "recolour_object":
            new = torch.einsum("dc,chw->dhw", self._palette, colour.expand(-1, 1, 1))
            source, target = scene, background * (1 - mask) + new * mask
        elif name == "relight":
            source, target = scene, scene * 0.6 + 0.8
        elif name == "mirror_view":
            source, target = scene, scene.flip(-1)
        else:                                              # generate_object: blank source
            source, target = torch.zeros_like(scene), scene
        prompt = self._instr[name] + 0.05 * torch.randn(self.L, self.T, generator=g)
        return {"source": source, "target": target, "prompt_embeds": prompt,
                "prompt_mask": torch.ones(self.L), "task": SYNTHETIC_EDITS[name],
                "task_name": name, "task_index": self.task_names.index(name),
                **flow_draws(self.seed, self.split, index, source.shape)}


def synthetic_eval_splits(per_task: int, schema: TaskSchema, seed: int = 0, **kw
                          ) -> Dict[str, Dataset]:
    """{task name: its evaluation samples} (split 'eval', disjoint draws from training)."""
    full = SyntheticEditing(per_task * len(SYNTHETIC_EDITS), schema, seed=seed, split="eval", **kw)
    return {n: torch.utils.data.Subset(full, list(range(i, len(full), len(full.task_names))))
            for i, n in enumerate(full.task_names)}


class EditingDataset(Dataset):
    """The on-disk records of the module docstring. `seed` seeds the flow-matching draws."""

    def __init__(self, index_path, schema: TaskSchema, seed: int = 0, split: str = "train"):
        self.path = Path(index_path)
        if not self.path.is_file():
            raise ValueError(f"editing data index {self.path} not found (a JSONL file, one record "
                             "per line; see tagmoe_dist/data/editing.py)")
        self.schema, self.seed, self.split = schema, seed, split
        self.records: List[dict] = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{n}: invalid JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("sample"), str):
                raise ValueError(f"{self.path}:{n}: a record needs \"sample\": \"<file>.safetensors\"")
            try:
                schema.encode(rec.get("task"))
            except ValueError as e:
                raise ValueError(f"{self.path}:{n}: task: {e}") from None
            rec.setdefault("task_name", _task_key(rec.get("task")))
            self.records.append(rec)
        if not self.records:
            raise ValueError(f"{self.path} holds no records")
        self.task_names = sorted({r["task_name"] for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from safetensors.torch import load_file
        rec = self.records[index]
        f = self.path.parent / rec["sample"]
        t = load_file(str(f))
        for k in ("source", "target", "prompt_embeds"):
            if k not in t:
                raise ValueError(f"{f}: missing tensor {k!r} (needs source, target, prompt_embeds)")
        if t["source"].shape != t["target"].shape or t["source"].dim() != 3:
            raise ValueError(f"{f}: source {tuple(t['source'].shape)} and target "
                             f"{tuple(t['target'].shape)} must both be [C, H, W]")
        mask = t.get("prompt_mask", torch.ones(t["prompt_embeds"].shape[0]))
        return {"source": t["source"].float(), "target": t["target"].float(),
                "prompt_embeds": t["prompt_embeds"].float(), "prompt_mask": mask.float(),
                "task": rec.get("task"), "task_name": rec["task_name"],
                "task_index": self.task_names.index(rec["task_name"]),
                **flow_draws(self.seed, self.split, index, t["source"].shape)}


def _task_key(task: Optional[Mapping[str, Any]]) -> str:
    if not task:
        return "unlabelled"
    return "/".join(f"{k}={v if isinstance(v, str) else '+'.join(v)}" for k, v in sorted(task.items()))


class EditingCollator:
    """Samples -> batch: source, target, noise [B, C, H, W]; u [B]; prompt_embeds [B, L, T];
    prompt_mask [B, L]; task_ids [B, levels]; task_multi_hot [B, N]; task_index [B]; task_name;
    attention_mask [B, S] (ones over the image tokens the transformer computes: target and
    source, 2x2-packed; the trainer counts tokens with it)."""

    def __init__(self, schema: TaskSchema):
        if not isinstance(schema, TaskSchema):
            raise ValueError(f"EditingCollator: 'schema' must be a TaskSchema, got {type(schema).__name__}")
        self.schema = schema

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict:
        if len(samples) == 0:
            raise ValueError("EditingCollator: got an empty list of samples; use batch_size >= 1")
        shapes = {(tuple(s["source"].shape), tuple(s["prompt_embeds"].shape)) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"EditingCollator: samples of different shapes {sorted(shapes)}; a batch "
                             "needs one latent size and one (padded) instruction length")
        descriptors = [s["task"] for s in samples]
        src = torch.stack([s["source"] for s in samples])
        tokens = 2 * (src.shape[-2] // 2) * (src.shape[-1] // 2)
        return {
            "source": src, "target": torch.stack([s["target"] for s in samples]),
            "noise": torch.stack([s["noise"] for s in samples]),
            "u": torch.stack([torch.as_tensor(s["u"]) for s in samples]),
            "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
            "prompt_mask": torch.stack([s["prompt_mask"] for s in samples]),
            "task_ids": level_ids(self.schema, descriptors),
            "task_multi_hot": self.schema.multi_hot(descriptors),
            "task_index": torch.tensor([int(s["task_index"]) for s in samples], dtype=torch.long),
            "task_name": [str(s["task_name"]) for s in samples],
            "attention_mask": torch.ones(len(samples), tokens, dtype=torch.long),
        }
