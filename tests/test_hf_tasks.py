"""Task ids inside a Hugging Face model (tm.hf.tasks / TaskModel): the TAG alignment gradient is
the one of the loss written out by hand, and it is unchanged by Hugging Face gradient
checkpointing (reentrant and not) and gradient accumulation; evaluation without tags works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import hf_models as H
from tests.tolerance import REL_FP32, rel_diff

pytest.importorskip("transformers")

SCHEMA = str(Path(__file__).resolve().parents[1] / "configs/tasks/text_tasks.yaml")
MOE = dict(router="task_aware", align_loss_coeff=0.7, aux_loss_coeff=0.05, z_loss_coeff=0.01,
           align_target="learned")


def _model(src):
    import tagmoe_dist as tm
    torch.manual_seed(0)
    return tm.hf.from_pretrained(src, moe=MOE, task_schema=SCHEMA).train()


def _batches(num_tags):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):                        # two micro-batches of gradient accumulation
        ids_BS = torch.randint(0, 101, (3, 10), generator=g)
        task_BN = torch.zeros(3, num_tags)
        task_BN[0, 1] = task_BN[1, 4] = task_BN[2, 0] = 1.0
        out.append((ids_BS, task_BN))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, checkpointing=None):
    """Two micro-batches through tm.hf.tasks; backward after each block has closed."""
    import tagmoe_dist as tm
    if checkpointing is not None:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpointing})
    tm.hf.set_aux_loss_scale(model, 0.5)
    losses = []
    for ids_BS, task_BN in _batches(model.tagmoe_alignment.schema.num_tags):
        with tm.hf.tasks(model, task_BN):
            out = model(ids_BS, labels=ids_BS)
        (out.loss * 0.5).backward()
        losses.append(float(out.loss.detach()))
    return losses, _grads(model)


def _run_by_hand(model):
    """The same objective written out: L = mean_mb [lm + aux terms + coeff * L_align(g)], with
    g the per-sample mean routing distribution averaged over every MoE layer."""
    import tagmoe_dist as tm
    from tagmoe_dist.gating.task_aware import per_sample_mean
    tm.hf.set_aux_loss_scale(model, 0.5)
    head = model.tagmoe_alignment
    blocks = [m for m in model.modules() if type(m).__name__ == "HFMoEBlock"]
    losses = []
    for ids_BS, task_BN in _batches(head.schema.num_tags):
        inputs = []
        hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
        out = model(ids_BS, labels=ids_BS)     # no task context: aux / z losses only
        for h in hooks:
            h.remove()
        sigs = []
        for b, x_BSD in zip(blocks, inputs):
            B, S, D = x_BSD.shape
            probs_TE = torch.softmax(x_BSD.reshape(-1, D) @ b.moe.router.weight.t(), -1)
            sigs.append(per_sample_mean(probs_TE, torch.arange(B).repeat_interleave(S), B))
        g_BE = torch.stack(sigs).mean(0)
        align, _ = head.loss(g_BE, task_BN)
        (0.5 * (out.loss + MOE["align_loss_coeff"] * align)).backward()
        losses.append(float(out.loss.detach()))
    return losses, _grads(model)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return str(H.save("mixtral", tmp_path_factory.mktemp("tasks") / "mixtral"))


def _close(want, got, tol=REL_FP32):
    assert want.keys() == got.keys()
    for n in want:
        assert rel_diff(got[n], want[n]) <= tol, n


def test_alignment_gradient_matches_hand_written_loss(src):
    losses, grads = _run(_model(src))
    want_losses, want = _run_by_hand(_model(src))
    assert losses == pytest.approx(want_losses, rel=1e-6)
    _close(want, grads)
    # the alignment term reaches every router and the head
    assert all(grads[n].abs().sum() > 0 for n in grads if "router" in n or "tagmoe_alignment" in n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(src, reentrant):
    losses, grads = _run(_model(src))
    ck_losses, ck_grads = _run(_model(src), checkpointing=reentrant)
    assert ck_losses == losses
    _close(grads, ck_grads)


def test_wrapper_and_eval_without_tags(src):
    import tagmoe_dist as tm
    model = _model(src)
    ids_BS, task_BN = _batches(model.tagmoe_alignment.schema.num_tags)[0]
    wrapped = tm.hf.TaskModel(model)
    out = wrapped(ids_BS, task=task_BN, labels=ids_BS)
    out.loss.backward()
    assert model.tagmoe_alignment.predictor[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        plain = model(ids_BS).logits
        with tm.hf.tasks(model, None):
            untagged = model(ids_BS).logits
        tagged = wrapped(ids_BS, task=task_BN).logits
    assert torch.equal(plain, untagged) and torch.equal(plain, tagged)
    assert "loss" in tm.hf.last_align(model)     # evaluation with tags reports the alignment
