"""The :class:`~distload.comm.Comm` interface on mpi4py, for CPU clusters without NCCL
and for jobs that already run inside MPI.

Selected with ``load_checkpoint(..., comm="mpi")`` or ``--comm mpi``. The plan,
reader and placement code are the same as with torch.distributed; only the
bytes travel differently: ``MPI_Bcast`` of host buffers, pickled objects for
the plan and reports, ``MPI_Scatter`` of equal segments for DTensor shards,
and an ``MPI_Allreduce`` for error agreement.

Note:
    MPI collectives have no timeout, so a rank that dies outright usually
    makes ``mpiexec`` abort the job rather than surfacing as a
    :class:`DistLoadError`; failures that a rank catches (a missing file, a
    bad header) are agreed on and raised everywhere, as with torch.distributed.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from .comm import Comm
from .errors import DistLoadError

# MPI counts are C ints; stay well below 2**31 per call.
_MAX_BYTES = 1 << 30


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistLoadError("comm='mpi' needs mpi4py: pip install 'distload[mpi]'") from None
    return MPI


def host_bytes(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without copying (and without numpy)."""
    if buf.device.type != "cpu" or not buf.is_contiguous():
        raise DistLoadError(f"MPI moves contiguous host memory, got a {buf.device} tensor "
                            f"(contiguous={buf.is_contiguous()})")
    nbytes = buf.numel() * buf.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(buf.data_ptr())).cast("B")


class MpiComm(Comm):
    """mpi4py over one communicator (default ``COMM_WORLD``). Every method is collective.

    Buffers always live in host memory (``device`` is cpu): a load onto GPUs
    over MPI reads and broadcasts on the host and copies into device memory
    at placement, so no CUDA-aware MPI is needed.
    """

    def __init__(self, device: torch.device, communicator: Any = None):
        MPI = _mpi()
        self._MPI = MPI
        self._comm = communicator if communicator is not None else MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.device = torch.device("cpu")  # whatever the load's device: MPI moves host memory

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self._comm.bcast(obj, root=src)

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        if not buf.numel():
            return
        view = host_bytes(buf)
        for off in range(0, len(view), _MAX_BYTES):
            part = view[off : off + _MAX_BYTES]
            self._comm.Bcast([part, len(part), self._MPI.BYTE], root=src)

    def scatter_(self, buf: torch.Tensor, src: int, send: torch.Tensor | None = None) -> None:
        """(all ranks) ``MPI_Scatter`` of equal byte segments of ``src``'s ``send`` into each ``buf``."""
        n = buf.numel() * buf.element_size()
        if n == 0:
            return
        recv = [host_bytes(buf), n, self._MPI.BYTE]
        if self.rank == src:
            if send is None or send.numel() * send.element_size() < n * self.world_size:
                raise DistLoadError(f"scatter source needs {n * self.world_size} bytes to send")
            self._comm.Scatter([host_bytes(send)[: n * self.world_size], n, self._MPI.BYTE], recv, root=src)
        else:
            self._comm.Scatter(None, recv, root=src)

    def failed_ranks(self, failed: bool) -> list[int]:
        status = torch.zeros(self.world_size, dtype=torch.int32)
        if failed:
            status[self.rank] = 1
        out = torch.zeros_like(status)
        self._comm.Allreduce([host_bytes(status), self.world_size, self._MPI.INT32_T],
                             [host_bytes(out), self.world_size, self._MPI.INT32_T], op=self._MPI.MAX)
        return [r for r, v in enumerate(out.tolist()) if v]
