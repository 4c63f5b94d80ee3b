"""The only module that calls collectives.

:class:`Comm` is the small interface the driver needs: object exchange, an
in-place byte broadcast, and *error agreement*. An agreement all-reduces one
scalar ("did any rank fail?"); only when the answer is yes does every rank
gather the messages, so all raise the same error together instead of leaving
survivors blocked in a collective, and a healthy load pays O(1) bytes and
O(1) Python per agreement whatever the world size. :class:`TorchComm` runs it over a torch.distributed process group
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
from .netif import gloo_group_env

# Collective timeout (seconds) when distload creates the process group, and each MPI call's deadline.
DEFAULT_TIMEOUT_S = 300.0


def describe(exc: BaseException) -> str:
    """One line for the error report: DistLoadErrors speak for themselves. Clipped (it goes to every rank)."""
    if isinstance(exc, DistLoadError):
        return clip_text(str(exc))
    notes = [n for n in getattr(exc, "__notes__", None) or [] if isinstance(n, str)]
    where = "".join(f"{n}: " for n in notes)
    return clip_text(f"{where}{type(exc).__name__}: {exc}")


class Status(ABC):
    """(all ranks) One posted status exchange: :meth:`failed` says whether any rank reported a failure.

    Every rank posts the same exchanges in the same order, so every rank gets
    the same answer from each. ``posted_at`` is when this rank posted it.
    """

    def __init__(self) -> None:
        self.posted_at = time.monotonic()

    @abstractmethod
    def failed(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``) for the answer; ``TimeoutError`` when it does not come."""


class Known(Status):
    """An exchange that was answered before it was returned."""

    def __init__(self, value: bool):
        super().__init__()
        self._value = value

    def failed(self, timeout_s: float | None = None) -> bool:
        return self._value


class _Pending(Status):
    """A torch.distributed all-reduce of one host int, started with ``async_op=True`` (gloo)."""

    def __init__(self, work: Any, flag: torch.Tensor):
        super().__init__()
        self._work, self._flag = work, flag

    def failed(self, timeout_s: float | None = None) -> bool:
        if timeout_s is None:
            self._work.wait()
        else:
            import datetime

            self._work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
        return bool(self._flag.item())


class _OnDevice(Status):
    """An NCCL all-reduce of one int queued on the current CUDA stream, read back through pinned memory.

    Nothing waits for the GPU when it is posted; :meth:`failed` polls the
    event recorded after the read-back, so a collective that never finishes
    (a peer died) is a ``TimeoutError``, never a hang.
    """

    def __init__(self, event: torch.cuda.Event, host: torch.Tensor):
        super().__init__()
        self._event, self._host = event, host

    def failed(self, timeout_s: float | None = None) -> bool:
        poll_event(self._event, timeout_s, "a status all-reduce on the GPU did not complete")
        return bool(self._host.item())


