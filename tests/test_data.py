"""Tests of the data layer: synthetic tasks, sharding, collate, JSONL reader, tokenizers."""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from tagmoe_dist.data import (IGNORE_INDEX, TASK_NAMES, TEXT_TASKS, ByteTokenizer,
                              JsonlTextDataset, ShardSampler, SyntheticTextTasks, TaskCollator,
                              eval_splits, load_tokenizer, shard_indices, text_task_schema)
from tagmoe_dist.tasks import TaskSchema

TOK = ByteTokenizer()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask")) \
        and a["task"] == b["task"] and a["task_name"] == b["task_name"]


# ------------------------------------------------------------------ synthetic: determinism
def test_same_seed_same_samples_and_index_order_irrelevant():
    a, b = SyntheticTextTasks(200, seed=7), SyntheticTextTasks(200, seed=7)
    for i in reversed(range(200)):      # random access in any order gives the same sample
        assert _same(a[i], b[i])


def test_different_seed_index_or_split_differ():
    ds = SyntheticTextTasks(200, seed=0)
    texts = [ds.text(i) for i in range(200)]
    assert len(set(texts)) > 190        # different indices -> (almost always) different samples
    other_seed = SyntheticTextTasks(200, seed=1)
    assert sum(ds.text(i) != other_seed.text(i) for i in range(200)) > 190
    eval_ds = SyntheticTextTasks(200, seed=0, split="eval")
    assert sum(ds.text(i) != eval_ds.text(i) for i in range(200)) > 190


def test_out_of_range_index_raises():
    ds = SyntheticTextTasks(3)
    with pytest.raises(IndexError):
        ds[3]
    assert len(list(ds)) == 3           # the sequence protocol stops at the IndexError


# ------------------------------------------------------------------ synthetic: correctness
def _expected_answer(prompt: str) -> str:
    op, payload = prompt.split(":", 1)
    if op == "copy":
        return payload
    if op == "reverse":
        return payload[::-1]
    if op == "sort":
        return "".join(sorted(payload))
    if op.startswith("shift"):
        k = int(op[len("shift"):])
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in payload)
    if op == "add":
        a, b = payload.split("+")
        return str(int(a) + int(b))
    raise AssertionError(f"unknown op {op!r}")


def test_every_task_answer_is_correct_and_tokens_match_text():
    ds = SyntheticTextTasks(600, seed=3, max_len=12, max_digits=5)
    seen = set()
    for i in range(len(ds)):
        name, prompt, answer = ds.text(i)
        seen.add(name)
        assert prompt.split(":")[0].rstrip("0123456789") == name
        assert answer == _expected_answer(prompt), (i, prompt, answer)
        ids = ds[i]["input_ids"].tolist()
        n = ds[i]["attention_mask"].sum().item()
        assert ids[:n] == ([TOK.bos_id] + list(prompt.encode()) + [TOK.sep_id]
                           + list(answer.encode()) + [TOK.eos_id])
        assert all(t == TOK.pad_id for t in ids[n:])
    assert seen == set(TASK_NAMES)


def test_sort_and_reverse_really_differ_from_copy():
    ds = SyntheticTextTasks(300, seed=0, tasks=["reverse", "sort", "shift"], min_len=4)
    for i in range(len(ds)):
        name, prompt, answer = ds.text(i)
        payload = prompt.split(":", 1)[1]
        if name == "reverse":
            assert answer == payload[::-1] and len(answer) == len(payload)
        elif name == "sort":
            assert list(answer) == sorted(payload)
        else:
            assert answer != payload


