"""ZeRO-3 with expert parallelism (tagmoe_dist/integrations/zero3.py), real DeepSpeed engines on
gloo/CPU, each checked against ZeRO-2 computed in the same spawn.

  a. Equality: a tiny reference GPT (task-aware router: alignment head and tag embeddings are
     dense parameters; and the plain top-k router), AdamW + gradient clipping, 20 steps: every
     rank's per-step loss under ZeRO-3 equals ZeRO-2's within 1e-6 relative, at EP=2 on 2
     processes and EP=2 x expert-data-parallel 2 on 4 processes.
  b. Memory and placement: this rank's parameter, fp32-master and Adam bytes read from the
     engine's ZeRO-3 partitions equal the whole tensors divided by the data-parallel size (dense)
     and the expert-data-parallel size (experts), up to ZeRO's padding; each parameter is
     scattered over the right group, the blocks' already while the model is built.
  c. Rank-skipping experts: routing forced (aux-loss-free bias) onto rank 0's experts, so rank 1's
     experts receive no token; ZeRO-3 with prefetching still steps (the process group timeout
     turns a hang into a failure) and equals ZeRO-2.
  d. Checkpoints: save at step 10 of 20, a new engine loads it and its steps 11-20 equal the
     uninterrupted run's bit for bit.
  e. The reference DiT (task-aware router, parameters held by the root module) under ZeRO-3
     equals ZeRO-2 for 6 steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

deepspeed = pytest.importorskip("deepspeed")
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(__file__).resolve().parents[1] / ".torch_extensions"))

STEPS, SAVE_AT, B = 20, 10, 2
REPO = Path(__file__).resolve().parents[1]


def gpt_config(router: str, **moe):
    from tagmoe_dist.models.gpt import GPTConfig
    return GPTConfig(vocab_size=64, seq_len=12, n_layer=2, n_head=2, d_model=16,
                     task_schema=str(REPO / "configs/tasks/text_tasks.yaml"),
                     moe=dict(ffn_hidden_size=16, num_experts=4, top_k=2, router=router,
                              overlap_chunks=1, align_dim=16, align_hidden=8, init_std=0.1, **moe))


def ds_config(stage: int, **zero):
    if stage == 3:       # every parameter partitioned (none kept whole as "persistent")
        zero = {"stage3_param_persistence_threshold": 0, **zero}
    return {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": stage, **zero}}


def batch(step: int, rank: int, schema):
    """Tokens and a task (one value id per level) per sample, a pure function of (step, rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 64, (B, 12), generator=g)
    task = torch.stack([torch.randint(0, len(lv.values), (B,), generator=g)
                        for lv in schema.levels], 1)
    return ids, task


def dit_config():
    from tagmoe_dist.models.dit import DiTConfig
    return DiTConfig(image_size=8, patch_size=4, n_layer=2, n_head=2, d_model=16,
                     task_schema=str(REPO / "configs/tasks/image_tasks.yaml"),
                     moe=dict(ffn_hidden_size=16, num_experts=4, top_k=2, router="task_aware",
                              overlap_chunks=1, align_dim=16, align_hidden=8, init_std=0.1))


