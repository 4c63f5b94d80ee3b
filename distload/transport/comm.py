"""The only module that calls collectives.

:class:`Comm` is the small interface the driver needs: object exchange, an
in-place byte broadcast, and *error agreement* — every rank learns which ranks
failed, so all raise together instead of leaving survivors blocked in a
collective. :class:`TorchComm` runs it over a torch.distributed process group
(NCCL on GPUs, gloo on CPUs); :class:`LocalComm` is the one-process case.

Every method here is collective: all ranks of the group must call it, in the
same order, which the shared plan guarantees.
"""

from __future__ import annotations

import ctypes
import os
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..errors import MAX_TRACEBACK, DistLoadError, clip_text
from ..plan.control import EXTRA_LENGTH

# Collective timeout (seconds) when distload creates the process group, and each MPI call's deadline.
DEFAULT_TIMEOUT_S = 300.0


def describe(exc: BaseException) -> str:
    """One line for the error report: DistLoadErrors speak for themselves. Clipped (it goes to every rank)."""
    if isinstance(exc, DistLoadError):
        return clip_text(str(exc))
    notes = [n for n in getattr(exc, "__notes__", None) or [] if isinstance(n, str)]
    where = "".join(f"{n}: " for n in notes)
    return clip_text(f"{where}{type(exc).__name__}: {exc}")


