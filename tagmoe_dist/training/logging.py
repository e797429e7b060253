"""Training metrics: TensorBoard scalars and histograms, a progress bar, per-task loss lines.

Every rank accumulates; at a log step the accumulators are summed over all ranks (one
all-reduce), so the logged numbers describe the whole job, not rank 0's shard. Only rank 0
writes. Notation: K tasks, E experts, L MoE layers.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from tagmoe_dist.analysis import heatmap_figure, task_expert_mutual_information

_AUX = ("aux", "z")


def silence_known_deprecations() -> None:
    """DeepSpeed's ZeRO-1/2 step gathers the updated partitions with
    torch.distributed.all_gather_into_tensor (deepspeed/runtime/zero/stage_1_and_2.py), which
    torch 2.13 deprecates with a FutureWarning that then repeats through the progress bar. It is
    not ours to fix and says nothing to the user: ignore that one message, nothing else."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


class MetricLogger:
    def __init__(self, log_dir: Path, model, task_names: List[str], is_main: bool, start: int,
                 total: int):
        self.model, self.task_names, self.is_main = model, list(task_names), is_main
        self.layers = model.moe_layers()
        K, L = len(task_names), len(self.layers)
        E = self.layers[0].cfg.num_experts if self.layers else 1
        self.E = E
        self._zero = lambda: {
            "loss_sum_K": torch.zeros(K), "count_K": torch.zeros(K),
            "routing_LKE": torch.zeros(L, K, E), "aux_L2": torch.zeros(L, len(_AUX)),
            "align_3": torch.zeros(3), "entropy_L": torch.zeros(L), "dropped_L": torch.zeros(L),
            "n": torch.zeros(1)}
        self.acc = self._zero()
        self.tokens, self.seconds = 0, 0.0
        self.writer = self.bar = self.jsonl = None
        if is_main:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            # a fresh run starts the file anew; a resumed one continues it
            self.jsonl = open(Path(log_dir) / "steps.jsonl", "a" if start else "w", encoding="utf-8")
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(str(Path(log_dir) / "tb"))
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0)

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def observe(self, loss_B: torch.Tensor, batch) -> None:
        a = self.acc
        task_B = batch["task_index"]
        a["loss_sum_K"].index_add_(0, task_B, loss_B.float().cpu())
        a["count_K"].index_add_(0, task_B, torch.ones_like(loss_B, dtype=torch.float).cpu())
        for i, layer in enumerate(self.layers):
            st = layer.last_stats
            if "sample_load" in st:
                a["routing_LKE"][i].index_add_(0, task_B, st["sample_load"].float().cpu())
            for j, name in enumerate(_AUX):
                if name in layer.last_losses:
                    a["aux_L2"][i, j] += float(layer.last_losses[name])
            a["entropy_L"][i] += float(st.get("entropy", 0.0))
            a["dropped_L"][i] += float(st.get("dropped_fraction", 0.0))
        align = getattr(self.model, "last_align", {}) or {}
        if align:
            # the collapse monitor (min pairwise 1 - cos of the task targets), when the host has it
            dist_ = float(align.get("target_min_dist", 0.0))
            a["align_3"] += torch.tensor([float(align["loss"]), float(align["acc"]),
                                          dist_ if dist_ == dist_ else 0.0])      # NaN: no pair
        a["n"] += 1

    def step_done(self, step: int, loss: float, tokens: int, seconds: float, log: bool) -> None:
        if self.jsonl is not None:
            # every step's loss (rank 0's micro-batch), for exact comparisons across runs
            self.jsonl.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")
            self.jsonl.flush()
        self.tokens += tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}",
                                 refresh=False)
        if log:
            self._flush(step + 1)

    def _flush(self, step: int) -> None:
        a = self.acc
        if dist.is_initialized():
            flat = torch.cat([v.reshape(-1) for v in a.values()])
            dist.all_reduce(flat)
            off = 0
            for k, v in a.items():
                a[k] = flat[off:off + v.numel()].view_as(v)
                off += v.numel()
            world = dist.get_world_size()
        else:
            world = 1
        if self.is_main:
            self._write(step, a, world)
        self.acc = self._zero()
        self.tokens, self.seconds = 0, 0.0

    def _write(self, step: int, a: Dict[str, torch.Tensor], world: int) -> None:
        w = self.writer
        n = float(a["n"]) or 1.0          # micro-batch observations summed over ranks
        per_task = {}
        for k, name in enumerate(self.task_names):
            if a["count_K"][k] > 0:
                per_task[name] = float(a["loss_sum_K"][k] / a["count_K"][k])
                w.add_scalar(f"loss/{name}", per_task[name], step)
        total = float(a["loss_sum_K"].sum() / a["count_K"].sum().clamp(min=1))
        w.add_scalar("loss/train", total, step)
        w.add_scalar("perf/tokens_per_s", self.tokens / max(self.seconds, 1e-9), step)
        for i in range(len(self.layers)):
            for j, aux in enumerate(_AUX):
                w.add_scalar(f"moe/{aux}_loss/layer{i}", float(a["aux_L2"][i, j]) / n, step)
            w.add_scalar(f"moe/routing_entropy/layer{i}", float(a["entropy_L"][i]) / n, step)
            w.add_scalar(f"moe/dropped_fraction/layer{i}", float(a["dropped_L"][i]) / n, step)
            counts_KE = a["routing_LKE"][i]
            if counts_KE.sum() > 0:
                w.add_scalar(f"moe/task_expert_mi/layer{i}",
                             task_expert_mutual_information(counts_KE), step)
                w.add_figure(f"routing/task_expert_layer{i}",
                             heatmap_figure(counts_KE, self.task_names,
                                            title=f"layer {i}: routing share by task"), step)
                load_E = counts_KE.sum(0)
                w.add_histogram(f"moe/expert_load/layer{i}",
                                torch.repeat_interleave(torch.arange(self.E), load_E.long()),
                                step, bins=self.E)
        if self.layers and a["routing_LKE"].sum() > 0:
            mi = sum(task_expert_mutual_information(a["routing_LKE"][i])
                     for i in range(len(self.layers))) / len(self.layers)
            w.add_scalar("moe/task_expert_mi/mean", mi, step)
        if a["align_3"].any():
            w.add_scalar("moe/align_loss", float(a["align_3"][0]) / n, step)
            w.add_scalar("moe/align_accuracy", float(a["align_3"][1]) / n, step)
            w.add_scalar("moe/align_target_min_dist", float(a["align_3"][2]) / n, step)
        tasks = "  ".join(f"{k} {v:.3f}" for k, v in per_task.items())
        self.message(f"step {step}: loss {total:.3f} | {tasks}")

    def log_eval(self, step: int, losses: Dict[str, float],
                 exact: Optional[Dict[str, float]] = None) -> None:
        """Held-out loss per task and, when given, exact match per task (the fraction of held-out
        prompts whose whole answer greedy decoding gets right; training/evaluation.py)."""
        if not self.is_main or not losses:
            return
        for name, v in losses.items():
            self.writer.add_scalar(f"eval/{name}", v, step)
        worst = max(losses.values())
        self.writer.add_scalar("eval/worst_task", worst, step)
        self.writer.add_scalar("eval/mean", sum(losses.values()) / len(losses), step)
        text = f"eval step {step}: loss " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
        if exact:
            for name, v in exact.items():
                self.writer.add_scalar(f"eval_exact_match/{name}", v, step)
            self.writer.add_scalar("eval_exact_match/mean", sum(exact.values()) / len(exact), step)
            text += " | exact match " + "  ".join(f"{k} {100 * v:.0f}%" for k, v in exact.items())
        self.message(text)

    def show_answers(self, lines: List[str]) -> None:
        """A few held-out prompts with the model's greedy answers (after the last step)."""
        if lines:
            self.message("answers to held-out prompts (greedy decoding):\n" + "\n".join(lines))

    def message(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
