"""The output plan: every output tensor's name, shape and dtype, decided before any data is read.

Knowing the whole plan up front is what lets `hf.ShardedWriter` write shard headers first and then
stream each tensor to its final place.
"""

from __future__ import annotations

import dataclasses
import re

from tagmoe_dist.upcycle import archs, recipes
from tagmoe_dist.upcycle.hf import DenseCheckpoint, TensorSpec
from tagmoe_dist.upcycle.options import UpcycleOptions, parse_layers

# Dense FFN keys: classic `mlp.{gate,up,down}_proj.weight`, or a packed `mlp.gate_up_proj.weight`
# ([2F, H], gate rows first) as some converters write it.
_FFN_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)mlp\."
                     r"(?P<proj>gate_proj|up_proj|down_proj|gate_up_proj)\.(?P<kind>weight|bias)$")


@dataclasses.dataclass(frozen=True)
class DenseFfn:
    layer: int
    prefix: str  # e.g. "model.layers.3."

    @property
    def fused(self) -> str:
        return f"{self.prefix}mlp.gate_up_proj.weight"

    def keys(self, ckpt: DenseCheckpoint) -> tuple[str, ...]:
        """The source keys holding this FFN: (gate, up, down) or (gate_up, down)."""
        gate, up, down = self.classic_names()
        return (self.fused, down) if ckpt.has(self.fused) else (gate, up, down)

    def classic_names(self) -> tuple[str, str, str]:
        p = f"{self.prefix}mlp."
        return f"{p}gate_proj.weight", f"{p}up_proj.weight", f"{p}down_proj.weight"

    def read(self, ckpt: DenseCheckpoint):
        """(gate [F, H], up [F, H], down [H, F]) of this layer, in the checkpoint's dtype."""
        keys = self.keys(ckpt)
        if len(keys) == 2:
            gate_up_2FH = ckpt.get(keys[0])
            gate_FH, up_FH = gate_up_2FH.chunk(2, dim=0)
            return gate_FH, up_FH, ckpt.get(keys[1])
        return tuple(ckpt.get(k) for k in keys)


def find_ffns(ckpt: DenseCheckpoint, num_layers: int) -> dict[int, DenseFfn]:
    prefixes: dict[int, str] = {}
    for key in ckpt.weight_map:
        m = _FFN_RE.match(key)
        if m is None:
            continue
        if m["kind"] == "bias":
            raise ValueError(f"--src has FFN bias {key!r}; the HF MoE experts have no bias, so the "
                             "upcycled model could not equal the dense one")
        prefixes[int(m["layer"])] = m["prefix"]
    if not prefixes:
        raise ValueError(f"--src {ckpt.dir}: no tensor is named like "
                         "'model.layers.N.mlp.gate_proj.weight'; is this a dense decoder checkpoint?")
    template = prefixes[min(prefixes)].rsplit("layers.", 1)[0] + "layers.{}."
    ffns = {i: DenseFfn(i, template.format(i)) for i in range(num_layers)}
    for ffn in ffns.values():
        for key in ffn.keys(ckpt):
            ckpt.spec(key)  # raises a ValueError naming the missing key
    extra = sorted(set(prefixes) - set(ffns))
    if extra:
        raise ValueError(f"--src has FFN weights for layer(s) {extra} but config.json says "
                         f"num_hidden_layers={num_layers}; fix config.json")
    return ffns


def _check_ffn_shapes(ckpt: DenseCheckpoint, ffn: DenseFfn, hidden: int, inter: int) -> str:
    keys = ffn.keys(ckpt)
    expected = ([(2 * inter, hidden)] if len(keys) == 2 else [(inter, hidden)] * 2) + [(hidden, inter)]
    dtypes = set()
    for key, want in zip(keys, expected):
        shape, dtype = ckpt.spec(key)
        dtypes.add(dtype)
        if shape != want:
            raise ValueError(f"--src tensor {key!r} has shape {list(shape)}, expected {list(want)} "
                             f"from config.json (hidden_size={hidden}, intermediate_size={inter}); "
                             "config.json and weights disagree")
    if len(dtypes) != 1:
        raise ValueError(f"--src layer {ffn.layer} FFN mixes dtypes {sorted(dtypes)}; re-save it in "
                         "one dtype")
    return dtypes.pop()


