"""CUDA staging: pinned host chunks onto the device on a copy stream, collectives ordered by events.

(every rank, CUDA only) A :class:`CopyStage` is the device half of the
transfer loop. Owners' reader threads fill pinned buffers from
:attr:`CopyStage.pinned`; the loop walks the schedule and, per chunk::

    owner:     buf = stage.upload(host, pooled=pooled, into=dest_bytes_or_None)
    receiver:  buf = dest_bytes if direct else stage.landing(nbytes)
    all ranks: with stage.collective():        # on the comm stream, after the upload
                   comm.broadcast_(buf, owner)  # NCCL, then any unpacking out of buf
               stage.done(buf)
    at the end, on success or failure: stage.close()

Nothing here waits on the GPU from the loop's thread, so reading chunk k+2
(reader threads), copying chunk k+1 (copy stream) and broadcasting chunk k
(comm stream, NCCL's own stream behind it) run at the same time.

Note on ordering and reuse:
    - A host-to-device copy runs on ``copy_stream`` and records an event. The
      pinned buffer goes back to the pool with that event, and the pool hands
      it out again only once the event has completed, which the reader thread
      (never the loop) waits for: a staging buffer is never refilled while its
      copy may still read it.
    - ``collective()`` makes ``comm_stream`` wait for the latest copy's event
      and makes it current, so NCCL (which orders its own stream after the
      current one) and any unpacking run after the bytes arrived.
    - ``done(buf)`` records an event on ``comm_stream``. A device buffer of the
      ring is taken again only after its stream waits for that event, so a new
      copy or receive never overwrites bytes still being sent or unpacked.
    - Both streams first wait for the caller's stream (destinations were
      allocated and zero-filled there), and ``close()`` makes the caller's
      stream wait for both: one ordering point per load and no host sync, so
      a failed load never blocks on a collective that will not finish.
Memory: ``staging`` pinned buckets and ``device_buffers`` device buckets,
whatever the number of read threads.
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


class PinnedPool(BufferPool):
    """Pinned host buckets that are handed out again only once the copy that read them finished."""

    def __init__(self, count: int, nbytes: int):
        super().__init__(count, nbytes, torch.device("cpu"), pin=True)
        self._copies: dict[int, torch.cuda.Event] = {}
        self._lock = threading.Lock()
        self._nbytes_each, self._seen = nbytes, set()
        self._stopped = False

    @property
    def made_bytes(self) -> int:
        return len(self._seen) * self._nbytes_each

    def acquire(self, nbytes: int) -> torch.Tensor:
        """(reader thread) A free bucket; waits until the last copy out of it completed.

        Polls rather than ``event.synchronize()``: a copy can wait on the GPU
        for a collective that never finishes (a peer died), and ``close`` must
        still free this thread.
        """
        buf = super().acquire(nbytes)
        with self._lock:
            self._seen.add(buf.data_ptr())
            event = self._copies.pop(buf.data_ptr(), None)
        nap = 20e-6
        while event is not None and not event.query():
            if self._stopped:
                super().release(buf)
                raise DistLoadError("staging pool closed")
            time.sleep(nap)
            nap = min(2 * nap, 1e-3)
        return buf

    def release(self, buf: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Return ``buf``; with ``after``, it is reusable once that event has completed."""
        if after is not None:
            with self._lock:
                self._copies[buf.data_ptr()] = after
        super().release(buf)

    def close(self) -> None:
        self._stopped = True
        super().close()


class _Ring:
    """Device buckets used in turn; each reuse waits, on the GPU, for its last use."""

    def __init__(self, count: int, nbytes: int, device: torch.device):
        self._count, self._nbytes, self._device = count, nbytes, device
        self._bufs: list[torch.Tensor] = []
        self._last: dict[int, torch.cuda.Event] = {}
        self._turn = 0

    @property
    def made_bytes(self) -> int:
        return len(self._bufs) * self._nbytes

    def take(self, nbytes: int, stream: torch.cuda.Stream) -> torch.Tensor:
        if nbytes > self._nbytes:
            raise DistLoadError(f"a chunk of {nbytes} bytes does not fit a {self._nbytes}-byte device bucket")
        if len(self._bufs) < self._count:
            self._bufs.append(torch.empty(self._nbytes, dtype=torch.uint8, device=self._device))
        buf = self._bufs[self._turn % self._count]
        self._turn += 1
        event = self._last.pop(buf.data_ptr(), None)
        if event is not None:
            stream.wait_event(event)
        return buf[:nbytes]

    def used(self, buf: torch.Tensor, event: torch.cuda.Event) -> None:
        if any(b.data_ptr() == buf.data_ptr() for b in self._bufs):
            self._last[buf.data_ptr()] = event


class CopyStage:
    """(every rank, CUDA) Pinned staging, a copy stream and a comm stream for one load.

    Pinned buckets hold ``bucket_bytes`` (the largest read), device buckets
    ``device_bytes`` (default the same; the largest chunk or segment that
    lands off its destination). The loop holds at most one device bucket at a
    time (between ``upload`` or ``landing`` and ``done``), so two device
    buckets keep a copy and a collective in flight together.
    """

    def __init__(self, device: torch.device, bucket_bytes: int, device_bytes: int | None = None, *,
                 staging: int = STAGING_BUFFERS, device_buffers: int = DEVICE_BUFFERS):
        device = torch.device(device)
        if device.type != "cuda":
            raise DistLoadError(f"CopyStage needs a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if staging < 1 or device_buffers < 2:
            raise DistLoadError("CopyStage needs at least one staging and two device buffers")
        self.device, self._staging = device, staging
        self.pinned = PinnedPool(staging, bucket_bytes)
        self.copy_stream = torch.cuda.Stream(device)
        self.comm_stream = torch.cuda.Stream(device)
        self._ring = _Ring(device_buffers, bucket_bytes if device_bytes is None else device_bytes, device)
        self._copied: torch.cuda.Event | None = None
        caller = torch.cuda.current_stream(device)
        self.copy_stream.wait_stream(caller)
        self.comm_stream.wait_stream(caller)

    @property
    def allocated_bytes(self) -> int:
        """Pinned and device bytes this stage has allocated so far."""
        return self.pinned.made_bytes + self._ring.made_bytes

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

    def close(self) -> None:
        """(every rank, success or failure) Order the caller's stream after all queued work; stop staging."""
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.copy_stream)
        caller.wait_stream(self.comm_stream)
        self.pinned.close()