def dit_steps(engine, model, schema, rank, steps):
    """Flow-matching steps of the DiT (models/dit.py flow_matching_loss, written through the
    engine's forward); the batch is a pure function of (step, rank)."""
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        target, source, noise = (torch.randn(B, 3, 8, 8, generator=g) for _ in range(3))
        t = torch.rand(B, generator=g)
        instruction = torch.randint(0, 19, (B, 3), generator=g)
        task = torch.stack([torch.randint(0, len(lv.values), (B,), generator=g)
                            for lv in schema.levels], 1)
        x_t = (1 - t[:, None, None, None]) * target + t[:, None, None, None] * noise
        loss = (engine(x_t, t, source, instruction, task=task) - (noise - target)).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def build_engine(cfg, stage: int, ep_size: int, seed: int = 0, **extra):
    """A DeepSpeed engine around a tiny GPT built the way tagmoe_dist.train builds it; `extra`:
    top-level DeepSpeed config entries."""
    from tagmoe_dist.integrations import deepspeed as tds
    from tagmoe_dist.models.dit import DiT, DiTConfig
    from tagmoe_dist.models.gpt import GPT
    ds = {**ds_config(stage), **extra}
    tds.check_zero_stage(ds, ep_size)
    groups = tds.parallel_groups(ep_size)
    schema = cfg.load_task_schema()
    torch.manual_seed(seed)
    with tds.build_context(ds):
        model = (DiT if isinstance(cfg, DiTConfig) else GPT)(cfg, groups=groups,
                                                             task_schema=schema)
    # which parameters zero3.init partitioned while building (before the engine exists)
    model.partitioned_at_build = sorted(n for n, p in model.named_parameters() if hasattr(p, "ds_id"))
    tds.prepare_model(model, ds)
    params = tds.optimizer_param_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt, config=ds)
    return engine, model, schema


def train_steps(engine, schema, rank, start, stop):
    from tagmoe_dist.models.gpt import lm_loss
    losses = []
    for step in range(start, stop):
        ids, task = batch(step, rank, schema)
        loss = lm_loss(engine(ids, task=task), ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------- workers
def _equality_worker(rank, world, ep_size, out_dir, with_checkpoint):
    from tagmoe_dist.integrations import zero3
    deepspeed.init_distributed(dist_backend="gloo")
    out = {"losses": {}, "bytes": {}, "numel": {}, "num_params": {}}
    for router in ("topk", "task_aware"):
        cfg = gpt_config(router)
        for stage in (2, 3):
            engine, model, schema = build_engine(cfg, stage, ep_size)
            losses = train_steps(engine, schema, rank, 0, STEPS)
            out["losses"][f"{router}/zero{stage}"] = losses
            out["num_params"][f"{router}/zero{stage}"] = [model.num_params(),
                                                          model.num_params(active_only=True)]
            if stage == 3:
                import torch.distributed as dist
                out["at_build"] = model.partitioned_at_build
                out["groups"] = {n: dist.get_process_group_ranks(p.ds_process_group)
                                 for n, p in model.named_parameters()}
                out["edp_ranks"] = dist.get_process_group_ranks(model.groups.edp_group)
                out["bytes"][router] = zero3.partition_bytes(engine)
                out["numel"][router] = zero3.full_numel(model)
                out["edp"], out["dp"] = model.groups.edp_size, model.groups.dp_size
            engine.destroy()
    if with_checkpoint:
        cfg = gpt_config("task_aware")
        ckpt = Path(out_dir) / "ckpt"
        engine, _, schema = build_engine(cfg, 3, ep_size)
        first = train_steps(engine, schema, rank, 0, SAVE_AT)
        engine.save_checkpoint(str(ckpt), tag="mid")
        rest = train_steps(engine, schema, rank, SAVE_AT, STEPS)
        engine.destroy()
        engine, _, schema = build_engine(cfg, 3, ep_size, seed=123)   # other initial weights
        engine.load_checkpoint(str(ckpt), tag="mid")
        resumed = train_steps(engine, schema, rank, SAVE_AT, STEPS)
        out["resume"] = {"first": first, "rest": rest, "resumed": resumed}
        engine.destroy()
        # c. every token on rank 0's experts: rank 1's experts see nothing, in forward and backward
        cfg = gpt_config("topk", expert_bias=True, expert_bias_update_rate=0.0)
        for stage in (2, 3):
            engine, model, schema = build_engine(cfg, stage, ep_size)
            for layer in model.moe_layers():
                layer.router.expert_bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))
            losses = train_steps(engine, schema, rank, 0, 4)
            loads = [layer.last_stats["load"].tolist() for layer in model.moe_layers()]
            out["losses"][f"skip/zero{stage}"] = losses
            out["skip_loads"] = loads
            engine.destroy()
        # e. the DiT (root-level parameters, the instruction table read by indexing)
        for stage in (2, 3):
            engine, model, schema = build_engine(dit_config(), stage, ep_size)
            out["losses"][f"dit/zero{stage}"] = dit_steps(engine, model, schema, rank, 6)
            engine.destroy()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_2proc")
    run_distributed(_equality_worker, 2, 2, str(out), True)
    return out


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_4proc")
    run_distributed(_equality_worker, 4, 2, str(out), False)
    return out


