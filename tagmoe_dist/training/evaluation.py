"""What the model has learned, in words a new user reads: per-task exact match and a few answers.

Exact match of a held-out sample: every supervised token (the answer and its end token) is the
model's argmax given the true tokens before it. That is exactly "greedy decoding reproduces the
answer": if every step's argmax equals the true token, greedy decoding writes the true answer;
at the first step where it does not, greedy decoding leaves it. So it costs no generation, only
the forward the evaluation loss already runs.

`greedy_answers` does generate, for the few prompts printed at the end of training. Every rank
runs the same number of forwards on the same prompts, since expert-parallel layers exchange
tokens in every forward (the eval sets are identical on every rank).

Notation: B samples, S positions, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tagmoe_dist.data.collate import IGNORE_INDEX
from tagmoe_dist.models.gpt import lm_loss


def exact_match_B(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """[B] bool: every supervised token predicted (logits at t predict labels[t + 1]); False for
    a sample without supervised tokens."""
    pred_BS = logits_BSV[:, :-1].argmax(-1)
    labels_BS = labels_BS[:, 1:]
    valid_BS = labels_BS != IGNORE_INDEX
    return ((pred_BS == labels_BS) | ~valid_BS).all(1) & valid_BS.any(1)


@torch.no_grad()
def evaluate(engine, model, sets, collate, device,
             progress: Optional[Callable[[str], None]] = None,
             logits_fn: Optional[Callable[[dict], torch.Tensor]] = None
             ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({task: loss}, {task: exact-match fraction}) on each held-out set, one batch per task.
    `logits_fn(batch)`: the model's logits for a collated batch (default: the reference GPT's
    `engine(input_ids, task=...)`; Hugging Face models also take the attention mask)."""
    model.eval()
    losses, exact = {}, {}
    try:
        for name, ds in sets.items():
            if progress is not None:
                progress(f"evaluating {name}")
            batch = collate([ds[i] for i in range(len(ds))])
            logits = (logits_fn(batch) if logits_fn is not None else
                      engine(batch["input_ids"].to(device), task=batch["task_multi_hot"].to(device)))
            labels = batch["labels"].to(device)
            losses[name] = float(lm_loss(logits, labels))
            exact[name] = float(exact_match_B(logits, labels).double().mean())
    finally:
        model.train()
    return losses, exact


def _tokenizer(ds):
    """The tokenizer of a dataset or of the dataset under a Subset."""
    while not hasattr(ds, "tokenizer") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return getattr(ds, "tokenizer", None)


@torch.no_grad()
def greedy_answers(engine, model, sets, collate, device, per_task: int = 2,
                   max_new_tokens: int = 32) -> List[dict]:
    """Greedy answers to the first `per_task` prompts of each held-out set: a list of
    {task, prompt, expected, answer} (decoded text). A prompt is a sample's tokens before its
    first supervised one; generation stops at the tokenizer's end token or the sequence length."""
    samples = [(name, ds[i], _tokenizer(ds)) for name, ds in sets.items()
               for i in range(min(per_task, len(ds)))]
    if not samples:
        return []
    batch = collate([s for _, s, _ in samples])
    ids_BS, labels_BS = batch["input_ids"].clone(), batch["labels"]
    B, S = ids_BS.shape
    supervised_BS = labels_BS != IGNORE_INDEX
    first_B = torch.where(supervised_BS.any(1), supervised_BS.float().argmax(1),
                          torch.full((B,), S)).long()
    pos_B = first_B.clone()                    # where the next generated token goes
    done_B = pos_B >= S
    task = batch["task_multi_hot"].to(device)
    eos = [tok.eos_id if tok is not None else None for _, _, tok in samples]
    model.eval()
    try:
        for _ in range(min(max_new_tokens, S)):     # the same count on every rank
            logits_BSV = engine(ids_BS.to(device), task=task)
            rows = torch.arange(B)
            next_B = logits_BSV[rows, (pos_B - 1).clamp(max=S - 1)].argmax(-1).cpu()
            write_B = ~done_B
            ids_BS[rows[write_B], pos_B[write_B]] = next_B[write_B]
            pos_B = torch.where(write_B, pos_B + 1, pos_B)
            hit_eos = torch.tensor([e is not None and int(t) == e for t, e in zip(next_B, eos)])
            done_B = done_B | (write_B & hit_eos) | (pos_B >= S)
    finally:
        model.train()
    out = []
    for b, (name, sample, tok) in enumerate(samples):
        start = int(first_B[b])
        answer_ids = ids_BS[b, start:int(pos_B[b])].tolist()
        expected_ids = sample["labels"][start:][sample["labels"][start:] != IGNORE_INDEX].tolist()
        prompt_ids = sample["input_ids"][:start].tolist()
        text = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: str(ids))
        out.append({"task": name, "prompt": text(prompt_ids), "expected": text(expected_ids),
                    "answer": text(answer_ids), "correct": answer_ids == expected_ids})
    return out


def format_answers(rows: Sequence[dict]) -> List[str]:
    """One line per answer: task, prompt -> answer, and what was expected when it is wrong."""
    width = max((len(r["task"]) for r in rows), default=0)
    lines = []
    for r in rows:
        verdict = "ok" if r["correct"] else f"wrong, expected {r['expected']!r}"
        lines.append(f"  {r['task']:<{width}}  {r['prompt']!r} -> {r['answer']!r}  ({verdict})")
    return lines
