"""Where this process runs: its rank under torchrun and its device. Shared by every stage.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the process is rank 0 of 1 and no
process group is created. Gloo on CPU, NCCL on GPU; each rank takes the GPU of its local rank.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fercache.errors import FercacheError


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the number of processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them for this process; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`; under torchrun, the local rank's
    GPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise FercacheError(f"--device '{choice}': use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise FercacheError(f"--device '{choice}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FercacheError(f"--device {choice}: no CUDA device here; use --device cpu")
        if device.index is None or torchrun_rank()[1] > 1:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@contextmanager
def distributed(device_choice: str = "auto") -> Iterator[Ranks]:
    """The process group (when under torchrun) for the duration of a stage, then torn down."""
    rank, world_size = torchrun_rank()
    device = resolve_device(device_choice, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
