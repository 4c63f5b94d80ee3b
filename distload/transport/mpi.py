"""The :class:`~distload.transport.comm.Comm` interface on mpi4py, for CPU clusters without NCCL
and for jobs that already run inside MPI.

Selected with ``load_checkpoint(..., comm="mpi")`` or ``--comm mpi``. The plan,
reader and placement code are the same as with torch.distributed; only the
bytes travel differently: ``MPI_Bcast`` of host buffers and pickled objects,
``MPI_Gather`` of fixed-size records to rank 0, ``MPI_Isend``/``MPI_Irecv`` of
each rank's exact pieces for DTensor shards and saves, and an
``MPI_Allreduce`` of one integer for error agreement.

Counts are C ints: no single call moves 2**31 bytes or more, nor computes a
displacement past that (large objects and gathers go in rounds), and no
call does more than O(world) work on any rank.

Note:
    MPI collectives have no timeout of their own, so every call here is the
    nonblocking form, waited on with a deadline of ``timeout_s``: a rank that
    hangs fails the load on the others with a ``timed out`` error
    (a :class:`DistLoadError` from the loader) instead of blocking them
    forever. MPI cannot cancel a collective, so the job must then end: the
    CLI aborts the MPI job, and ``mpiexec`` stops everything when a rank dies
    outright. Failures that a rank catches (a missing file, a bad header) are
    agreed on and raised everywhere, as with torch.distributed.

    A collective that timed out stays posted, and MPI may still write into
    (or read from) its buffers if the late rank turns up. So every call hands
    its buffers (the tensors and bytearrays behind the memory views) to the
    waiter along with the request, and the waiter thread holds them until
    the request completes: after a timeout the loader may drop and free its
    tensors, but their memory stays allocated until MPI is done with it, or
    until the job is aborted (the CLI calls ``MPI_Abort``; a program that
    calls ``load_checkpoint`` itself must end the job too, as nothing can
    cancel the request). :func:`stranded` counts those held requests.
"""

from __future__ import annotations

import ctypes
import itertools
import pickle
import queue
import threading
from typing import Any

import torch

from ..errors import DistLoadError
from .comm import DEFAULT_TIMEOUT_S, Comm

# MPI counts and displacements are C ints; stay well below 2**31 per call.
_MAX_BYTES = 1 << 30
_P2P_TAG = 7341  # point-to-point messages of a save; per-pair order keeps them matched


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


