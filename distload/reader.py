"""Per-rank file IO: large explicit reads into reusable (pinned) host buffers.

(owner ranks) A :class:`ChunkReader` reads this rank's chunks, in schedule
order, on a background thread, so the read of the next chunk overlaps the
collective that sends the current one. Reads are ``preadv`` calls of a whole
chunk, never mmap page faults, which are slow on network filesystems.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import DistLoadError
from .errors import add_context
from .index import header_from_fd, open_checked
from .plan import Chunk, LoadPlan


class BufferPool:
    """A fixed number of reusable byte buffers of ``nbytes`` each, allocated on first use.

    ``acquire`` blocks until one is free; ``close`` wakes any waiter. Asking
    for more than ``nbytes`` is an error, never a silently shorter buffer:
    callers size the pool for the largest item they will put in it.
    ``allocated_bytes`` counts what the pool has allocated so far.
    """

    def __init__(self, count: int, nbytes: int, device: torch.device, pin: bool = False):
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._count, self._nbytes, self._device, self._pin = count, nbytes, device, pin
        self._cv = threading.Condition()
        self._closed = False

    @property
    def allocated_bytes(self) -> int:
        return self._made * self._nbytes

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes > self._nbytes:
            raise DistLoadError(f"a {nbytes}-byte buffer was asked of a pool of {self._nbytes}-byte buffers")
        with self._cv:
            while not self._free and self._made >= self._count:
                if self._closed:
                    raise DistLoadError("buffer pool closed")
                self._cv.wait()
            if self._free:
                buf = self._free.pop()
            else:
                buf = torch.empty(self._nbytes, dtype=torch.uint8, device=self._device, pin_memory=self._pin)
                self._made += 1
        return buf[:nbytes]

    def release(self, buf: torch.Tensor) -> None:
        base = buf._base if buf._base is not None else buf
        with self._cv:
            self._free.append(base)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def open_verified(plan: LoadPlan, file_idx: int, root: str | os.PathLike | None = None) -> int:
    """(owner ranks) Open one assigned file and check it is the file rank 0 planned.

    ``root`` is this rank's own checkpoint directory (see
    :func:`distload.index.local_root`); default the planner's. Storage can
    differ between nodes, so each owner re-checks the name, that it is a
    regular file (opened without blocking), its size, and its whole header
    against rank 0's, before any data moves.
    """
    shard = plan.files[file_idx]
    fd, path = open_checked(Path(plan.root if root is None else root), shard.name)
    try:
        size = os.fstat(fd).st_size
        if size != shard.size:
            raise DistLoadError(f"{path}: {size} bytes here, but rank 0 planned with {shard.size}")
        if header_from_fd(fd, shard.name) != shard:
            raise DistLoadError(f"{path}: header differs from the one rank 0 planned with")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_exact(fd: int, buf: torch.Tensor, offset: int, name: str) -> None:
    """Fill ``buf`` (a contiguous uint8 CPU tensor) from ``fd`` at ``offset``."""
    view = memoryview(buf.numpy()).cast("B")
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DistLoadError(f"{name}: file ended {total - done} bytes early at offset {offset + done} (truncated?)")
        done += n


class ChunkReader:
    """(owner ranks) Reads this rank's chunks ahead of the sender, in order.

    ``target_for(chunk)`` may return a host tensor to read straight into (the
    destination's own memory, when nothing needs converting); otherwise the
    chunk goes into a pool buffer, which the consumer must ``release``. At most
    one pooled chunk is held ahead of the consumer, so a pool of two buffers
    shared with receiving can never deadlock.
    """

    def __init__(
        self,
        plan: LoadPlan,
        fds: dict[int, int],
        chunks: list[Chunk],
        pool: BufferPool,
        target_for: Callable[[Chunk], torch.Tensor | None],
    ):
        self._plan, self._fds, self._pool, self._target_for = plan, fds, pool, target_for
        self._todo = chunks
        self._out: queue.Queue = queue.Queue()
        self._ahead = threading.Semaphore(1)
        self._stop = threading.Event()
        self.bytes_read = 0
        self._thread = threading.Thread(target=self._run, name="distload-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for chunk in self._todo:
            if self._stop.is_set():
                return
            pooled = False
            try:
                buf = self._target_for(chunk)
                if buf is None:
                    self._ahead.acquire()
                    if self._stop.is_set():
                        return
                    buf, pooled = self._pool.acquire(chunk.nbytes), True
                read_exact(self._fds[chunk.file], buf, chunk.start, self._plan.files[chunk.file].name)
                self.bytes_read += chunk.nbytes
                self._out.put((chunk, buf, pooled, None))
            except BaseException as e:  # handed to the consumer, who reports it to all ranks
                add_context(e, f"reading {self._plan.files[chunk.file].name} "
                               f"bytes {chunk.start}-{chunk.start + chunk.nbytes}")
                if pooled:
                    self._pool.release(buf)
                self._out.put((chunk, None, False, e))
                return

    def next(self) -> tuple[Chunk, torch.Tensor | None, bool, BaseException | None]:
        """(owner) The next chunk in schedule order: ``(chunk, buf, pooled, error)``."""
        item = self._out.get()
        if item[2]:
            self._ahead.release()
        return item

    def close(self) -> None:
        self._stop.set()
        self._ahead.release()
        self._pool.close()
        self._thread.join()
