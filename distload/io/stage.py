"""CUDA staging: pinned host chunks onto the device on a copy stream, collectives ordered by events.

(every rank, CUDA only) A :class:`CopyStage` is the device half of the
transfer loop. Owners' reader threads fill pinned buffers from
:attr:`CopyStage.pinned`; the loop walks the schedule and, per step::

    owner:     buf = stage.upload(host, pooled=pooled, into=dest_bytes_or_None)
    receiver:  buf = dest_bytes if direct else stage.landing(nbytes)
    all ranks: with stage.collective():        # on the comm stream, after the upload
                   comm.broadcast_(buf, owner)  # NCCL, then any unpacking out of buf
               stage.done(buf)
    own slice: buf = stage.upload(host, pooled=pooled, into=dest_bytes_or_None)
               with stage.on_copy_stream():     # a cast, after the upload, beside the collectives
                   placement.commit(...)
               stage.done_copy(buf)
    at the end, on success or failure: stage.close()

Nothing here waits on the GPU from the loop's thread, so reading chunk k+2
(reader threads), copying chunk k+1 and a rank's own slices (copy stream)
and broadcasting chunk k (comm stream, NCCL's own stream behind it) run at
the same time. Casts run on the device, from a ring bucket into place.

Note on ordering and reuse:
    - A host-to-device copy runs on ``copy_stream`` and records an event. The
      pinned buffer goes back to the pool with that event, and the pool hands
      it out again only once the event has completed, which the reader thread
      (never the loop) waits for, at most ``wait_s``: a staging buffer is
      never refilled while its copy may still read it.
    - ``collective()`` makes ``comm_stream`` wait for the latest copy's event
      and makes it current, so NCCL (which orders its own stream after the
      current one) and any unpacking run after the bytes arrived.
    - ``done(buf)`` (``done_copy`` for a slice's cast) records an event on the
      stream that last used ``buf``. A device bucket of the ring is taken
      again only after its next stream waits for that event, so a new copy or
      receive never overwrites bytes still being sent, unpacked or cast.
    - Both streams first wait for the caller's stream (destinations were
      allocated and zero-filled there), and ``close()`` makes the caller's
      stream wait for both: one ordering point per load and no host sync, so
      a failed load never blocks on a collective that will not finish. The
      driver then waits for the device, bounded (:func:`wait_for_device`),
      and hands the pinned memory back (:func:`release_pinned`).
Memory: ``staging`` pinned buckets and ``device_buffers`` device buckets (one
block, allocated up front, so a rank whose step failed can take part in the
collectives with it as a stand-in), whatever the number of read threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from ..errors import DistLoadError
from .reader import BufferPool

# Pinned buckets: one being copied, one read and waiting, one being read.
STAGING_BUFFERS = 3
# Device buckets in turn: one being filled (copy or receive) while one is sent.
DEVICE_BUFFERS = 2


def wait_event(event: torch.cuda.Event, timeout_s: float | None, what: str,
               stopped: threading.Event | None = None) -> bool:
    """Poll ``event`` until it completed (True), ``stopped`` is set (False) or ``timeout_s`` passed (TimeoutError).

    Polls rather than ``event.synchronize()``: a copy can wait on the GPU
    for a collective that never finishes (a peer died), and neither the
    caller nor ``close`` may then be stuck for good.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    nap = 20e-6
    while not event.query():
        if stopped is not None and stopped.is_set():
            return False
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{what} within {timeout_s:g} s: timed out (a peer died or hung?)")
        time.sleep(nap)
        nap = min(2 * nap, 1e-3)
    return True


def wait_for_device(device: torch.device, timeout_s: float | None) -> None:
    """(every CUDA rank, end of a load) Wait, at most ``timeout_s``, for the work queued on ``device``'s current stream.

    The load's report times this too, so its seconds and GB/s cover the
    bytes really being in place, not just queued. ``TimeoutError`` when the
    device makes no progress (a collective waits on a dead peer).
    """
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    wait_event(event, timeout_s, f"the load's copies and collectives on {device} did not finish")


def release_pinned() -> None:
    """(every CUDA rank, when a load ends) Give the page-locked host memory the load freed back to the OS.

    torch keeps freed pinned blocks (rounded up to powers of two) for reuse:
    a load's staging buckets would stay locked, about 256 MiB per rank,
    through training. Only blocks nobody holds and whose copies finished are
    released.
    """
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_initialized():
        empty()


