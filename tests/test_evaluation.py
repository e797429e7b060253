"""Per-task exact match and greedy answers (tagmoe_dist/training/evaluation.py), on the built-in
held-out sets, with oracle "models" that know the tasks: a perfect one must score 100% and write
every answer; one that errs on one task must score 0% there, exactly where greedy decoding goes
wrong. And sample by sample, teacher-forced exact match
equals greedy decoding's correctness."""

from __future__ import annotations

import math

import torch

from tagmoe_dist.data import ByteTokenizer, TaskCollator, eval_splits, text_task_schema
from tagmoe_dist.training import evaluation
from tests.tolerance import REL_FP32

TOK = ByteTokenizer()
SCHEMA = text_task_schema()


def _answer(prompt: str) -> str:
    op, arg = prompt.split(":", 1)
    if op == "copy":
        return arg
    if op == "reverse":
        return arg[::-1]
    if op == "sort":
        return "".join(sorted(arg))
    if op.startswith("shift"):
        k = int(op[5:])
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in arg)
    a, b = arg.split("+")
    return str(int(a) + int(b))


class Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token of [BOS] prompt [SEP] answer [EOS],
    whatever the model has written so far after SEP; `wrong_task` gets a wrong last character."""

    def __init__(self, wrong_task: str = ""):
        super().__init__()
        self.wrong_task = wrong_task

    def forward(self, ids_BS, task=None):
        B, S = ids_BS.shape
        logits = torch.zeros(B, S, TOK.vocab_size)
        for b in range(B):
            row = ids_BS[b].tolist()
            sep = row.index(TOK.sep_id)
            prompt = TOK.decode(row[1:sep])
            answer = _answer(prompt)
            if prompt.split(":")[0].rstrip("0123456789") == self.wrong_task:
                answer = answer[:-1] + ("a" if answer[-1] != "a" else "b")
            gold = row[:sep + 1] + TOK.encode(answer) + [TOK.eos_id]
            for t in range(S - 1):
                logits[b, t, gold[t + 1] if t + 1 < len(gold) else TOK.pad_id] = 10.0
        return logits


def _sets():
    return eval_splits(6, seq_len=64, seed=3)


def test_perfect_model_scores_100_percent_and_writes_every_answer():
    sets, collate = _sets(), TaskCollator(SCHEMA)
    losses, exact = evaluation.evaluate(Oracle(), Oracle(), sets, collate, "cpu")
    assert exact == {name: 1.0 for name in sets}
    want = math.log(1 + (TOK.vocab_size - 1) * math.exp(-10.0))   # logit 10 on the right token
    for v in losses.values():     # a difference of logits of size 10: rounding is relative to 10
        assert abs(v - want) <= REL_FP32 * 10.0, (v, want)
    rows = evaluation.greedy_answers(Oracle(), Oracle(), sets, collate, "cpu", per_task=2)
    assert len(rows) == 10 and all(r["correct"] for r in rows), rows
    r = next(r for r in rows if r["task"] == "reverse")
    assert r["prompt"].startswith("reverse:") and r["answer"] == r["prompt"][8:][::-1]
    lines = evaluation.format_answers(rows)
    assert lines[0].startswith("  copy     'copy:") and lines[0].endswith("(ok)")


def test_one_wrong_token_is_a_wrong_answer():
    sets, collate = _sets(), TaskCollator(SCHEMA)
    model = Oracle(wrong_task="sort")
    _, exact = evaluation.evaluate(model, model, sets, collate, "cpu")
    assert exact["sort"] == 0.0 and all(v == 1.0 for k, v in exact.items() if k != "sort")
    rows = evaluation.greedy_answers(model, model, sets, collate, "cpu", per_task=3)
    assert [r["correct"] for r in rows if r["task"] == "sort"] == [False] * 3
    assert all(r["correct"] for r in rows if r["task"] != "sort")
    bad = next(r for r in rows if r["task"] == "sort")
    assert "wrong, expected" in evaluation.format_answers([bad])[0]


class Flaky(Oracle):
    """The oracle, wrong at one answer position of some samples (chosen by the prompt's hash)."""

    def forward(self, ids_BS, task=None):
        logits = super().forward(ids_BS, task)
        for b in range(ids_BS.shape[0]):
            row = ids_BS[b].tolist()
            sep = row.index(TOK.sep_id)
            h = sum(row[1:sep]) % 7
            if h < 3:                                   # about 3 in 7 samples
                t = sep + h                             # predicts answer token h (or EOS)
                logits[b, t] = logits[b, t].roll(1)
        return logits


def test_teacher_forced_exact_match_equals_greedy_decoding():
    # the property the cheap exact match relies on, sample by sample
    sets, collate, model = eval_splits(12, seq_len=64, seed=5), TaskCollator(SCHEMA), Flaky()
    _, exact = evaluation.evaluate(model, model, sets, collate, "cpu")
    rows = evaluation.greedy_answers(model, model, sets, collate, "cpu", per_task=12)
    assert 0 < sum(r["correct"] for r in rows) < len(rows)
    for name in sets:
        greedy = sum(r["correct"] for r in rows if r["task"] == name) / 12
        assert greedy == exact[name], (name, greedy, exact[name])


def test_exact_match_ignores_unsupervised_positions():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = logits[0, 2, 6] = 1.0
    assert evaluation.exact_match_B(logits, labels).tolist() == [True, False]
    logits[0, 2, 6] = 0.0
    logits[0, 2, 7] = 1.0
    assert evaluation.exact_match_B(logits, labels).tolist() == [False, False]