def test_loss_mask_covers_exactly_the_answer_and_eos():
    ds = SyntheticTextTasks(300, seed=5)
    for i in range(len(ds)):
        s = ds[i]
        ids, labels = s["input_ids"], s["labels"]
        _, prompt, answer = ds.text(i)
        sep = (ids == TOK.sep_id).nonzero().flatten().tolist()
        assert len(sep) == 1 and sep[0] == 1 + len(prompt.encode())
        start, end = sep[0] + 1, sep[0] + 1 + len(answer.encode()) + 1   # answer bytes + EOS
        mask = labels != IGNORE_INDEX
        assert mask.nonzero().flatten().tolist() == list(range(start, end))
        assert torch.equal(labels[mask], ids[mask])
        assert ids[end - 1].item() == TOK.eos_id


def test_tasks_are_roughly_balanced():
    ds = SyntheticTextTasks(2000, seed=11)
    counts = {n: 0 for n in TASK_NAMES}
    for i in range(len(ds)):
        counts[ds.text(i)[0]] += 1
    assert all(300 <= c <= 500 for c in counts.values()), counts


def test_bad_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match="seq_len"):
        SyntheticTextTasks(10, seq_len=16, max_len=16)
    with pytest.raises(ValueError, match="tasks"):
        SyntheticTextTasks(10, tasks=["translate"])
    with pytest.raises(ValueError, match="min_len"):
        SyntheticTextTasks(10, min_len=5, max_len=2)
    with pytest.raises(ValueError, match="schema"):
        SyntheticTextTasks(10, schema=TaskSchema.from_dict({"levels": {"scope": ["x", "y"]}}))


def test_eval_splits_are_single_task_and_separate_from_train():
    train = SyntheticTextTasks(100, seed=0)
    evals = eval_splits(50, seed=0)
    assert set(evals) == set(TASK_NAMES)
    train_texts = {train.text(i) for i in range(100)}
    for name, ds in evals.items():
        assert len(ds) == 50 and ds.split == "eval"
        names = {ds.text(i)[0] for i in range(50)}
        assert names == {name}
        assert ds[0]["task_index"] == TASK_NAMES.index(name)
        assert sum(ds.text(i) in train_texts for i in range(50)) < 5


# ------------------------------------------------------------------ schema and descriptors
def test_descriptors_valid_and_distinct_under_the_yaml_schema():
    schema = text_task_schema()
    assert schema.level_names == ["scope", "type", "preservation"]
    assert not schema.levels[0].multi and schema.levels[1].multi
    mh = schema.multi_hot([t.descriptor for t in TEXT_TASKS])
    assert len({tuple(r.tolist()) for r in mh}) == len(TEXT_TASKS)  # tasks distinguishable
    for t, row in zip(TEXT_TASKS, mh):
        decoded = schema.decode(row)
        assert decoded["scope"] == t.descriptor["scope"]
        assert sorted(decoded["type"]) == sorted(t.descriptor["type"])
        assert (row[:2].sum() == 1)    # exactly one scope


# ------------------------------------------------------------------ collate
def test_collate_shapes_dtypes_and_task_forms():
    ds = SyntheticTextTasks(64, seq_len=48, seed=2, max_len=12)
    schema = ds.schema
    batch = TaskCollator(schema)([ds[i] for i in range(16)])
    B, S = 16, 48
    assert batch["input_ids"].shape == (B, S) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (B, S) and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].shape == (B, S) and batch["attention_mask"].dtype == torch.long
    assert batch["task_ids"].shape == (B, schema.num_levels) and batch["task_ids"].dtype == torch.long
    assert batch["task_multi_hot"].shape == (B, schema.num_tags)
    assert batch["task_multi_hot"].dtype == torch.float32
    assert batch["task_index"].shape == (B,) and batch["task_index"].dtype == torch.long
    assert isinstance(batch["task_name"], list) and len(batch["task_name"]) == B
    assert [TASK_NAMES[i] for i in batch["task_index"].tolist()] == batch["task_name"]
    # both forms pass the schema's validation; the id form is a subset of the multi-hot form
    mh = schema.to_multi_hot(batch["task_multi_hot"])
    from_ids = schema.to_multi_hot(batch["task_ids"])
    assert bool((from_ids <= mh).all())
    assert torch.equal(batch["task_ids"][:, 0], mh[:, :2].argmax(1))   # scope always known
    assert bool(((batch["labels"] == IGNORE_INDEX) | (batch["attention_mask"] == 1)).all())