class PinnedPool(BufferPool):
    """Pinned host buckets that are handed out again only once the copy that read them finished."""

    def __init__(self, count: int, nbytes: int, wait_s: float | None = None):
        super().__init__(count, nbytes, torch.device("cpu"), pin=True)
        self._copies: dict[int, torch.cuda.Event] = {}
        self._lock = threading.Lock()
        self._nbytes_each, self._seen = nbytes, set()
        self._stopped = threading.Event()
        self._wait_s = wait_s

    @property
    def made_bytes(self) -> int:
        return len(self._seen) * self._nbytes_each

    def acquire(self, nbytes: int) -> torch.Tensor:
        """(reader thread) A free bucket; waits, at most ``wait_s``, until the last copy out of it completed."""
        buf = super().acquire(nbytes)
        with self._lock:
            self._seen.add(buf.data_ptr())
            event = self._copies.pop(buf.data_ptr(), None)
        try:
            done = event is None or wait_event(event, self._wait_s, "a copy from pinned memory to the GPU did not "
                                               "complete", self._stopped)
        except BaseException:
            self.release(buf, after=event)  # still being copied from: not free yet
            raise
        if not done:
            super().release(buf)
            raise DistLoadError("staging pool closed")
        return buf

    def release(self, buf: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Return ``buf``; with ``after``, it is reusable once that event has completed."""
        if self._stopped.is_set():
            return  # closed: nothing will reuse it, so let its memory go
        if after is not None:
            with self._lock:
                self._copies[buf.data_ptr()] = after
        super().release(buf)

    def close(self) -> None:
        """Wake any waiting reader, and drop the free buckets so their pinned memory can be released."""
        self._stopped.set()
        super().close()
        with self._cv:
            self._free.clear()


class _Ring:
    """Device buckets used in turn, in one block allocated up front; each reuse waits, on the GPU, for its last use."""

    def __init__(self, count: int, nbytes: int, device: torch.device):
        self._count, self._nbytes = count, nbytes
        self.block = torch.empty(count * nbytes, dtype=torch.uint8, device=device)
        self._bufs = [self.block[i * nbytes : (i + 1) * nbytes] for i in range(count)]
        self._last: dict[int, torch.cuda.Event] = {}
        self._turn = 0

    @property
    def made_bytes(self) -> int:
        return self._count * self._nbytes

    def take(self, nbytes: int, stream: torch.cuda.Stream) -> torch.Tensor:
        if nbytes > self._nbytes:
            raise DistLoadError(f"a chunk of {nbytes} bytes does not fit a {self._nbytes}-byte device bucket")
        buf = self._bufs[self._turn % self._count]
        self._turn += 1
        event = self._last.pop(buf.data_ptr(), None)
        if event is not None:
            stream.wait_event(event)
        return buf[:nbytes]

    def used(self, buf: torch.Tensor, event: torch.cuda.Event) -> None:
        if any(b.data_ptr() == buf.data_ptr() for b in self._bufs):
            self._last[buf.data_ptr()] = event

    def drop(self) -> None:
        self._bufs, self._last = [], {}
        self.block = torch.empty(0, dtype=torch.uint8, device=self.block.device)


class CopyStage:
    """(every rank, CUDA) Pinned staging, a copy stream and a comm stream for one load.

    Pinned buckets hold ``bucket_bytes`` (the largest read), device buckets
    ``device_bytes`` (default the same; the largest chunk or message that
    lands off its destination). The loop holds at most one device bucket at a
    time (between ``upload`` or ``landing`` and ``done``), so two device
    buckets keep a copy and a collective in flight together. Device memory is
    allocated here, up front, with ``stand_in_bytes`` for :meth:`stand_in`
    (inside the ring when it fits, as it does unless one scatter message is
    far past a bucket). ``wait_s`` bounds every host wait on the GPU.
    """

    def __init__(self, device: torch.device, bucket_bytes: int, device_bytes: int | None = None, *,
                 staging: int = STAGING_BUFFERS, device_buffers: int = DEVICE_BUFFERS,
                 stand_in_bytes: int = 0, wait_s: float | None = None):
        device = torch.device(device)
        if device.type != "cuda":
            raise DistLoadError(f"CopyStage needs a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if staging < 1 or device_buffers < 2:
            raise DistLoadError("CopyStage needs at least one staging and two device buffers")
        self.device, self._staging, self.wait_s = device, staging, wait_s
        self.pinned = PinnedPool(staging, bucket_bytes, wait_s)
        with torch.cuda.device(device):
            self.copy_stream = torch.cuda.Stream(device)
            self.comm_stream = torch.cuda.Stream(device)
            # On the caller's stream: freed at the end, after close() made that stream wait for both.
            self._ring = _Ring(device_buffers, bucket_bytes if device_bytes is None else device_bytes, device)
            self._extra = stand_in_bytes if stand_in_bytes > self._ring.block.numel() else 0
            self._spare = torch.empty(self._extra, dtype=torch.uint8, device=device) if self._extra else self._ring.block
        self._copied: torch.cuda.Event | None = None
        caller = torch.cuda.current_stream(device)
        self.copy_stream.wait_stream(caller)
        self.comm_stream.wait_stream(caller)

    @property
    def allocated_bytes(self) -> int:
        """Pinned and device bytes this stage has allocated so far."""
        return self.pinned.made_bytes + self._ring.made_bytes + self._extra

    @property
    def read_ahead(self) -> int:
        """Pinned buckets a reader may hold ahead of the loop (``ChunkReader(ahead=...)``)."""
        return max(1, self._staging - 1)

    def upload(self, host: torch.Tensor, *, pooled: bool, into: torch.Tensor | None = None) -> torch.Tensor:
        """(owner) Queue the copy of ``host`` onto the device; return the device bytes.

        ``into`` is the destination's own device bytes when the chunk needs no
        conversion; otherwise the bytes land in a ring bucket. A ``pooled``
        host buffer goes back to :attr:`pinned`, to be reused after the copy.
        """
        dst = into if into is not None else self._ring.take(host.numel(), self.copy_stream)
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        self._copied = event
        if pooled:
            self.pinned.release(host, after=event)
        return dst

    def landing(self, nbytes: int) -> torch.Tensor:
        """(receiver) A device bucket to receive into when the bytes cannot land in place."""
        return self._ring.take(nbytes, self.comm_stream)

    @contextlib.contextmanager
    def collective(self) -> Iterator[torch.cuda.Stream]:
        """Run the chunk's collective and unpacking on the comm stream, after the latest copy."""
        if self._copied is not None:
            self.comm_stream.wait_event(self._copied)
        with torch.cuda.stream(self.comm_stream):
            yield self.comm_stream

    @contextlib.contextmanager
    def on_copy_stream(self) -> Iterator[torch.cuda.Stream]:
        """Run a slice's placement (a cast out of its ring bucket) on the copy stream, right after its upload."""
        with torch.cuda.stream(self.copy_stream):
            yield self.copy_stream

    def done(self, buf: torch.Tensor) -> None:
        """(every rank) ``buf``'s collective and unpacking are queued; its bucket may be reused after them."""
        event = torch.cuda.Event()
        event.record(self.comm_stream)
        self._ring.used(buf, event)

    def hand_over(self) -> None:
        """(every rank, streaming) The caller's stream may read what landed: order it after the queued copies and collectives."""
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.copy_stream)
        caller.wait_stream(self.comm_stream)

    def take_back(self) -> None:
        """(every rank, streaming) The caller is done with what landed: later copies and receives wait for its work.

        Costs the overlap of one copy with the caller's work per step, never a host sync.
        """
        caller = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(caller)
        self.comm_stream.wait_stream(caller)

    def done_copy(self, buf: torch.Tensor) -> None:
        """(the reading rank) ``buf``'s slice placement is queued on the copy stream; reuse it after that."""
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        self._ring.used(buf, event)

    def stand_in(self, nbytes: int) -> torch.Tensor:
        """(a rank whose step failed) Device bytes to take part in a collective with; their contents do not matter.

        The ring's own block (or the block reserved for it up front), so
        taking part never allocates: a failure may have been an allocation.
        The failed rank keeps nothing it receives, and what it sends is
        discarded with the failed load.
        """
        if nbytes > self._spare.numel():
            raise DistLoadError(f"a stand-in of {nbytes} bytes was not reserved ({self._spare.numel()} were)")
        return self._spare[:nbytes]

    def close(self) -> None:
        """(every rank, success or failure) Order the caller's stream after all queued work; stop staging.

        No host wait: the driver waits for the device, bounded, afterwards.
        The staging buckets are dropped, so :func:`release_pinned` can free
        them once their copies completed.
        """
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.copy_stream)
        caller.wait_stream(self.comm_stream)
        self.pinned.close()
        self._ring.drop()
        self._spare = self._ring.block
