"""Process-group start of the GPU check scripts (check_layer.py, check_hygiene.py), as torchrun
starts them: NCCL on this rank's CUDA device, or gloo on CPU with --cpu-smoke."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from tagmoe_dist.ports import free_port


def init(cpu_smoke: bool, script: str, bind_device: bool = False
         ) -> Optional[Tuple[torch.device, str, int, int]]:
    """(device, backend, rank, world) with the process group started (5-minute timeout); None,
    with a message, when CUDA is wanted and absent. bind_device: pass the device to NCCL."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cpu_smoke:
        device, backend = torch.device("cpu"), "gloo"
    else:
        if not torch.cuda.is_available():
            print(f"{script}: no CUDA device (use --cpu-smoke on CPU)", file=sys.stderr)
            return None
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=5),
                            device_id=device if bind_device and backend == "nccl" else None)
    return device, backend, rank, world
