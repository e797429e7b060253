"""Router comparisons on the built-in multi-task workloads (dense vs top-k MoE vs TAG-MoE).

- `workloads`: the text (GPT) and image (DiT, flow matching) workloads, the interference workload
  and its no-conflict control (tagmoe_dist/data/interference.py), and their variant configs.
- `compare`: the training / evaluation loop (`Budget`, `train_run`, `compare`, `RunResult`).
- `summary`: markdown tables of per-task losses, worst task, mutual information.
- `report`: routing report of one checkpoint (heat maps, entropy, load over time, MI).
- `stats`: paired differences over seeds with bootstrap intervals.
- `collapse`: does the TAG alignment target collapse? (learned vs detached vs orthogonal)
"""

from tagmoe_lab.benchmark.compare import Budget, RunResult, compare, evaluate, train_run
from tagmoe_lab.benchmark.workloads import VARIANTS, Workload, get_workload, load_model_config

__all__ = ["Budget", "RunResult", "VARIANTS", "Workload", "compare", "evaluate", "get_workload",
           "load_model_config", "train_run"]