class Comm(ABC):
    """Transport for one load. ``device`` is where collective buffers live."""

    rank: int
    world_size: int
    device: torch.device

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """(all ranks) Every rank's ``obj``, indexed by rank."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """(all ranks) ``src``'s ``obj``; other ranks pass ``None``."""

    @abstractmethod
    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        """(all ranks) Fill ``buf`` (contiguous, on ``device``) with ``src``'s bytes."""

    @abstractmethod
    def gather_(self, buf: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """(all ranks) ``dst`` gets every rank's ``buf`` (the same size everywhere) as one tensor, by rank.

        Only ``dst`` receives: ``world_size * len(buf)`` elements there, None
        elsewhere. For fixed-size records (a rank's figures), so nothing about
        sizes needs exchanging first. ``buf`` is contiguous, on ``device``.
        """

    @abstractmethod
    def failed_ranks(self, failed: bool) -> list[int]:
        """(all ranks) The ranks that passed ``failed=True``. One tiny collective."""

    @abstractmethod
    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """(the ranks named) Point-to-point: send each ``(buf, dst)``, fill each ``(buf, src)``; return when all are done.

        Not a collective: only the ranks that appear as a peer take part, each
        posting the mirror of what its peers post, in the same order per pair.
        Buffers are contiguous, on ``device``. Used by the save, where a file's
        writer receives exactly the piece each rank holds.
        """

    def agree(self, phase: str, error: BaseException | None) -> None:
        """(all ranks) Raise the same :class:`DistLoadError` everywhere if any rank failed.

        Costs one small collective when all is well; only on failure does it
        gather the messages. The local exception becomes ``__cause__``.
        """
        if self.failed_ranks(error is not None):
            self.raise_agreed(phase, error)

    def raise_agreed(self, phase: str, error: BaseException | None) -> None:
        """(all ranks, after a failed status) Gather each rank's message and raise."""
        mine = (describe(error), format_traceback(error)) if error is not None else None
        got = self.all_gather_object(mine)
        failures = {r: m[0] for r, m in enumerate(got) if m is not None}
        tracebacks = {r: m[1] for r, m in enumerate(got) if m is not None}
        raise DistLoadError.from_failures(phase, failures, tracebacks) from error

    def gather_or_raise(self, phase: str, compute: Callable[[], Any]) -> list[Any]:
        """(all ranks) Every rank's ``compute()``, or the same :class:`DistLoadError` on every rank.

        A rank whose ``compute`` raises sends its error in the one gather
        instead of a result, so no rank is left waiting; the local exception
        becomes ``__cause__``.
        """
        local: Exception | None = None
        try:
            mine = (compute(), None, None)
        except Exception as e:
            local, mine = e, (None, describe(e), format_traceback(e))
        got = self.all_gather_object(mine)
        failed = {r: g[1] for r, g in enumerate(got) if g[1] is not None}
        if failed:
            raise DistLoadError.from_failures(phase, failed, {r: got[r][2] for r in failed}) from local
        return [g[0] for g in got]

    def gather_records(self, record: bytes, extra: bytes | None = None, dst: int = 0,
                       extras: bool = True) -> list[tuple[bytes, bytes | None]] | None:
        """(all ranks) ``dst`` gets every rank's ``(record, extra)``, by rank; the others get None.

        ``record`` has the same size on every rank (:mod:`distload.plan.control`)
        and travels in one fixed-size gather, with the length of the rank's
        ``extra`` unless ``extras`` is False (then no rank has one); then
        only the ranks that have an extra (a node's first rank with its
        names, a failed rank with its error) send it, point to point.
        Nothing is all-gathered: a rank other than ``dst`` sends one record
        and receives nothing.
        """
        head = record + EXTRA_LENGTH.pack(len(extra or b"")) if extras else record
        got = self.gather_(_tensor_of(head, self.device), dst)
        if self.rank != dst:
            if extras and extra:
                self.exchange_([(_tensor_of(extra, self.device), dst)], [])
            return None
        assert got is not None
        raw = _bytes_of(got)
        n = len(head)
        rows = [raw[r * n : (r + 1) * n] for r in range(self.world_size)]
        if not extras:
            return [(row, None) for row in rows]
        sizes = [EXTRA_LENGTH.unpack_from(row, n - EXTRA_LENGTH.size)[0] for row in rows]
        recvs = [(torch.empty(size, dtype=torch.uint8, device=self.device), r)
                 for r, size in enumerate(sizes) if size and r != dst]
        self.exchange_([], recvs)
        out: list[bytes | None] = [None] * self.world_size
        for buf, r in recvs:
            out[r] = _bytes_of(buf)
        out[dst] = extra or None
        return [(row[: n - EXTRA_LENGTH.size], e) for row, e in zip(rows, out)]

    def collect_(self, data: bytes | None, srcs: list[int], dst: int = 0) -> dict[int, bytes] | None:
        """(``dst`` and the ranks in ``srcs`` only; not a collective) Each of ``srcs`` sends ``dst`` its ``data``.

        A length, then the bytes, point to point; ``dst`` gets them by rank
        (its own ``data`` too, if it is one of ``srcs``), the others None.
        """
        if self.rank != dst:
            payload = data or b""
            self.exchange_([(torch.tensor([len(payload)], dtype=torch.int64, device=self.device), dst)], [])
            if payload:
                self.exchange_([(_tensor_of(payload, self.device), dst)], [])
            return None
        others = [r for r in srcs if r != dst]
        lengths = [(torch.zeros(1, dtype=torch.int64, device=self.device), r) for r in others]
        self.exchange_([], lengths)
        bufs = [(torch.empty(int(n.item()), dtype=torch.uint8, device=self.device), r) for n, r in lengths]
        self.exchange_([], [(b, r) for b, r in bufs if b.numel()])
        out = {r: _bytes_of(b) for b, r in bufs}
        if dst in srcs:
            out[dst] = data or b""
        return out

    def broadcast_or_raise(self, phase: str, compute: Callable[[], Any], src: int = 0) -> Any:
        """(all ranks) ``src``'s ``compute()`` on every rank, or ``src``'s error raised on every rank."""
        local: Exception | None = None
        mine = None
        if self.rank == src:
            try:
                mine = (compute(), None, None)
            except Exception as e:
                local, mine = e, (None, describe(e), format_traceback(e))
        value, msg, tb = self.broadcast_object(mine, src=src)
        if msg is not None:
            raise DistLoadError.from_failures(phase, {src: msg}, {src: tb}) from local
        return value

    def silent_ranks(self, tag: str, wait_s: float) -> list[int] | None:
        """(surviving ranks, after a collective broke) Ranks that did not check in within ``wait_s``.

        Not a collective: the group is broken, so this goes through a side
        channel when the transport has one, naming the rank that died or hung.
        ``tag`` must be the same on every rank and unique per load. ``None``
        when the transport cannot tell.
        """
        return None


class LocalComm(Comm):
    """A single process: nothing to exchange."""

    def __init__(self, device: torch.device):
        self.rank, self.world_size, self.device = 0, 1, device

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        return None

    def gather_(self, buf: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        return buf.clone()

    def failed_ranks(self, failed: bool) -> list[int]:
        return [0] if failed else []

    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        assert not sends and not recvs, "a single process has no peers"


class TorchComm(Comm):
    """torch.distributed over one process group.

    Note on error agreement without device syncs:
        The per-chunk status all-reduce must not stall the GPU pipeline. On an
        NCCL group a status tensor lives on the device, and reading it back
        (``.tolist()``) waits for every queued copy and broadcast: a host sync
        per chunk. So when the data group is NCCL, the status travels over a
        gloo side group of the same ranks (as torch DCP does for its control
        messages), created once per data group with the same timeout: a host
        round trip per chunk, no device sync, and a hung peer still times out.
    """

    def __init__(self, group: Any, device: torch.device, timeout_s: float | None = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        # Group ranks -> global ranks, which is what the src= arguments take.
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)] if group is not None else list(range(self.world_size))
        self._timeout_s = timeout_s
        self._control: Any = None  # made at the first status exchange: groups that never agree need none
        self._status: torch.Tensor | None = None

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def silent_ranks(self, tag: str, wait_s: float) -> list[int] | None:
        """Check in through the group's key-value store (torchrun's agent store
        outlives dead workers) and list the ranks that did not within ``wait_s``."""
        try:
            from torch.distributed import distributed_c10d as c10d

            group = self.group if self.group is not None else c10d._get_default_group()
            store = c10d._world.pg_map[group][1]
            keys = [f"distload/alive/{tag}/{r}" for r in range(self.world_size)]
            store.set(keys[self.rank], "1")
            deadline = time.monotonic() + wait_s
            while True:
                silent = [r for r, k in enumerate(keys) if not store.check([k])]
                if not silent or time.monotonic() >= deadline:
                    return silent
                time.sleep(0.05)
        except Exception:  # the store may be gone too (its host died): nothing to add
            return None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global[src], group=self.group, device=self.device)
        return box[0]

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        if buf.numel():
            self._dist.broadcast(buf, src=self._global[src], group=self.group)

    def gather_(self, buf: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        out = [torch.empty_like(buf) for _ in range(self.world_size)] if self.rank == dst else None
        self._dist.gather(buf, out, dst=self._global[dst], group=self.group)
        return torch.cat(out) if out is not None else None

    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        dist = self._dist
        ops = [dist.P2POp(dist.isend, buf, self._global[dst], self.group) for buf, dst in sends if buf.numel()]
        ops += [dist.P2POp(dist.irecv, buf, self._global[src], self.group) for buf, src in recvs if buf.numel()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def failed_ranks(self, failed: bool) -> list[int]:
        if self._status is None:
            side = self.device.type == "cuda"
            self._control = control_group(self.group, self._global, self._timeout_s) if side else self.group
            self._status = torch.zeros(self.world_size, dtype=torch.int32, device="cpu" if side else self.device)
        self._status.zero_()
        if failed:
            self._status[self.rank] = 1
        self._dist.all_reduce(self._status, op=self._dist.ReduceOp.MAX, group=self._control)
        return [r for r, v in enumerate(self._status.tolist()) if v]


# data group -> its gloo side group, reused by every load over that group
_CONTROL: list[tuple[Any, Any]] = []


def control_group(group: Any, ranks: list[int], timeout_s: float | None) -> Any:
    """(all ranks of ``group``) A gloo group of the same ranks for error agreement.

    Created on first use and kept while both groups live, so repeated loads
    pay for it once. Over the whole world every rank takes part (a counted
    group name); over a subgroup only its ranks do (torch then names the
    group after its ranks). Its timeout is the
    data group's when the backend tells it, else ``timeout_s``.
    """
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    key = group if group is not None else c10d._get_default_group()
    live = c10d._world.pg_map
    _CONTROL[:] = [(g, c) for g, c in _CONTROL if g in live and c in live]
    for g, c in _CONTROL:
        if g is key:
            return c
    try:  # the data group's own timeout, so a hung peer is named as soon as NCCL would give up
        timeout_s = key._get_backend(torch.device("cuda")).options._timeout.total_seconds()
    except Exception:
        pass
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    local = len(ranks) != dist.get_world_size()
    side = dist.new_group(ranks, backend="gloo", use_local_synchronization=local, **kw)
    _CONTROL.append((key, side))
    return side


def forget_groups() -> None:
    """(every rank, at destroy) Drop the cached side groups, so none outlives its world."""
    _CONTROL.clear()


def _tensor_of(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _bytes_of(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as text, clipped (it goes to every rank)."""
    return clip_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), MAX_TRACEBACK)


# How long a survivor of a timed-out collective waits for the others to check in.
SILENT_WAIT_S = 3.0


def broken_error(comm: Comm, what: str, phase: str, tag: str, e: BaseException) -> DistLoadError:
    """(each surviving rank, alone) The error for a collective that broke instead of agreeing.

    A timeout means some rank stopped answering: check in through the
    transport's side channel for a few seconds and name the ranks that did
    not. A dead peer (connection reset) is reported at once: the launcher
    names it and stops the survivors. ``tag`` must be the same on every rank
    and unique per operation; ``what`` names it ("distload", "distload save").
    """
    text = describe(e)
    failures: dict[int, str] = {comm.rank: text}
    hint = " (did another rank die or time out?)"
    if "timed out" in text.lower() or "timeout" in text.lower():
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        silent = comm.silent_ranks(f"{tag}.{restart}", SILENT_WAIT_S)
        if silent:
            hint = f"; rank(s) {', '.join(map(str, silent))} did not respond (hung or dead)"
            failures.update({r: "did not respond" for r in silent})
    if len(failures) == 1:  # nobody named as silent: the one-line form carries the hint too
        failures[comm.rank] = text + hint
    return DistLoadError(f"{what} {phase} failed on rank {comm.rank}: {text}{hint}", phase=phase, failures=failures)
