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
from tagmoe_dist.data import SyntheticTextTasks, TaskCollator, eval_splits
from tagmoe_dist.layer import plan_overlap
from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss
from tagmoe_dist.training import checkpoint as ckpt
from tagmoe_dist.training.logging import MetricLogger

TRAIN_DEFAULTS: Dict[str, Any] = dict(
    seed=0, ep_size=1, steps=100, batch_size_per_rank=8, grad_accum=1, lr=1e-3, min_lr=1e-4,
    warmup_steps=10, weight_decay=0.0, grad_clip=1.0, eval_interval=50, eval_samples_per_task=32,
    log_interval=10, checkpoint_interval=0, log_dir="runs/default", data="synthetic",
    eval_data="", tokenizer="byte", heartbeat_timeout_s=60.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tagmoe_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="model + training YAML (configs/models/*.yaml)")
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (configs/deepspeed/*.json)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in log_dir")
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
    for k in ("steps", "batch_size_per_rank", "grad_accum", "ep_size", "eval_samples_per_task"):
        if train[k] < 1:
            raise ValueError(f"train.{k} must be >= 1, got {train[k]}")
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
    all-reduce), so every rank writes the same final checkpoint."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

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


def build_data(cfg, train: Dict[str, Any], schema):
    """The built-in workload (train.data=synthetic) or the user's JSONL (train.data=FILE.jsonl,
    optional train.eval_data=FILE.jsonl whose records are evaluated per task)."""
    if train["data"] == "synthetic":
        data = SyntheticTextTasks(10 ** 9, seq_len=cfg.seq_len, seed=train["seed"], schema=schema)
        evals = eval_splits(train["eval_samples_per_task"], seq_len=cfg.seq_len, seed=train["seed"],
                            schema=schema)
        return data, evals
    from tagmoe_dist.data import JsonlTextDataset, load_tokenizer
    if schema is None:
        raise ValueError("train.data=<jsonl> needs a task schema: set task_schema in the model YAML")
    tok = load_tokenizer(None if train["tokenizer"] == "byte" else train["tokenizer"])
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"train.tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{cfg.vocab_size}; raise vocab_size in the model YAML")
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


@torch.no_grad()
def evaluate(engine, model, sets, collate, device) -> Dict[str, float]:
    model.eval()
    out = {}
    for name, ds in sets.items():
        batch = collate([ds[i] for i in range(len(ds))])
        logits = engine(batch["input_ids"].to(device), task=batch["task_multi_hot"].to(device))
        out[name] = float(lm_loss(logits, batch["labels"].to(device)))
    model.train()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = GPTConfig.from_yaml(args.config)
    train = load_train_config(cfg, args.set)

    from tagmoe_dist.integrations import deepspeed as tds
    from tagmoe_dist.launch import check_extension_locks
    check_extension_locks()
    # Everything that can be wrong with the input is checked before any process group waits,
    # so a bad config fails on every rank at once instead of hanging the healthy ones.
    from tagmoe_dist.launch import discover
    world = discover().world_size
    if world % train["ep_size"] != 0:
        raise ValueError(f"train.ep_size={train['ep_size']} does not divide the {world} processes; "
                         "launch a multiple of ep_size processes or change ep_size")
    ds_config = load_ds_config(args.deepspeed_config, train, world)
    schema = cfg.load_task_schema()
    data, evals = build_data(cfg, train, schema)
    tds.init_distributed()
    # A rank that dies or hangs makes the others exit (code 75) naming it, within the timeout.
    with faults.Watchdog.start(train["heartbeat_timeout_s"]):
        return _train(args, cfg, train, ds_config, world, schema, data, evals)


def _train(args, cfg: GPTConfig, train: Dict[str, Any], ds_config: Dict[str, Any], world: int,
           schema, data, evals) -> int:
    import deepspeed
    from tagmoe_dist.integrations import deepspeed as tds
    rank = dist.get_rank()
    if rank == 0:
        from tagmoe_dist.launch import discover
        info = discover()
        print(f"launch: {world} processes via {info.launcher}, master {info.master_addr}:"
              f"{info.master_port}", file=sys.stderr)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    torch.manual_seed(train["seed"])
    groups = tds.parallel_groups(train["ep_size"]) if not cfg.is_dense else None
    model = GPT(cfg, groups=groups, task_schema=schema).to(device)
    if model.alignment is not None and train["data"] == "synthetic":
        # TAG accuracy and collapse monitor against the targets of every built-in task
        from tagmoe_dist.data.synthetic import TEXT_TASKS
        model.alignment.set_candidates([dict(t.descriptor) for t in TEXT_TASKS])
    if not cfg.is_dense:
        tds.prepare_model(model)
    # overlap_chunks="auto": rates measured once here, never inside forward (collective)
    plan_overlap(model)
    model.set_aux_loss_scale(1.0 / train["grad_accum"])
    params = tds.optimizer_param_groups(model, train["weight_decay"])
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=train["lr"], betas=(0.9, 0.95))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                   optimizer=optimizer, config=ds_config)

    log_dir = Path(train["log_dir"])
    ckpt_dir = log_dir / "checkpoints"
    start = 0
    if args.resume:
        start = ckpt.load(engine, ckpt_dir, train["ep_size"] if not cfg.is_dense else None)
    elif rank == 0 and ckpt.has_checkpoint(ckpt_dir):
        print(f"note: {ckpt_dir} already holds checkpoints; pass --resume to continue from them",
              file=sys.stderr)
    if rank == 0:
        ckpt.write_run_config(ckpt_dir, args.config, cfg, schema, train, ds_config)

    dp_rank, dp_world = rank, world
    collate = TaskCollator(data.schema)
    logger = MetricLogger(log_dir, model, data.task_names, rank == 0, start, train["steps"])
    stop = StopFlag()

    step = start
    for step in range(start, train["steps"]):
        for g in engine.optimizer.param_groups:
            g["lr"] = lr_at(step, train)
        t0 = time.perf_counter()
        for micro in range(train["grad_accum"]):
            batch = collate([data[i] for i in batch_indices(step, micro, train, dp_rank, dp_world)])
            logits = engine(batch["input_ids"].to(device), task=batch["task_multi_hot"].to(device))
            loss_B = lm_loss(logits, batch["labels"].to(device), per_sample=True)
            loss = loss_B.mean()
            engine.backward(loss)
            engine.step()
            logger.observe(loss_B.detach(), batch)
        for layer in model.moe_layers():
            layer.update_expert_bias()
        tokens = int(batch["attention_mask"].sum()) * train["grad_accum"] * world
        logger.step_done(step, float(loss.detach()), tokens, time.perf_counter() - t0,
                         log=(step + 1) % train["log_interval"] == 0)
        done = step + 1
        if train["eval_interval"] and (done % train["eval_interval"] == 0 or done == train["steps"]):
            logger.log_eval(done, evaluate(engine, model, evals, collate, device))
        if stop.agreed():
            ckpt.save(engine, ckpt_dir, done)
            logger.message(f"stopped by signal at step {done}; checkpoint written")
            logger.close()
            return 0
        if train["checkpoint_interval"] and done % train["checkpoint_interval"] == 0:
            ckpt.save(engine, ckpt_dir, done)
    if train["steps"] > start:
        ckpt.save(engine, ckpt_dir, train["steps"])
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
