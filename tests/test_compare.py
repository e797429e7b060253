"""The router comparison end to end (2 steps, all variants, both workloads), its fairness
guarantees, the markdown tables, and the routing report on a saved checkpoint."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from tagmoe_lab.benchmark import Budget, compare, get_workload, summary
from tagmoe_lab.benchmark.compare import init_model
from tagmoe_lab.benchmark.report import routing_report

ROOT = Path(__file__).resolve().parents[1]
TINY = Budget(steps=2, batch_size=4, warmup_steps=1, eval_per_task=2, eval_batch_size=8, log_every=1)


# small tensors: one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["text", "image"])
def test_compare_two_steps_all_variants(name, tmp_path):
    wl = get_workload(name)
    results = compare(wl, [0], TINY, ckpt_dir=tmp_path, log=lambda s: None)
    assert [r.variant for r in results] == ["dense", "topk", "tag"]
    assert len({r.active_params for r in results}) == 1
    for r in results:
        assert set(r.task_loss) == set(wl.task_names)
        assert all(torch.isfinite(torch.tensor(v)) for v in r.task_loss.values())
        assert [h["step"] for h in r.history] == [1, 2]
    dense, topk, tag = results
    assert dense.routing_LKE is None and dense.total_params == dense.active_params
    assert topk.routing_LKE.shape[1:] == (len(wl.task_names), 8)
    assert int(topk.routing_LKE.sum()) > 0 and 0.0 <= topk.mi
    assert tag.align_acc is not None and topk.align_acc is None
    md = summary.markdown(results, name)
    for word in ["dense", "topk", "tag", "worst task", "MI", *wl.task_names]:
        assert word in md
    assert (tmp_path / f"{name}_tag_s0.pt").is_file() and (tmp_path / f"{name}_tag_s0.yaml").is_file()
    if name == "image":             # the report of a DiT, with generated / edited samples
        s = routing_report(tmp_path / "image_tag_s0.pt", tmp_path / "rep", eval_per_task=2, samples=1)
        assert len(s["layers"]) == 4 and (tmp_path / "rep" / "samples.png").is_file()
        assert (tmp_path / "rep" / "heatmap_layer3.png").is_file()


def test_same_data_and_same_init_for_every_variant():
    wl = get_workload("text")
    a, b = wl.train_batches(3, 2, 4), wl.train_batches(3, 2, 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    _, topk = init_model(wl, "topk", 3)
    _, tag = init_model(wl, "tag", 3)
    _, dense = init_model(wl, "dense", 3)
    ref = topk.state_dict()
    tag_sd = tag.state_dict()
    assert all(torch.equal(v, tag_sd[k]) for k, v in ref.items()), "TAG starts from top-k's weights"
    assert torch.equal(dense.state_dict()["wte.weight"], ref["wte.weight"])
    img = get_workload("image")
    x, y = img.train_batches(1, 1, 4)[0], img.train_batches(1, 1, 4)[0]
    assert torch.equal(x["noise"], y["noise"]) and torch.equal(x["t"], y["t"])


def test_unequal_active_params_are_refused(tmp_path):
    d = yaml.safe_load((ROOT / "configs/models/cmp_text_dense.yaml").read_text())
    d["moe"]["ffn_hidden_size"] = 32
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(d))
    base = get_workload("text")
    wl = get_workload("text", {**base.configs, "dense": str(tmp_path / "dense.yaml")})
    with pytest.raises(ValueError, match="active parameter"):
        compare(wl, [0], TINY, log=lambda s: None)


def test_cli_and_routing_report_write_tables_and_pngs(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = _tool("compare_routers").main(["--workload", "text", "--seeds", "0", "--steps", "2",
                                        "--batch-size", "4", "--eval-per-task", "2",
                                        "--log-every", "1", "--out", str(out), "--save", "--plots",
                                        "--tensorboard"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| variant | copy |" in printed and "tag − topk" in printed
    assert (out / "results.md").is_file()
    assert json.loads((out / "results.json").read_text())["text"]["runs"][0]["variant"] == "dense"
    assert (out / "img" / "text_task_loss.png").is_file()
    assert (out / "img" / "text_heatmaps_seed0.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tb" / "text_tag_s0"), size_guidance={"images": 0}).Reload()
    assert "routing/layer0" in ea.Tags()["images"], "eval heat maps go to TensorBoard"
    assert {"eval/mean", "moe/align_loss", "moe/task_expert_mi/layer0"} <= set(ea.Tags()["scalars"])

    s = routing_report(out / "ckpt" / "text_tag_s0.pt", tmp_path / "rep", eval_per_task=2)
    assert len(s["layers"]) == 2 and s["workload"] == "text"
    for p in s["pngs"]:
        assert Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in s["pngs"]} >= {"heatmap_layer0.png", "heatmap_layer1.png",
                                                  "load_over_time_layer0.png", "mi_over_time.png"}
    rc = _tool("routing_report").main([str(out / "ckpt" / "text_topk_s0.pt"), "--out",
                                       str(tmp_path / "rep2"), "--eval-per-task", "2"])
    assert rc == 0 and (tmp_path / "rep2" / "heatmap_layer1.png").is_file()
    assert "MI (nats)" in capsys.readouterr().out