def _results(out_dir, world):
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]


def _assert_close(a, b, rtol=1e-6):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert ta.shape == tb.shape and ta.numel() > 0
    rel = ((ta - tb).abs() / tb.abs().clamp(min=1e-12)).max().item()
    assert rel <= rtol, f"max relative difference {rel:.2e} > {rtol:g}\n{a}\n{b}"


# ---------------------------------------------------------------------------- a. equality
@pytest.mark.parametrize("router", ["topk", "task_aware"])
def test_losses_equal_zero2_ep2(run2, router):
    for res in _results(run2, 2):
        _assert_close(res["losses"][f"{router}/zero3"], res["losses"][f"{router}/zero2"])


@pytest.mark.parametrize("router", ["topk", "task_aware"])
def test_losses_equal_zero2_ep2_edp2(run4, router):
    for res in _results(run4, 4):
        _assert_close(res["losses"][f"{router}/zero3"], res["losses"][f"{router}/zero2"])


# ---------------------------------------------------------------------------- b. memory
def _check_bytes(res, world):
    for router in ("topk", "task_aware"):     # the model's own count reads partitioned parameters
        assert res["num_params"][f"{router}/zero3"] == res["num_params"][f"{router}/zero2"], router
    for router in ("topk", "task_aware"):
        got, numel = res["bytes"][router], res["numel"][router]
        for kind, size in (("dense", res["dp"]), ("expert", res["edp"])):
            n = numel[kind]
            # ZeRO pads each parameter's partition to ceil(numel / size)
            low, high = 4 * n / size, 4 * (n / size + 64)
            assert low <= got[kind]["param"] <= high, (router, kind, got, n, size)
            assert low <= got[kind]["master"] <= high, (router, kind, got, n, size)
            assert 2 * low <= got[kind]["optim"] <= 2 * high, (router, kind, got, n, size)
    assert res["dp"] == world


def _check_groups(res, world):
    """Experts scattered over the expert-data-parallel group, the rest over all ranks; the
    experts and every block's parameters already while the model was built."""
    for name, ranks in res["groups"].items():
        want = res["edp_ranks"] if ".experts." in name else list(range(world))
        assert ranks == want, (name, ranks, want)
    built = set(res["at_build"])
    assert {n for n in res["groups"] if n.startswith("blocks.")} <= built, built


def test_partition_bytes_2proc(run2):
    for res in _results(run2, 2):
        assert res["edp"] == 1
        _check_bytes(res, 2)
        _check_groups(res, 2)


def test_partition_bytes_4proc(run4):
    for res in _results(run4, 4):
        assert res["edp"] == 2
        _check_bytes(res, 4)
        _check_groups(res, 4)


# ---------------------------------------------------------------------------- c. skipping
def test_rank_skipping_experts(run2):
    res = _results(run2, 2)
    for loads in res[0]["skip_loads"]:
        assert loads[2] == 0 and loads[3] == 0 and loads[0] > 0, loads   # rank 1's experts idle
    for r in res:
        _assert_close(r["losses"]["skip/zero3"], r["losses"]["skip/zero2"])


# ---------------------------------------------------------------------------- e. DiT
def test_dit_losses_equal_zero2_ep2(run2):
    for r in _results(run2, 2):
        _assert_close(r["losses"]["dit/zero3"], r["losses"]["dit/zero2"])


# ---------------------------------------------------------------------------- d. resume
def test_resume_is_bit_exact(run2):
    for r in _results(run2, 2):
        assert r["resume"]["resumed"] == r["resume"]["rest"], r["resume"]
        assert r["resume"]["first"] == r["losses"]["task_aware/zero3"][:SAVE_AT]
