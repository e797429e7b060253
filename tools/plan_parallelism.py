#!/usr/bin/env python
"""Rank TP / EP / PP layouts and overlap chunk counts for an MoE model on a cluster, by the
alpha-beta cost model of tagmoe_lab.planner (formulas in its module docstring).

    python tools/plan_parallelism.py --cluster configs/clusters/h100x8_ib400.yaml
    python tools/plan_parallelism.py --cluster configs/clusters/h100x8_single_node.yaml --top 10
    python tools/plan_parallelism.py --cluster c.yaml --model m.yaml --set num_experts=64 top_k=8

The cluster YAML has a `cluster:` section (GPUs per node, nodes, intra/inter-node bandwidth and
latency, achieved TFLOP/s, memory) and optionally a `model:` section (hidden, ffn_hidden,
num_experts, top_k, num_layers, seq_len, micro_batch, global_batch, activation,
bytes_per_element, vocab_size); --model gives the model from another file (a `model:` section
or the fields at top level); --set overrides model fields. Prints a markdown table, fastest
first, configurations that do not fit in memory last; chunks = 1 (sequential) and the
planner's choice are both listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tagmoe_lab import planner  # noqa: E402


def _model(args, default):
    import yaml
    fields = dataclasses.asdict(default) if default is not None else {}
    if args.model:
        with open(args.model) as f:
            doc = yaml.safe_load(f) or {}
        fields = dict(doc.get("model", doc))
    for kv in args.set or []:
        if "=" not in kv:
            raise ValueError(f"--set expects field=value, got {kv!r}")
        k, v = kv.split("=", 1)
        fields[k] = yaml.safe_load(v)
    if not fields:
        raise ValueError("no model: the cluster file has no 'model:' section; give --model FILE")
    return planner.ModelShape.from_dict(fields)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", required=True, help="cluster YAML (configs/clusters/*.yaml)")
    ap.add_argument("--model", help="model shape YAML (default: the cluster file's model: section)")
    ap.add_argument("--set", nargs="*", help="model field overrides, e.g. top_k=4")
    ap.add_argument("--chunks", nargs="*", default=["1", "auto"], help="chunk counts to list (ints, auto)")
    ap.add_argument("--max-tp", type=int, default=None)
    ap.add_argument("--top", type=int, default=15, help="rows to print")
    ap.add_argument("--json", help="write all plans here")
    a = ap.parse_args(argv)
    try:
        cluster, default_model = planner.load_yaml(a.cluster)
        model = _model(a, default_model)
        chunks = [None if c == "auto" else int(c) for c in a.chunks]
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plans = planner.enumerate_plans(cluster, model, chunks, a.max_tp)
    if not plans:
        print("no TP/EP/PP layout divides this cluster, model and batch (global_batch must be a "
              "multiple of DP x micro_batch)", file=sys.stderr)
        return 1
    print(f"{cluster.name}: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs; model "
          f"D={model.hidden} F={model.ffn_hidden} E={model.num_experts} k={model.top_k} "
          f"L={model.num_layers} seq={model.seq_len} micro-batch={model.micro_batch} "
          f"global batch={model.global_batch} ({model.activation}, {model.bytes_per_element} B)")
    print(f"{len(plans)} configurations; per-layer times are for one micro-batch, forward+backward\n")
    print(planner.plans_table(plans, a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([planner.as_dict(p) for p in plans], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