def test_collate_rejects_mixed_lengths_and_empty():
    schema = text_task_schema()
    a = SyntheticTextTasks(2, seq_len=48, max_len=12)[0]
    b = SyntheticTextTasks(2, seq_len=64)[0]
    with pytest.raises(ValueError, match="seq_len"):
        TaskCollator(schema)([a, b])
    with pytest.raises(ValueError, match="batch_size"):
        TaskCollator(schema)([])


def test_dataloader_end_to_end_with_sharding():
    ds = SyntheticTextTasks(40, seed=0)
    sampler = ShardSampler(len(ds), rank=1, world_size=4, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=TaskCollator(ds.schema))
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (4, 64)


# ------------------------------------------------------------------ sharding
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), w=st.integers(1, 9), shuffle=st.booleans(), seed=st.integers(0, 5))
def test_shards_are_disjoint_and_cover(n, w, shuffle, seed):
    full = [list(shard_indices(n, r, w, shuffle=shuffle, seed=seed, drop_last=False))
            for r in range(w)]
    flat = [i for s in full for i in s]
    assert sorted(flat) == list(range(n))                  # disjoint and covering
    dropped = [list(shard_indices(n, r, w, shuffle=shuffle, seed=seed)) for r in range(w)]
    assert len({len(s) for s in dropped}) == 1             # equal per-rank counts
    flat = [i for s in dropped for i in s]
    assert len(set(flat)) == len(flat) == n - n % w


def test_shuffle_is_reproducible_per_epoch_and_sampler_resumes():
    a = list(shard_indices(100, 0, 2, shuffle=True, seed=1, epoch=0))
    assert a == list(shard_indices(100, 0, 2, shuffle=True, seed=1, epoch=0))
    assert a != list(shard_indices(100, 0, 2, shuffle=True, seed=1, epoch=1))
    sampler = ShardSampler(101, rank=1, world_size=2, shuffle=True, seed=1, drop_last=False)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == 50
    sampler.set_epoch(3, skip=17)
    assert list(sampler) == full[17:] and len(sampler) == 33


def test_bad_shard_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_indices(10, 0, 0)


# ------------------------------------------------------------------ JSONL
SCHEMA_YAML = """
levels:
  scope: [summarize, translate]
  type: {values: [news, chat, code], multi: true}
"""


@pytest.fixture
def schema(tmp_path):
    p = tmp_path / "schema.yaml"
    p.write_text(SCHEMA_YAML)
    return TaskSchema.from_yaml(p)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _real_tokens(sample):
    return sample["input_ids"][sample["attention_mask"].bool()].tolist()


def test_jsonl_round_trip(tmp_path, schema):
    records = [
        {"text": "héllo wörld", "task": {"scope": "translate", "type": ["news", "chat"]}},
        {"text": "no task"},
        {"text": "x" * 50, "task": {"scope": "summarize"}},
        {"text": "null task", "task": None},
        {"text": "again", "task": {"type": ["chat", "news"], "scope": "translate"}},
    ]
    path = _write(tmp_path / "data.jsonl", [json.dumps(r) for r in records[:2]] + [""]
                  + [json.dumps(r) for r in records[2:]])
    ds = JsonlTextDataset(path, schema, seq_len=16)
    # chunks of record 2 (52 tokens: bos + 50 + eos) -> 4 windows of 16, last one 4 tokens
    assert len(ds) == 1 + 1 + 4 + 1 + 1
    assert ds.task_names == ["scope=translate,type=news+chat", "unknown", "scope=summarize"]
    texts = {}
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].shape == (16,)
        assert torch.equal(s["labels"][s["attention_mask"].bool()], s["input_ids"][:int(
            s["attention_mask"].sum())])
        assert bool((s["labels"][~s["attention_mask"].bool()] == IGNORE_INDEX).all())
        texts.setdefault(s["task_name"], []).append(_real_tokens(s))
    long_ids = [t for chunk in texts["scope=summarize"] for t in chunk]
    assert long_ids == [TOK.bos_id] + [ord("x")] * 50 + [TOK.eos_id]
    assert TOK.decode(texts["scope=translate,type=news+chat"][0]) == "héllo wörld"
    batch = TaskCollator(schema)([ds[i] for i in range(len(ds))])
    assert batch["task_multi_hot"].shape == (len(ds), schema.num_tags)
    assert schema.decode(batch["task_multi_hot"][0]) == {"scope": "translate",
                                                          "type": ["news", "chat"]}
    assert batch["task_ids"][1].tolist() == [-1, -1]                 # unknown
    assert batch["task_multi_hot"][1].sum() == 0
    assert batch["task_ids"][0].tolist() == [1, -1]                  # two types -> -1


