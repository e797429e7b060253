"""tm.hf.from_pretrained(directory) streams the source (integrations/hf/streaming.py): the model
equals the one converted from transformers' whole load, bit for bit, for every family, tied
embeddings and the fused expert layout; at EP=2 each rank reads the dense tensors and its own
experts' bytes, none of the other rank's; a source without safetensors is loaded whole, with a
warning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests import hf_models as H
from tests.dist_utils import run_distributed

pytest.importorskip("transformers")

_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def _whole(src, **kw):
    """The reference: transformers loads everything, then the built model is converted."""
    import tagmoe_dist as tm
    from transformers import AutoModelForCausalLM
    built = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    return tm.hf.from_pretrained(built, **kw)


def _assert_same(streamed, whole):
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    bufs_a, bufs_b = dict(streamed.named_buffers()), dict(whole.named_buffers())
    assert bufs_a.keys() == bufs_b.keys()
    assert all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a)      # rotary frequencies too
    assert not any(t.is_meta for t in [*a.values(), *bufs_a.values()])
    ids_BS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed.eval()(ids_BS).logits, whole.eval()(ids_BS).logits)


def _save(fam, out, seed=0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(fam, **{**H.COMMON, **H.CONFIGS[fam], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    return Path(out)


@pytest.mark.parametrize("fam", H.FAMILIES)
def test_streamed_equals_whole_load(tmp_path, fam):
    import tagmoe_dist as tm
    src = H.save(fam, tmp_path / fam, seed=4)
    kw = dict(moe={"router": "topk"}, upcycle=H.UPCYCLE.get(fam))
    streamed = tm.hf.from_pretrained(src, **kw)
    info = tm.hf.info(streamed)
    assert info["streamed"] and info["source_bytes_read"] > 0
    _assert_same(streamed, _whole(src, **kw))


def test_tied_embeddings_and_bf16_file(tmp_path):
    import tagmoe_dist as tm
    src = _save("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    streamed = tm.hf.from_pretrained(src)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    _assert_same(streamed, _whole(src))
    # a bf16 file read into an fp32 model: the same values transformers gives
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"))
    _assert_same(tm.hf.from_pretrained(tmp_path / "bf16"), _whole(tmp_path / "bf16"))


def _fuse(src: Path, out: Path) -> Path:
    """The source with its experts as transformers 5 holds them in memory: one fused tensor per
    layer (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F])."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    sd = load_file(str(out / "model.safetensors"))
    fused, layers = {}, sorted({int(k.split(".")[2]) for k in sd if ".experts." in k})
    for i in layers:
        pre = f"model.layers.{i}.block_sparse_moe."
        E = len({k for k in sd if k.startswith(f"{pre}experts.") and k.endswith(".w1.weight")})
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd.pop(f"{pre}experts.{e}.w1.weight"), sd.pop(f"{pre}experts.{e}.w3.weight")])
             for e in range(E)])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [sd.pop(f"{pre}experts.{e}.w2.weight") for e in range(E)])
        fused[f"model.layers.{i}.mlp.gate.weight"] = sd.pop(f"{pre}gate.weight")
    save_file({**sd, **fused}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_fused_expert_layout(tmp_path):
    import tagmoe_dist as tm
    src = H.save("mixtral", tmp_path / "mixtral", seed=2)
    fused = _fuse(src, tmp_path / "fused")
    kw = dict(moe={"router": "topk"})
    _assert_same(tm.hf.from_pretrained(fused, **kw), _whole(src, **kw))


def test_source_without_safetensors_is_loaded_whole_with_a_warning(tmp_path):
    import tagmoe_dist as tm
    from safetensors.torch import load_file
    src = H.save("mixtral", tmp_path / "mixtral", seed=5)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="no safetensors weights"):
        model = tm.hf.from_pretrained(src)
    assert not tm.hf.info(model)["streamed"]


def _header_bytes(path: Path):
    """{name: bytes} from the safetensors header, without reading a tensor."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = math.prod(s.get_shape()) * _ITEMSIZE[s.get_dtype()]
    return out


def _ep_worker(rank, world, dirs):
    import re
    import tagmoe_dist as tm
    from tagmoe_dist.parallel import ParallelGroups
    groups = ParallelGroups.build(ep_size=world)
    for fam, src in dirs.items():
        src = Path(src)
        streamed = tm.hf.from_pretrained(src, groups=groups)
        sizes = _header_bytes(next(src.glob("*.safetensors")))
        # the fused file's expert tensors are read by rows: this rank's share of each
        expert_re = re.compile(r"\.experts\.(\d+)\.")
        E = tm.hf.moe_layers(streamed)[0].cfg.num_experts
        mine = set(tm.hf.moe_layers(streamed)[0].experts.global_ids)
        want = 0
        for k, n in sizes.items():
            m = expert_re.search(k)
            if m:
                want += n if int(m.group(1)) in mine else 0
            elif k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                want += n * len(mine) // E
            else:
                want += n
        got = tm.hf.info(streamed)["source_bytes_read"]
        assert got == want, (fam, rank, got, want)
        assert got < sum(sizes.values())
        _assert_same(streamed, _whole(src, groups=groups))


def test_each_rank_reads_only_its_experts(tmp_path):
    src = H.save("mixtral", tmp_path / "mixtral", seed=6)
    dirs = {"mixtral": str(src), "qwen2_moe": str(H.save("qwen2_moe", tmp_path / "q", seed=7)),
            "fused": str(_fuse(src, tmp_path / "fused"))}
    run_distributed(_ep_worker, 2, dirs)
