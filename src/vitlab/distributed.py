"""Multi-process training through torchrun and PyTorch's DistributedDataParallel.

``torchrun --nproc_per_node=N program`` starts N copies of the same program with RANK, LOCAL_RANK and
WORLD_SIZE (and the rendezvous address) in their environment. ``process_group`` joins them into one group
(NCCL between GPUs, gloo between CPU processes); ``World.wrap`` puts the model in DistributedDataParallel,
which averages the gradients over all processes at every step, so every process holds the same weights.
``--nproc_per_node=1`` is a group of one that still trains through DistributedDataParallel and the backend
(what benchmarks/gpu_check.sh runs on a single GPU). Without those variables (a plain ``python`` run)
everything here is the identity for one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


def is_main_process() -> bool:
    """True outside torchrun and in its rank 0: the one process that writes outputs. Works before init."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class World:
    """This process's place in training: ``rank`` (0-based), ``size`` (number of processes), the
    ``device`` it trains on and whether it joined a process group (``grouped``: under torchrun, also with one
    process); outside torchrun a world of one (rank 0, size 1) in no group."""

    rank: int
    size: int
    device: torch.device
    grouped: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that writes outputs."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (Li et al., 2020, "PyTorch Distributed") in a process group,
        else ``model`` itself. ``model`` must already be on ``device``; the wrapper's state_dict keys gain a
        ``module.`` prefix, so save the unwrapped model."""
        if not self.grouped:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def sampler(self, n: int, seed: int) -> DistributedSampler:
        """Each epoch's shuffled order of ``n`` items, this process's share of it (``set_epoch`` first).

        Every process draws the same permutation (seed + epoch), pads it by wrapping around to a multiple of
        the world size and takes every ``size``-th item from its rank on; one process takes them all.
        """
        return DistributedSampler(range(n), num_replicas=self.size, rank=self.rank, shuffle=True, seed=seed)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over all processes."""
        if self.size > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every process."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        objects: list[Any] = [None] * self.size
        dist.all_gather_object(objects, obj)
        return objects


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """The world this process trains in: under torchrun (WORLD_SIZE set, also to 1), a process group it joins
    (and leaves at the end unless the caller had joined one already); else a world of one on ``device``."""
    if "WORLD_SIZE" not in os.environ:
        yield World(0, 1, device)
        return
    if device.type == "cuda":  # one GPU per process, as torchrun numbers them on each node
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), device, grouped=True)
    finally:
        if joined:
            dist.destroy_process_group()
