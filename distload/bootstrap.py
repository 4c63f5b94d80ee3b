"""Joining (or skipping) a process group, and choosing the transport.

(all ranks) :func:`make_comm` is the driver's entry: it reuses the caller's
process group when there is one, initializes one from the launcher's
environment when there is not, and falls back to a single process otherwise.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from .comm import Comm, LocalComm, TorchComm
from .errors import DistLoadError
from .plan import RankInfo

DEFAULT_TIMEOUT_S = 300.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"cuda"`` into this rank's GPU (from ``LOCAL_RANK``); default cpu."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        if not torch.cuda.is_available():
            raise DistLoadError("device='cuda' was requested but CUDA is not available")
        dev = torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return dev


def local_rank() -> int:
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def rank_info(rank: int) -> RankInfo:
    return RankInfo(rank=rank, host=socket.gethostname(), local_rank=local_rank())


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """(all ranks) Initialize the default group from a torchrun-style environment.

    Returns False when no launcher environment is present (a single process).
    Uses NCCL for CUDA devices and gloo otherwise.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise DistLoadError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return True


def make_comm(device: torch.device, group=None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """(all ranks) The transport for one load on ``device``."""
    import torch.distributed as dist

    if group is None and not (dist.is_available() and init_distributed(device, timeout_s)):
        return LocalComm(device)
    if dist.get_world_size(group) == 1:
        return LocalComm(device)
    backend = dist.get_backend(group)
    if device.type == "cuda" and "nccl" not in str(backend):
        raise DistLoadError(f"device {device} needs an NCCL process group, but the group uses {backend}")
    # gloo moves host memory; an NCCL group moves device memory.
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    return TorchComm(group, comm_device)