class _Waiter:
    """One thread that blocks in ``MPI_Wait`` while the caller waits with a deadline.

    ``MPI_Wait`` drives progress at full speed in C, which a Python loop of
    ``MPI_Test`` calls does not (a world-2 load was 25% slower that way). A
    request that never completes strands this thread, so after a timeout the
    next wait starts a fresh one. Needs ``MPI_THREAD_MULTIPLE``, mpi4py's
    default; with less, waits block without a deadline.
    """

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self.stuck = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        if threaded:
            threading.Thread(target=self._run, name="distload-mpi-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            request, keep, done, failure = job
            try:
                request.Wait()
            except BaseException as e:  # an MPI error: the caller raises it, not a timeout
                failure.append(e)
            done.set()
            with _LOCK:
                _STRANDED.pop(id(job), None)
            del job, request, keep  # MPI is done with the buffers: they may be freed now

    def wait(self, request: Any, timeout_s: float, keep: tuple = ()) -> bool:
        """Wait for ``request``; ``keep`` (its buffers) stays referenced until it completes, even after a timeout."""
        if not self.threaded:
            request.Wait()
            return True
        done, failure = threading.Event(), []
        job = (request, keep, done, failure)
        self._jobs.put(job)
        if not done.wait(timeout_s):
            with _LOCK:
                if not done.is_set():
                    _STRANDED[id(job)] = job
            self.stuck = True
            return False
        if failure:
            raise failure[0]
        return True


_WAITER: _Waiter | None = None
# Requests that timed out and are still posted, with their buffers: held until they complete.
_STRANDED: dict[int, tuple] = {}
_LOCK = threading.Lock()


def stranded() -> int:
    """How many timed-out MPI requests are still posted, their buffers held alive."""
    with _LOCK:
        return len(_STRANDED)


def _waiter() -> _Waiter:
    global _WAITER
    if _WAITER is None or _WAITER.stuck:
        MPI = _mpi()
        _WAITER = _Waiter(MPI.Query_thread() >= MPI.THREAD_MULTIPLE)
    return _WAITER


class _AllOf:
    """Several requests waited on as one (``MPI_Waitall``), so one deadline and one held job cover them all."""

    def __init__(self, MPI: Any, requests: list):
        self._MPI, self._requests = MPI, requests

    def Wait(self) -> None:
        self._MPI.Request.Waitall(self._requests)


class MpiComm(Comm):
    """mpi4py over one communicator (default ``COMM_WORLD``). Every method is collective.

    Buffers always live in host memory (``device`` is cpu): a load onto GPUs
    over MPI reads and broadcasts on the host and copies into device memory
    at placement, so no CUDA-aware MPI is needed.
    """

    def __init__(self, device: torch.device, communicator: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        MPI = _mpi()
        self._MPI = MPI
        self._comm = communicator if communicator is not None else MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.device = torch.device("cpu")  # whatever the load's device: MPI moves host memory
        self.timeout_s = timeout_s

    def _wait(self, request: Any, what: str, *keep: Any) -> None:
        """Complete one nonblocking collective, or raise ``TimeoutError`` after ``timeout_s``.

        ``keep``: the objects owning the request's memory, held until it completes (see the module note).
        """
        if not _waiter().wait(request, self.timeout_s, keep):
            raise TimeoutError(f"MPI {what} timed out after {self.timeout_s:g} s "
                               f"on rank {self.rank} of {self.world_size}")

    def _bcast_bytes(self, view: memoryview, src: int, what: str, owner: Any) -> None:
        for off in range(0, len(view), _MAX_BYTES):
            part = view[off : off + _MAX_BYTES]
            self._wait(self._comm.Ibcast([part, len(part), self._MPI.BYTE], root=src), what, owner)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's pickled ``obj``: sizes first, then the bytes in rounds that keep every count and
        displacement below 2**31 (each round moves at most ``_MAX_BYTES // world`` bytes of each object)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        sizes = torch.zeros(self.world_size, dtype=torch.int64)
        mine = torch.tensor([len(data)], dtype=torch.int64)
        self._wait(self._comm.Iallgather([host_bytes(mine), 1, self._MPI.INT64_T],
                                         [host_bytes(sizes), 1, self._MPI.INT64_T]), "all-gather", mine, sizes)
        counts = sizes.tolist()
        step = max(1, _MAX_BYTES // self.world_size)
        blobs = [bytearray(n) for n in counts]
        for start in range(0, max(counts), step):
            part = [max(0, min(step, n - start)) for n in counts]
            offsets = list(itertools.accumulate(part, initial=0))[:-1]
            out = bytearray(offsets[-1] + part[-1])
            send = data[start : start + part[self.rank]]
            self._wait(self._comm.Iallgatherv([send, len(send), self._MPI.BYTE],
                                              [out, (part, offsets), self._MPI.BYTE]), "all-gather", send, out)
            for r, (o, n) in enumerate(zip(offsets, part)):
                if n:
                    blobs[r][start : start + n] = out[o : o + n]
        return [pickle.loads(b) for b in blobs]

    def gather_(self, buf: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """``MPI_Gather`` of one fixed-size record per rank into ``dst``."""
        n = buf.numel() * buf.element_size()
        if n >= _MAX_BYTES:
            raise DistLoadError(f"a {n}-byte record is too large to gather over MPI")
        mine = buf.contiguous()
        out = torch.empty(self.world_size * buf.numel(), dtype=buf.dtype) if self.rank == dst else None
        recv = [host_bytes(out), n, self._MPI.BYTE] if out is not None else None
        self._wait(self._comm.Igather([host_bytes(mine), n, self._MPI.BYTE], recv, root=dst), "gather", mine, out)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self._wait(self._comm.Ibcast([host_bytes(size), 1, self._MPI.INT64_T], root=src), "broadcast", size)
        buf = bytearray(data) if self.rank == src else bytearray(int(size.item()))
        if buf:
            self._bcast_bytes(memoryview(buf), src, "broadcast", buf)
        return obj if self.rank == src else pickle.loads(buf)

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        if buf.numel():
            self._bcast_bytes(host_bytes(buf), src, "broadcast", buf)

    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """``MPI_Isend`` / ``MPI_Irecv`` of each buffer (in pieces below 2**31 bytes), all waited on together
        with one deadline. Every buffer stays referenced until every request completes, even after a
        timeout (see the module note): a late peer may still write into a receive buffer."""
        requests = []
        for items, post in ((sends, self._comm.Isend), (recvs, self._comm.Irecv)):
            for buf, peer in items:
                view = host_bytes(buf)
                for off in range(0, len(view), _MAX_BYTES):
                    part = view[off : off + _MAX_BYTES]
                    requests.append(post([part, len(part), self._MPI.BYTE], peer, tag=_P2P_TAG))
        if requests:
            self._wait(_AllOf(self._MPI, requests), "point-to-point transfer",
                       *(buf for buf, _ in sends), *(buf for buf, _ in recvs))

    def any_failed(self, failed: bool) -> bool:
        status = torch.tensor([int(failed)], dtype=torch.int32)
        out = torch.zeros_like(status)
        self._wait(self._comm.Iallreduce([host_bytes(status), 1, self._MPI.INT32_T],
                                         [host_bytes(out), 1, self._MPI.INT32_T], op=self._MPI.MAX),
                   "status all-reduce", status, out)
        return bool(out.item())

