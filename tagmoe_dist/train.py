"""Training entry point: a multi-task GPT with (TAG-)MoE layers on the DeepSpeed engine.

    python -m tagmoe_dist.train --config configs/models/tiny_tag.yaml \
        --deepspeed_config configs/deepspeed/zero2.json

Runs under `torchrun`, the `deepspeed` launcher, SLURM `srun`, `mpirun` or plain `python` (one
process). Writes TensorBoard logs and DeepSpeed checkpoints (with our model config and task
schema beside them) under `train.log_dir`; `--resume` continues from the latest checkpoint with
the same loss trajectory as an uninterrupted run. SIGTERM / SIGINT write a checkpoint and exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

from tagmoe_dist import faults
from tagmoe_dist.checkpoint import engine as ckpt
from tagmoe_dist.data import SyntheticTextTasks, TaskCollator, check_vocab, eval_splits
from tagmoe_dist.layer import plan_overlap
from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss
from tagmoe_dist.training import evaluation, guard, run_dir
from tagmoe_dist.training.logging import MetricLogger, silence_known_deprecations

TRAIN_DEFAULTS: Dict[str, Any] = dict(
    seed=0, ep_size=1, steps=100, batch_size_per_rank=8, grad_accum=1, lr=1e-3, min_lr=1e-4,
    warmup_steps=10, weight_decay=0.0, grad_clip=1.0, eval_interval=50, eval_samples_per_task=32,
    log_interval=10, checkpoint_interval=0, log_dir="runs/default", data="synthetic",
    eval_data="", tokenizer="byte", heartbeat_timeout_s=60.0, keep_last=0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tagmoe_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="model + training YAML (configs/models/*.yaml)")
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (configs/deepspeed/*.json)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in log_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in a log_dir that holds an earlier run (its checkpoints/, "
                         "steps.jsonl and tb/ are deleted)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override train.* keys, e.g. --set steps=20 log_dir=/tmp/run")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; ignored (LOCAL_RANK is read instead)")
    return ap.parse_args(argv)


def load_train_config(cfg: GPTConfig, overrides) -> Dict[str, Any]:
    train = dict(TRAIN_DEFAULTS)
    given = dict(cfg.train or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        given[k] = v
    unknown = sorted(set(given) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown train.* key(s) {unknown}; valid keys: {sorted(TRAIN_DEFAULTS)}")
    for k, v in given.items():
        kind = type(TRAIN_DEFAULTS[k])
        try:
            train[k] = kind(v) if not isinstance(v, kind) else v
        except (TypeError, ValueError):
            raise ValueError(f"train.{k}={v!r} is not a valid {kind.__name__}") from None
    for k in ("steps", "batch_size_per_rank", "grad_accum", "ep_size", "eval_samples_per_task",
              "log_interval"):
        if train[k] < 1:
            raise ValueError(f"train.{k} must be >= 1, got {train[k]}")
    # -- run safety (docs/reliability.md): no NaN/inf setting, no negative retention
    for k, v in train.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"train.{k}={v} is not a finite number; give a finite value")
    if train["keep_last"] < 0:
        raise ValueError(f"train.keep_last must be >= 0 (0 keeps every checkpoint), got "
                         f"{train['keep_last']}")
    if train["heartbeat_timeout_s"] != 0 and train["heartbeat_timeout_s"] < 2:
        raise ValueError("train.heartbeat_timeout_s must be 0 (watchdog off) or >= 2 seconds, "
                         f"got {train['heartbeat_timeout_s']}")
    return train


def load_ds_config(path: str, train: Dict[str, Any], world: int) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--deepspeed_config {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: invalid JSON: {e}") from None
    from tagmoe_dist.integrations.deepspeed import check_zero_stage
    # The YAML is the single source of batch geometry; DeepSpeed must agree with it.
    ds["train_micro_batch_size_per_gpu"] = train["batch_size_per_rank"]
    ds["gradient_accumulation_steps"] = train["grad_accum"]
    ds["train_batch_size"] = train["batch_size_per_rank"] * train["grad_accum"] * world
    ds.setdefault("gradient_clipping", train["grad_clip"])
    check_zero_stage(ds, train["ep_size"])
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def lr_at(step: int, train: Dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < train["warmup_steps"]:
        return train["lr"] * (step + 1) / train["warmup_steps"]
    span = max(1, train["steps"] - train["warmup_steps"])
    t = min(1.0, (step - train["warmup_steps"]) / span)
    return train["min_lr"] + 0.5 * (train["lr"] - train["min_lr"]) * (1 + math.cos(math.pi * t))


class StopFlag:
    """Set by SIGTERM/SIGINT on any rank; agreed on by all ranks once per step (one tiny
    all-reduce), so every rank writes the same final checkpoint. A run stopped before its last
    step then exits 128 + the signal number (143 for SIGTERM), as a shell reports a process
    killed by it: schedulers and workflow tools must not read an unfinished run as done."""

    def __init__(self):
        self.raised = False
        self.exit_code = 128 + signal.SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True
        self.exit_code = 128 + signum

    def agreed(self) -> bool:
        if not dist.is_initialized():
            return self.raised
        t = torch.tensor([1.0 if self.raised else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def batch_indices(step: int, micro: int, train: Dict[str, Any], dp_rank: int, dp_world: int):
    """Sample ids of one micro-batch: a pure function of (step, micro-batch, rank), so a resumed
    run sees exactly the data an uninterrupted run would have seen."""
    B = train["batch_size_per_rank"]
    base = ((step * train["grad_accum"] + micro) * dp_world + dp_rank) * B
    return range(base, base + B)


class _Cycle(torch.utils.data.Dataset):
    """A finite dataset repeated: index i is sample i mod len (a pure function of i)."""

    def __init__(self, ds):
        if len(ds) == 0:
            raise ValueError("train.data holds no samples")
        self.ds, self.schema, self.task_names = ds, ds.schema, ds.task_names

    def __len__(self):
        return 10 ** 12

    def __getitem__(self, i):
        return self.ds[i % len(self.ds)]


# --- model-builder hook -------------------------------------------------------------------
# A model YAML may name a model that builds itself: a Hugging Face causal LM (`hf: <dir>`,
# integrations/hf/training.py) or a diffusers MMDiT (`diffusers:` section,
# integrations/diffusers/training.py). Such a config provides build_model and build_data (and a
# diffusers one collator and batch_loss); the reference GPT is built below otherwise.
def load_model_config(path: str):
    from tagmoe_dist.integrations.hf.training import HFModelConfig, is_hf_yaml
    if is_hf_yaml(path):
        return HFModelConfig.from_yaml(path)
    from tagmoe_dist.integrations.diffusers.training import DiffusersModelConfig, is_diffusers_yaml
    return DiffusersModelConfig.from_yaml(path) if is_diffusers_yaml(path) else GPTConfig.from_yaml(path)


def build_model(cfg, groups, schema):
    if hasattr(cfg, "build_model"):
        return cfg.build_model(groups, schema)
    return GPT(cfg, groups=groups, task_schema=schema)


def model_logits(engine, model, batch, device):
    kwargs = {"task": batch["task_multi_hot"].to(device)}
    if getattr(model, "takes_attention_mask", False):
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    return engine(batch["input_ids"].to(device), **kwargs)


def make_collator(cfg, schema):
    return cfg.collator(schema) if hasattr(cfg, "collator") else TaskCollator(schema)


def batch_loss(engine, model, cfg, batch, device) -> torch.Tensor:
    """Per-sample loss [B] of one collated batch."""
    if hasattr(cfg, "batch_loss"):
        return cfg.batch_loss(engine, batch, device)
    logits = model_logits(engine, model, batch, device)
    return lm_loss(logits, batch["labels"].to(device), per_sample=True)


@torch.no_grad()
def evaluate_loss_only(engine, model, sets, collate, device, cfg) -> Dict[str, float]:
    """Held-out loss per task for models without token logits (diffusers: flow matching)."""
    model.eval()
    try:
        return {name: float(batch_loss(engine, model, cfg, collate([ds[i] for i in range(len(ds))]),
                                       device).mean()) for name, ds in sets.items()}
    finally:
        model.train()
# --- end of the model-builder hook ---------------------------------------------------------


def build_data(cfg, train: Dict[str, Any], schema):
    """The built-in workload (train.data=synthetic) or the user's JSONL (train.data=FILE.jsonl,
    optional train.eval_data=FILE.jsonl whose records are evaluated per task)."""
    if hasattr(cfg, "build_data"):      # model-builder hook: the model's own workload
        data, evals = cfg.build_data(train, schema)
        return _Cycle(data), evals
    if train["data"] == "synthetic":
        data = SyntheticTextTasks(10 ** 9, seq_len=cfg.seq_len, seed=train["seed"], schema=schema)
        check_vocab(data.tokenizer, cfg.vocab_size)
        evals = eval_splits(train["eval_samples_per_task"], seq_len=cfg.seq_len, seed=train["seed"],
                            schema=schema)
        return data, evals
    from tagmoe_dist.data import JsonlTextDataset, load_tokenizer
    if schema is None:
        raise ValueError("train.data=<jsonl> needs a task schema: set task_schema in the model YAML")
    tok = load_tokenizer(None if train["tokenizer"] == "byte" else train["tokenizer"])
    check_vocab(tok, cfg.vocab_size)
    data = JsonlTextDataset(train["data"], schema, seq_len=cfg.seq_len, tokenizer=tok)
    evals = {}
    if train["eval_data"]:
        ev = JsonlTextDataset(train["eval_data"], schema, seq_len=cfg.seq_len, tokenizer=tok)
        per_task: Dict[str, list] = {}
        for i in range(len(ev)):
            per_task.setdefault(ev[i]["task_name"], []).append(i)
        evals = {name: torch.utils.data.Subset(ev, idx[:train["eval_samples_per_task"]])
                 for name, idx in per_task.items()}
    return _Cycle(data), evals


def main(argv=None) -> int:
    args = parse_args(argv)
    silence_known_deprecations()
    cfg = load_model_config(args.config)
    train = load_train_config(cfg, args.set)

    from tagmoe_dist.integrations import deepspeed as tds
    from tagmoe_dist.launch import check_extension_locks
    check_extension_locks()
    # Everything that can be wrong with the input is checked before any process group waits,
    # so a bad config fails on every rank at once instead of hanging the healthy ones.
    from tagmoe_dist.launch import discover, launcher_name
    world = discover().world_size
    if world % train["ep_size"] != 0:
        raise ValueError(f"train.ep_size={train['ep_size']} does not divide the {world} processes; "
                         "launch a multiple of ep_size processes or change ep_size")
    ds_config = load_ds_config(args.deepspeed_config, train, world)
    schema = cfg.load_task_schema()
    data, evals = build_data(cfg, train, schema)
    run_dir.check_fresh(Path(train["log_dir"]), args.resume, args.overwrite)
    launcher = discover().launcher                     # before init_distributed rewrites the env
    tds.init_distributed()
    if dist.get_rank() == 0:
        info = discover()
        print(f"launch: {world} processes via {launcher_name(launcher)}, master "
              f"{info.master_addr}:{info.master_port}", file=sys.stderr)
    # A rank that dies, hangs or stops making progress (e.g. stuck writing a checkpoint) makes
    # the others exit (code 75) naming it, within the timeout (tagmoe_dist/faults.py).
    with faults.Watchdog.start(train["heartbeat_timeout_s"]) as watchdog:
        code = _train(args, cfg, train, ds_config, world, schema, data, evals, watchdog)
    # Torn down here, as torch asks, not by the interpreter's exit: a finished rank was seen to
    # abort there now and then ("terminate called without an active exception", exit -6).
    dist.destroy_process_group()
    return code


def _train(args, cfg: GPTConfig, train: Dict[str, Any], ds_config: Dict[str, Any], world: int,
           schema, data, evals, watchdog) -> int:
    import deepspeed
    from tagmoe_dist.integrations import deepspeed as tds
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    # -- run safety: verify and compare the checkpoint before building anything (docs/reliability.md)
    log_dir = Path(train["log_dir"])
    ckpt_dir = log_dir / "checkpoints"
    run_config = ckpt.effective_config(cfg, train)
    resume, engine_config = None, ds_config
    if args.resume:
        explicit = [item.split("=", 1)[0] for item in args.set]
        resume = ckpt.prepare_resume(ckpt_dir, run_config, explicit, world,
                                     train["ep_size"] if not cfg.is_dense else None)
        # a universal checkpoint (reshard of a ZeRO-3 run): DeepSpeed's universal loader
        engine_config = ckpt.universal_config(ds_config, resume)
    elif args.overwrite:
        if rank == 0:
            for p in run_dir.clear(log_dir):
                print(f"--overwrite: removed {p}", file=sys.stderr)
        dist.barrier()
    # --
    torch.manual_seed(train["seed"])
    groups = tds.parallel_groups(train["ep_size"]) if not cfg.is_dense else None
    # ZeRO-3: partitioned as it is built (zero3.py), unless the model config says it cannot be
    with tds.build_context(ds_config, enabled=getattr(cfg, "zero3_init", True)):
        model = build_model(cfg, groups, schema).to(device)
    alignment = getattr(model, "alignment", None)
    if alignment is not None and train["data"] == "synthetic" and not hasattr(cfg, "build_data"):
        # TAG accuracy and collapse monitor against the targets of every built-in task
        from tagmoe_dist.data.synthetic import TEXT_TASKS
        alignment.set_candidates([dict(t.descriptor) for t in TEXT_TASKS])
    if not cfg.is_dense:
        tds.prepare_model(model, ds_config)
    # overlap_chunks="auto": rates measured once here, never inside forward (collective)
    plan_overlap(model)
    model.set_aux_loss_scale(1.0 / train["grad_accum"])
    params = tds.optimizer_param_groups(model, train["weight_decay"])
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=train["lr"], betas=(0.9, 0.95))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                   optimizer=optimizer, config=engine_config)

    start = 0
    if resume is not None:
        start = ckpt.load(engine, ckpt_dir, resume=resume)
    if rank == 0:
        ckpt.write_run_config(ckpt_dir, args.config, cfg, schema, train, ds_config)

    dp_rank, dp_world = rank, world
    collate = make_collator(cfg, data.schema)
    logger = MetricLogger(log_dir, model, data.task_names, rank == 0, start, train["steps"])
    stop = StopFlag()

    saved = []

    def save(done: int) -> None:              # a write that hangs is named (faults.py, step 5)
        watchdog.progress(f"writing checkpoint step_{done}")
        ckpt.save(engine, ckpt_dir, done, config=run_config, keep_last=train["keep_last"])
        saved.append(done)
        watchdog.progress(f"step {done + 1}")

    step = start
    for step in range(start, train["steps"]):
        for g in engine.optimizer.param_groups:
            g["lr"] = lr_at(step, train)
        t0 = time.perf_counter()
        for micro in range(train["grad_accum"]):
            batch = collate([data[i] for i in batch_indices(step, micro, train, dp_rank, dp_world)])
            loss_B = batch_loss(engine, model, cfg, batch, device)
            loss = loss_B.mean()
            engine.backward(loss)
            engine.step()
            logger.observe(loss_B.detach(), batch)
        try:  # -- run safety: a NaN/inf loss or gradient norm stops the run, uncheckpointed
            guard.check_finite(step, float(loss.detach()), engine.get_global_grad_norm(), device)
        except ckpt.NonFiniteError as e:
            logger.close()
            if rank == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        for layer in model.moe_layers():
            layer.update_expert_bias()
        tokens = int(batch["attention_mask"].sum()) * train["grad_accum"] * world
        logger.step_done(step, float(loss.detach()), tokens, time.perf_counter() - t0,
                         log=(step + 1) % train["log_interval"] == 0)
        done = step + 1
        watchdog.progress(f"step {done + 1}")
        if train["eval_interval"] and (done % train["eval_interval"] == 0 or done == train["steps"]):
            if hasattr(cfg, "batch_loss"):
                logger.log_eval(done, evaluate_loss_only(engine, model, evals, collate, device, cfg))
            else:
                logger.log_eval(done, *evaluation.evaluate(
                    engine, model, evals, collate, device, watchdog.progress,
                    logits_fn=lambda batch: model_logits(engine, model, batch, device)))
        if stop.agreed():
            save(done)
            logger.message(f"stopped by signal at step {done}; checkpoint written")
            logger.close()
            return stop.exit_code if done < train["steps"] else 0
        if train["checkpoint_interval"] and done % train["checkpoint_interval"] == 0:
            save(done)
    if train["steps"] > start:
        if saved[-1:] != [train["steps"]]:
            save(train["steps"])
        if evals and not hasattr(cfg, "build_data"):   # the built-in GPT; every rank: EP forwards
            logger.show_answers(evaluation.format_answers(
                evaluation.greedy_answers(engine, model, evals, collate, device)))
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
