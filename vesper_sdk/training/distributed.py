"""Several processes under ``torchrun``: the process group, each rank's device, the DDP wrapper.

One process (no ``WORLD_SIZE`` above 1) runs without a process group; the same code then
skips every collective.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..model import FlyLoRALinear


@dataclass
class DistInfo:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        """Rank 0, which writes logs, records and checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def rank0_first(self) -> Iterator[None]:
        """Rank 0 runs the body first; the others start once it is done."""
        # Rank 0 builds shared files (tokenizer, token cache); the others then reuse them.
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def init_distributed(device_opt: str) -> DistInfo:
    """Join the ``torchrun`` group (NCCL on GPU, gloo on CPU), creating it if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_opt != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, owns)


def process_device(opt: str, d: DistInfo) -> torch.device:
    """The device option as this process's device: each rank takes its local GPU."""
    if opt == "auto":
        opt = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(opt)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is visible: use device='cpu'")
        if d.world > 1 or dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.world > 1 else 0)
    return dev


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> DDP:
    """``model`` under DDP, without the per-forward buffer broadcast."""
    # Buffers (FlyLoRA balance bias) are kept equal by reducing the rank loads
    # before each update (sum_rank_loads), so DDP need not broadcast them every forward.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters, **no_buffer_sync)


def sum_rank_loads(layers: Sequence[FlyLoRALinear]) -> None:
    """Sum the FlyLoRA rank-usage counts over processes, in place (one all-reduce)."""
    # Every rank then applies the same balance update, as one process would with the
    # whole batch.
    flat = torch.cat([m.rank_load for m in layers])
    dist.all_reduce(flat)
    for m, part in zip(layers, flat.split([m.rank for m in layers]), strict=True):
        m.rank_load.copy_(part)
