"""Everything on disk: checkpoint file names and the manifest, atomic replacement, engine
save/load, export and resharding. One module per concept:

    files.py      every on-disk name (DeepSpeed's and ours), defined once
    atomic.py     files and directories written under a temporary name, then renamed
    manifest.py   what a complete checkpoint tag holds; which tag a command reads
    engine.py     save/load through a DeepSpeed engine (tagmoe_dist.train)
    export.py     one global fp32 state dict; cli.py its command line (`python -m ... export`)
    reshard.py    another expert-parallel / world size; reshard_cli.py `python -m tagmoe_dist.reshard`
    zero.py       its ZeRO 1/2 partition math, pure functions
    zero3.py      ZeRO-3 checkpoints: consolidate, reshard to weights, universal checkpoints
    loading.py    every read: torch.load(weights_only=True), DeepSpeed's objects allowed by name

Nothing here imports upcycle/, training/ or train.py; they import this package.
"""

from tagmoe_dist.checkpoint.cli import main
from tagmoe_dist.checkpoint.export import consolidate, save_safetensors, save_torch
from tagmoe_dist.checkpoint.files import MAIN_FILE, MANIFEST
from tagmoe_dist.checkpoint.manifest import resolve_tag

__all__ = ["MAIN_FILE", "MANIFEST", "consolidate", "main", "resolve_tag", "save_safetensors",
           "save_torch"]