BAD_RECORDS = [
    ('{"text": "a", ', "invalid JSON"),
    ('["text"]', "JSON object"),
    ('{"txt": "a"}', 'missing "text"'),
    ('{"text": 5}', '"text" must be a string'),
    ('{"text": "a", "task": "news"}', '"task" must be an object'),
    ('{"text": "a", "task": {"domain": "news"}}', "unknown level"),
    ('{"text": "a", "task": {"scope": "poetry"}}', "unknown value 'poetry'"),
    ('{"text": "a", "task": {"scope": ["summarize", "translate"]}}', "single-valued"),
    ('{"text": "a", "task": {"type": 3}}', "string or a list of strings"),
]


@pytest.mark.parametrize("line,what", BAD_RECORDS)
def test_bad_record_error_names_file_line_and_problem(tmp_path, schema, line, what):
    path = _write(tmp_path / "mydata.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(ValueError) as exc:
        JsonlTextDataset(path, schema, seq_len=8)
    msg = str(exc.value)
    assert "mydata.jsonl:3:" in msg, msg
    assert what in msg, msg


def test_jsonl_invalid_utf8_and_empty_file(tmp_path, schema):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape("bin.jsonl:2:")):
        JsonlTextDataset(path, schema, seq_len=8)
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no samples"):
        JsonlTextDataset(empty, schema, seq_len=8)


# ------------------------------------------------------------------ tokenizers
def test_byte_tokenizer():
    assert TOK.vocab_size == 260 and {TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.sep_id} == {
        256, 257, 258, 259}
    assert TOK.decode(TOK.encode("ab ü") + [TOK.eos_id]) == "ab ü"
    assert isinstance(load_tokenizer(), ByteTokenizer) and isinstance(load_tokenizer("byte"),
                                                                      ByteTokenizer)


def test_load_tokenizer_rejects_non_local_names(tmp_path):
    with pytest.raises(ValueError, match="local directory"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="local directory"):
        load_tokenizer(tmp_path / "missing")


def test_hf_tokenizer_from_local_dir(tmp_path, schema):
    tokenizers = pytest.importorskip("tokenizers", reason="the `tokenizers` package is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3, "hello": 4, "world": 5, "again": 6}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                                pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 7 and (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 2, 3)
    assert tok.encode("hello world again") == [4, 5, 6]
    assert tok.decode([2, 4, 5, 3]) == "hello world"
    path = _write(tmp_path / "d.jsonl", [json.dumps({"text": "hello world zebra",
                                                     "task": {"type": "code"}})])
    ds = JsonlTextDataset(path, schema, seq_len=8, tokenizer=tok)
    s = ds[0]
    assert s["input_ids"].tolist() == [2, 4, 5, 0, 3, 1, 1, 1]
    assert s["labels"].tolist() == [2, 4, 5, 0, 3, -100, -100, -100]
    assert s["task_name"] == "type=code"
