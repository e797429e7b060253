"""The synthetic image tasks: determinism, that every editing target is right, batch format."""

import pytest
import torch

from tagmoe_dist.data.images import (BACKGROUND, COLOURS, DIRECTIONS, HOLE_VALUE,
                                     IMAGE_TASK_DESCRIPTORS, IMAGE_TASK_NAMES, INSTRUCTION_TOKENS,
                                     MOVE_STEP, OBJECT_SIZE, ImageTaskCollator, ImageTasks,
                                     image_eval_splits, image_task_schema, render, shape_mask)
from tests.tolerance import assert_exact

SIZE = 16


def _colour(name):
    return torch.tensor(COLOURS[name], dtype=torch.float32) * 2 - 1


def _footprint(o):
    """Bool [H, W] pixels of object o."""
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[o.y:o.y + OBJECT_SIZE, o.x:o.x + OBJECT_SIZE] = shape_mask(o.shape)
    return m


def _has_colour(img, mask, colour):
    return bool((img[:, mask] == _colour(colour)[:, None]).all())


def _is_background(img, mask):
    return bool((img[:, mask] == BACKGROUND).all())


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("source", "target", "instruction")) and \
        a["task"] == b["task"] and a["task_name"] == b["task_name"]


def test_deterministic_and_index_order_irrelevant():
    a, b = ImageTasks(60, seed=5), ImageTasks(60, seed=5)
    first = [a[i] for i in range(60)]
    for i in reversed(range(60)):
        assert _same(first[i], b[i])
    other = ImageTasks(60, seed=6)
    assert sum(not _same(first[i], other[i]) for i in range(60)) > 50
    ev = ImageTasks(60, seed=5, split="eval")
    assert sum(not _same(first[i], ev[i]) for i in range(60)) > 50
    with pytest.raises(IndexError):
        a[60]


def test_every_task_target_is_right():
    ds = ImageTasks(400, seed=1)
    seen = set()
    for i in range(len(ds)):
        sc, s = ds.describe(i), ds[i]
        src, tgt = s["source"], s["target"]
        seen.add(sc.task)
        assert s["task_name"] == sc.task and s["task"] == IMAGE_TASK_DESCRIPTORS[sc.task]
        assert [INSTRUCTION_TOKENS[t] for t in s["instruction"]] == list(sc.instruction)
        assert src.shape == tgt.shape == (3, SIZE, SIZE)
        op, a, b = sc.instruction
        if sc.task == "generate":
            assert bool((src == BACKGROUND).all()), "generation starts from a blank canvas"
            (o,) = sc.target_objects
            fp = _footprint(o)
            assert (o.shape, o.colour) == (a, b)
            assert _has_colour(tgt, fp, b) and _is_background(tgt, ~fp)
            continue
        assert 1 <= len(sc.source_objects) <= 3
        assert len({o.colour for o in sc.source_objects}) == len(sc.source_objects)
        named = [o for o in sc.source_objects if o.colour == a]
        if sc.task == "recolour":
            (o,) = named
            fp = _footprint(o)
            assert _has_colour(src, fp, a) and _has_colour(tgt, fp, b) and a != b
            assert torch.equal(src[:, ~fp], tgt[:, ~fp]), "only the object's pixels change"
        elif sc.task == "remove":
            (o,) = named
            fp = _footprint(o)
            assert _has_colour(src, fp, a) and _is_background(tgt, fp)
            assert torch.equal(src[:, ~fp], tgt[:, ~fp])
        elif sc.task == "move":
            (o,) = named
            dy, dx = DIRECTIONS[b]
            (moved,) = [m for m in sc.target_objects if m.colour == a]
            assert (moved.y - o.y, moved.x - o.x) == (dy * MOVE_STEP, dx * MOVE_STEP)
            old, new = _footprint(o), _footprint(moved)
            assert _has_colour(tgt, new, a) and _is_background(tgt, old & ~new)
            assert torch.equal(src[:, ~(old | new)], tgt[:, ~(old | new)])
        elif sc.task == "inpaint":
            y0, x0, y1, x1 = sc.hole
            hole = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            hole[y0:y1, x0:x1] = True
            assert bool((src[:, hole] == HOLE_VALUE).all())
            assert torch.equal(src[:, ~hole], tgt[:, ~hole])
            assert torch.equal(tgt, render(sc.source_objects, SIZE)), "the target is the whole canvas"
            hidden = [int((_footprint(o) & hole).sum()) for o in sc.source_objects]
            sizes = [int(_footprint(o).sum()) for o in sc.source_objects]
            assert any(0 < h < n for h, n in zip(hidden, sizes)), "the hole hides part of an object"
    assert seen == set(IMAGE_TASK_NAMES)


def test_collator_and_schema():
    schema = image_task_schema()
    for name, d in IMAGE_TASK_DESCRIPTORS.items():
        schema.encode(d)            # every descriptor fits the schema
    mh = schema.multi_hot(list(IMAGE_TASK_DESCRIPTORS.values()))
    assert len({tuple(r.tolist()) for r in mh}) == len(IMAGE_TASK_NAMES), "tag sets are distinct"
    ds = ImageTasks(8, seed=0)
    b = ImageTaskCollator(schema)([ds[i] for i in range(8)])
    assert b["source"].shape == b["target"].shape == (8, 3, SIZE, SIZE)
    assert b["instruction"].shape == (8, 3) and b["instruction"].dtype == torch.long
    assert b["task_multi_hot"].shape == (8, schema.num_tags)
    assert b["task_ids"].shape == (8, schema.num_levels)
    assert_exact(schema.to_multi_hot(b["task_multi_hot"]), b["task_multi_hot"])
    assert [IMAGE_TASK_NAMES[k] for k in b["task_index"]] == b["task_name"]


def test_eval_splits_are_single_task_and_errors():
    splits = image_eval_splits(6, seed=0)
    assert list(splits) == list(IMAGE_TASK_NAMES)
    for name, ds in splits.items():
        assert {ds[i]["task_name"] for i in range(len(ds))} == {name}
    with pytest.raises(ValueError, match="tasks"):
        ImageTasks(4, tasks=["paint"])
    with pytest.raises(ValueError, match="image_size"):
        ImageTasks(4, image_size=8)