def poll_event(event: torch.cuda.Event, timeout_s: float | None, what: str) -> None:
    """Wait for ``event`` by polling (``synchronize`` cannot be interrupted); ``TimeoutError`` after ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    nap = 20e-6
    while not event.query():
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{what} within {timeout_s:g} s: timed out (a peer died or hung?)")
        time.sleep(nap)
        nap = min(2 * nap, 1e-3)


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

    # How long a rank waits for its own device or reader, or for a status, before it calls the
    # transport broken. On NCCL, shorter than NCCL's own timeout (see :func:`control_timeout`).
    wait_s: float = DEFAULT_TIMEOUT_S

    @abstractmethod
    def any_failed(self, failed: bool) -> bool:
        """(all ranks) Whether any rank passed ``failed=True``: one scalar all-reduce, whatever the world size."""

    def post_status(self, failed: bool) -> Status:
        """(all ranks) Start the same exchange as :meth:`any_failed`; its :class:`Status` answers later.

        Transports that can overlap it with data collectives (NCCL, gloo)
        return at once; the default answers before returning.
        """
        return Known(self.any_failed(failed))

    def abort(self) -> None:
        """(one rank, after a collective broke) Cancel this transport's queued device collectives, if it has any."""

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

        Costs one scalar all-reduce when all is well; only on failure does it
        gather the messages. The local exception becomes ``__cause__``.
        """
        if self.any_failed(error is not None):
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

    def control_comm(self) -> Comm:
        """The transport control records travel on: this one, unless it keeps control apart (NCCL)."""
        return self

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
        c = self.control_comm()
        if c is not self:
            return c.gather_records(record, extra, dst, extras)
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
        c = self.control_comm()
        if c is not self:
            return c.collect_(data, srcs, dst)
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

    def __init__(self, device: torch.device, timeout_s: float | None = None):
        self.rank, self.world_size, self.device = 0, 1, device
        if timeout_s is not None:
            self.wait_s = timeout_s

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        return None

    def gather_(self, buf: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        return buf.clone()

    def any_failed(self, failed: bool) -> bool:
        return failed

    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        assert not sends and not recvs, "a single process has no peers"


class TorchComm(Comm):
    """torch.distributed over one process group.

    Note on control messages on NCCL:
        Plans, reports, error messages and the blocking status agreements of
        the phases travel over a gloo side group of the same ranks (as torch
        DCP does for its control messages), never over NCCL: an object
        collective on NCCL stages its pickles on whatever CUDA device is
        current, and reading a result back waits for every copy and
        broadcast queued before it. The side group is made at the first
        control message, with lazy pair connects and the interface chosen
        by :mod:`distload.transport.netif`, and its timeout is shorter than
        NCCL's (:func:`control_timeout`), so a hung peer is named by
        distload before NCCL's watchdog ends the process.

        The transfer loop's own agreements (:meth:`post_status`) stay on
        the GPU instead: one int all-reduced by NCCL on the loop's stream,
        read back through pinned memory and checked a window later, so
        agreeing costs no host round trip and no device sync.
    """

    def __init__(self, group: Any, device: torch.device, timeout_s: float | None = None, *,
                 control_group: Any = None):
        """``control_group``: a gloo group of the same ranks for control messages and
        agreements (an engine's own CPU group), so none is made for an NCCL
        ``group``. Scatters are point-to-point sends over ``group``: a load
        never creates a process group beyond the side group."""
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self._given_control = control_group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        # Group ranks -> global ranks, which is what the src= arguments take.
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)] if group is not None else list(range(self.world_size))
        self._timeout_s = timeout_s
        self._nccl = device.type == "cuda"
        if self._nccl:
            self.wait_s = control_timeout(nccl_timeout(group) or timeout_s or DEFAULT_TIMEOUT_S)
        elif timeout_s is not None:
            self.wait_s = timeout_s
        self._control: Any = None  # the gloo side group on NCCL, made at the first control message
        self._control_comm: TorchComm | None = None  # a CPU transport over that group, for control records
        self._flags: tuple[torch.Tensor, torch.Tensor] | None = None  # (device, pinned) status slots on NCCL
        self._posted = 0

    def _ctl(self) -> Any:
        """(all ranks) The group control messages travel on: the gloo side group on NCCL, else the group itself."""
        if self._given_control is not None:
            return self._given_control
        if not self._nccl:
            return self.group
        if self._control is None:
            self._control = control_group(self.group, self._global, self.wait_s)
        return self._control

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._ctl())
        return out

    def control_comm(self) -> Comm:
        """On NCCL (or with an engine's ``control_group``): a CPU transport over the control group.

        Records then travel as host tensors over gloo, bounded by its shorter
        timeout, and never queue behind the data collectives on the GPU.
        """
        ctl = self._ctl()
        if ctl is self.group:
            return self
        if self._control_comm is None:
            self._control_comm = TorchComm(ctl, torch.device("cpu"), self.wait_s)
        return self._control_comm

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
        self._dist.broadcast_object_list(box, src=self._global[src], group=self._ctl(),
                                         device=torch.device("cpu") if self._nccl else self.device)
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

    def any_failed(self, failed: bool) -> bool:
        """One host int all-reduced (MAX) over the control group: blocking, and never waits for the GPU."""
        flag = torch.tensor([int(failed)], dtype=torch.int32)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX, group=self._ctl())
        return bool(flag.item())

    def post_status(self, failed: bool) -> Status:
        """(all ranks) On NCCL: one int all-reduced on the current stream, read back later; on gloo: async.

        On NCCL the caller's current stream must be the one its data
        collectives run on, so the answer is ready once they are done.
        """
        dist = self._dist
        if not self._nccl:
            flag = torch.tensor([int(failed)], dtype=torch.int32)
            return _Pending(dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        if self._flags is None:
            self._flags = (torch.zeros(STATUS_SLOTS, dtype=torch.int32, device=self.device),
                           torch.zeros(STATUS_SLOTS, dtype=torch.int32, pin_memory=True))
        on_device, pinned = self._flags
        i = self._posted % STATUS_SLOTS  # a slot is posted again only after its answer was read
        self._posted += 1
        flag, host = on_device[i : i + 1], pinned[i : i + 1]
        flag.fill_(int(failed))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _OnDevice(event, host)

    def abort(self) -> None:
        """Abort the NCCL communicator of this group (distload makes no sub-groups).

        Their kernels stop waiting for peers that will never answer, so the
        caller's stream (queued behind them) drains, and a later
        ``torch.cuda.synchronize()`` or ``destroy_process_group()`` does not
        hang. The groups stay registered but can no longer communicate.
        """
        if not self._nccl:
            return
        from torch.distributed import distributed_c10d as c10d

        try:
            world = c10d._get_default_group()
        except Exception:
            return
        group = self.group if self.group is not None else world
        try:
            group._get_backend(torch.device("cuda")).abort()
        except Exception:  # already gone, or not an NCCL group: nothing queued to cancel
            pass


# Status slots on NCCL, used in turn: the loop reads each answer a window after posting it.
STATUS_SLOTS = 4
# The side group's timeout and distload's own waits on NCCL, as a fraction of NCCL's timeout.
CONTROL_FRACTION = 0.8


def control_timeout(nccl_timeout_s: float) -> float:
    """How long distload waits on an NCCL job (the side group's timeout): well inside NCCL's own.

    NCCL's watchdog ends the process when a collective outlives the group's
    timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``, its default); waiting
    :data:`CONTROL_FRACTION` of it lets distload raise its own error, on
    every rank it can reach, first.
    """
    return max(1.0, CONTROL_FRACTION * nccl_timeout_s)


def nccl_timeout(group: Any) -> float | None:
    """The NCCL timeout of ``group`` (default: the default group), in seconds; None when it cannot be read."""
    try:
        from torch.distributed import distributed_c10d as c10d

        pg = group if group is not None else c10d._get_default_group()
        return pg._get_backend(torch.device("cuda")).options._timeout.total_seconds()
    except Exception:
        return None


# data group -> its gloo side group, reused by every load over that group
_CONTROL: list[tuple[Any, Any]] = []


def control_group(group: Any, ranks: list[int], timeout_s: float | None) -> Any:
    """(all ranks of ``group``) A gloo group of the same ranks for control messages.

    Created on first use and kept while both groups live, so repeated loads
    pay for it once. Over the whole world every rank takes part (a counted
    group name); over a subgroup only its ranks do (torch then names the
    group after its ranks). ``timeout_s`` is its timeout: on NCCL,
    :func:`control_timeout` of the data group's. Made under
    :func:`~distload.transport.netif.gloo_group_env`: lazy pair connects,
    and on several nodes the interface that reaches them.
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
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    local = len(ranks) != dist.get_world_size()
    with gloo_group_env():
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

    First the transport's queued device collectives are aborted
    (:meth:`Comm.abort`: NCCL), so the caller's stream does not stay stuck
    behind them. A timeout means some rank stopped answering: check in
    through the transport's side channel for a few seconds and name the
    ranks that did not. A dead peer (connection reset) is reported at once:
    the launcher names it and stops the survivors. ``tag`` must be the same
    on every rank and unique per operation; ``what`` names it ("distload",
    "distload save").
    """
    comm.abort()  # first: NCCL's watchdog may end the process once its own timeout passes
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
