"""Process-group set-up for torchrun, and the epoch sampler the trainer shards and resumes with.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is a
single process and nothing here touches torch.distributed. Under torchrun the process group is joined
even with one process, so that a one-GPU machine runs the multi-GPU path (NCCL, DDP) too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # the process group's ("nccl", "gloo") when launched by torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """In a process group: the model trains under DDP and the collectives below communicate."""
        return self.backend is not None


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"``: this process's GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: expected e.g. 'cpu', 'cuda', 'cuda:1' or 'auto', got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher setting its variables) started this process, with any number of them."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str | None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not launched_by_torchrun():
        return DistInfo(rank, world_size, local_rank, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, backend=dist.get_backend())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only when `flag` holds on every process, so that all of them stop together."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def any_true(flag: bool, info: DistInfo) -> bool:
    return not all_true(not flag, info)


def all_gather_object(obj, info: DistInfo) -> list:
    """`obj` from every process, by rank (a list of one without torchrun)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class EpochSampler(torch.utils.data.Sampler[int]):
    """This process's share of one epoch, in an order fixed by (seed, epoch), from any start.

    Like `DistributedSampler` (the index list is padded to a multiple of the world size so every
    process takes the same number of steps), plus `start`: the number of this process's samples to
    skip, which lets a run resumed mid-epoch see exactly the batches the interrupted one had left.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        if length <= 0:
            raise ValueError(f"EpochSampler: the dataset is empty (length {length})")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        # Skipping past the end leaves nothing: a run stopped after its epoch's short last group of
        # batches resumes with start = steps x batches per step x batch size > the samples there were.
        self.epoch, self.start = epoch, min(start, self.per_rank())

    def per_rank(self) -> int:
        return -(-self.length // self.world_size)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        padded = self.per_rank() * self.world_size
        order = (order * -(-padded // self.length))[:padded]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