@dataclasses.dataclass(frozen=True)
class Plan:
    arch: archs.Arch
    config: dict
    moe_layers: tuple[int, ...]
    layout: recipes.ExpertLayout
    tie_set: tuple[int, ...]  # experts laid out first; empty unless the router starts tied
    recipe: recipes.ExpertRecipe
    router_std: float
    moe_names: dict[int, archs.MoeNames | None]  # None for a layer kept dense
    dense_ffns: dict[int, DenseFfn]
    passthrough: tuple[str, ...]
    specs: tuple[TensorSpec, ...]


def _order(key: str) -> tuple:
    # Embeddings first, layers in numeric order, then final norm and lm_head: shards then follow
    # the model from input to output, like transformers' own saves.
    m = re.search(r"layers\.(\d+)\.", key)
    if m:
        return (1, int(m.group(1)), key)
    return (0 if "embed" in key else 2, 0, key)


def make_plan(ckpt: DenseCheckpoint, opts: UpcycleOptions) -> Plan:
    arch = archs.detect(ckpt.config)
    cfg = ckpt.config
    hidden, inter, num_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    if inter % opts.granularity:
        raise ValueError(f"--granularity {opts.granularity} does not divide the dense "
                         f"intermediate_size {inter}; choose a divisor of {inter}")
    moe_layers = parse_layers(opts.layers, num_layers)
    if not moe_layers:
        raise ValueError(f"--layers {opts.layers!r} selects no layer of a {num_layers}-layer model")
    if len(moe_layers) < num_layers and not arch.supports_dense_layers:
        raise ValueError(f"--layers {opts.layers!r} keeps some layers dense, but "
                         f"{arch.target_class} (the --format hf target for {arch.source_type}) has "
                         "an MoE block in every layer; use --layers all")
    dense_ffns = find_ffns(ckpt, num_layers)
    tie_set = ()
    if opts.router_init == "zeros" and opts.granularity > 1:
        tie_set = recipes.topk_tie_set(opts.num_experts, opts.top_k)
    layout = recipes.virtual_group_layout(opts.num_experts, opts.granularity, tie_set)
    recipe = recipes.ExpertRecipe(
        granularity=opts.granularity,
        # Both HF targets renormalise the top-k weights (Qwen2-MoE via norm_topk_prob=True).
        scale_factor=recipes.required_scale(opts.num_experts, opts.top_k, opts.granularity,
                                            renormalised=True),
        scaling=opts.scaling, drop_ratio=opts.drop_ratio, expert_noise=opts.expert_noise)

    ffn_keys = {k for ffn in dense_ffns.values() for k in ffn.keys(ckpt)}
    passthrough = [k for k in ckpt.weight_map if k not in ffn_keys]
    specs = [TensorSpec(k, *ckpt.spec(k)) for k in passthrough]
    names: dict[int, archs.MoeNames | None] = {}
    f = inter // opts.granularity
    for layer, ffn in dense_ffns.items():
        dtype = _check_ffn_shapes(ckpt, ffn, hidden, inter)
        if layer not in moe_layers:
            # Kept dense (Qwen2-MoE mlp_only_layers): written under the classic names, which is
            # also what a packed gate_up_proj source must become.
            names[layer] = None
            gate, up, down = ffn.classic_names()
            specs += [TensorSpec(gate, (inter, hidden), dtype), TensorSpec(up, (inter, hidden), dtype),
                      TensorSpec(down, (hidden, inter), dtype)]
            continue
        moe = archs.moe_names(arch, ffn.prefix, opts.num_experts, hidden, dtype)
        names[layer] = moe
        specs.append(TensorSpec(moe.router, (opts.num_experts, hidden), dtype))
        for gate, up, down in moe.experts:
            specs += [TensorSpec(gate, (f, hidden), dtype), TensorSpec(up, (f, hidden), dtype),
                      TensorSpec(down, (hidden, f), dtype)]
        specs += list(moe.zeros)
    config = archs.moe_config(cfg, arch, num_experts=opts.num_experts, top_k=opts.top_k,
                              granularity=opts.granularity, moe_layers=moe_layers)
    return Plan(arch=arch, config=config, moe_layers=moe_layers, layout=layout, tie_set=tie_set,
                recipe=recipe, router_std=float(cfg.get("initializer_range", 0.02)), moe_names=names,
                dense_ffns=dense_ffns, passthrough=tuple(passthrough),
                specs=tuple(sorted(specs, key=lambda s: _order(s.name))))

