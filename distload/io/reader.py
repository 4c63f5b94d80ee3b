"""Per-rank file IO: large explicit reads, by several threads, into reusable (pinned) host buffers.

(owner ranks) A :class:`ChunkReader` reads this rank's chunks, in schedule
order, ahead of the consumer, so reading the next chunks overlaps the
collective that sends the current one. Each chunk is cut into a few large
sub-ranges that ``io_threads`` threads read concurrently through the storage
seam (``preadv`` on local files, never mmap page faults, which are slow on
network filesystems; ranged GETs of a fixed part size on object storage).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import torch

from ..errors import DistLoadError, add_context
from ..format.header import header_from
from ..plan.items import Chunk
from ..plan.load_plan import LoadPlan
from ..storage.base import Source, Store, open_store

# A sub-range read is never smaller than this: large requests suit network
# filesystems, and below it a thread costs more than it saves.
MIN_SPLIT_BYTES = 1 << 20
# Chunks queued to the IO threads ahead of the consumer. Direct chunks land in
# their own tensors and pooled ones are bounded by the pool, so this bounds
# work queued ahead, not memory.
READ_AHEAD = 4


def default_io_threads(ranks_here: int = 1) -> int:
    """Read threads per owner when ``io_threads`` is not given: the cores of the node shared by
    ``ranks_here`` ranks, at least 1 and at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, ranks_here)))


def check_io_threads(n) -> int:
    """``n`` if it is a usable thread count, else a :class:`DistLoadError`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistLoadError(f"io_threads must be a positive integer, not {n!r}")
    return n


def read_threads(sources: dict[int, Source], shared_by: int = 1) -> int:
    """Read threads per owner when ``io_threads`` is not given: what its sources ask for (object
    storage: its request concurrency), else :func:`default_io_threads`."""
    wanted = [s.concurrency for s in sources.values() if s.concurrency]
    return max(wanted) if wanted else default_io_threads(shared_by)


def split_ranges(nbytes: int, threads: int, min_bytes: int = MIN_SPLIT_BYTES) -> list[tuple[int, int]]:
    """``(offset, length)`` sub-ranges that cover ``[0, nbytes)`` exactly once.

    At most ``threads`` of them, each at least ``min_bytes`` (one range when
    the chunk is smaller), cut at 64 KiB multiples so threads do not share
    pages of the destination.
    """
    if nbytes <= 0:
        return []
    parts = max(1, min(threads, nbytes // max(1, min_bytes)))
    step = -(-nbytes // parts)
    step = -(-step // (64 << 10)) * (64 << 10)
    return [(off, min(step, nbytes - off)) for off in range(0, nbytes, step)]


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


def open_verified(plan: LoadPlan, file_idx: int, store: Store | None = None) -> Source:
    """(owner ranks) Open one assigned file and check it is the file rank 0 planned.

    ``store`` is this rank's own view of the checkpoint (see
    :func:`distload.format.discover.owner_store`); default the planner's
    directory. Storage can differ between nodes, so each owner re-checks the
    name, that it is a regular file (opened without blocking) and its size;
    then either the version rank 0 read (an object's ETag, which pins its
    content) or, where storage has none, the whole header against rank 0's,
    before any data moves.
    """
    shard = plan.files[file_idx]
    if store is None:
        store = open_store(plan.root)
    src = store.open(shard.name)
    try:
        if src.size != shard.size:
            raise DistLoadError(f"{src.name}: {src.size} bytes here, but rank 0 planned with {shard.size}")
        if shard.version:
            if src.version != shard.version:
                raise DistLoadError(f"{src.name} changed since rank 0 planned the load (ETag {src.version}, "
                                    f"planned {shard.version}); load again")
        elif header_from(src, shard.name) != shard:
            raise DistLoadError(f"{src.name}: header differs from the one rank 0 planned with")
        src.sequential()
    except BaseException:
        src.close()
        raise
    return src


def read_exact(src: Source, buf: torch.Tensor, offset: int, name: str) -> None:
    """Fill ``buf`` (a contiguous uint8 CPU tensor) from ``src`` at ``offset``."""
    src.read_into(memoryview(buf.numpy()).cast("B"), offset, name)


class _Pending:
    """One chunk in flight: its buffer and the sub-range reads still outstanding."""

    __slots__ = ("chunk", "buf", "pooled", "error", "_left", "_lock", "done")

    def __init__(self, chunk: Chunk, buf: torch.Tensor | None, pooled: bool, parts: int,
                 error: BaseException | None = None):
        self.chunk, self.buf, self.pooled, self.error = chunk, buf, pooled, error
        self._left = parts
        self._lock = threading.Lock()
        self.done = threading.Event()
        if parts == 0:
            self.done.set()

    def finish(self, error: BaseException | None) -> None:
        """(IO threads) One sub-range read ended; the first error wins."""
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self.done.set()


class ChunkReader:
    """(owner ranks) Reads this rank's chunks ahead of the sender, with ``io_threads`` threads.

    ``target_for(chunk)`` may return a host tensor to read straight into (the
    destination's own memory, when nothing needs converting); otherwise the
    chunk goes into a pool buffer, which the consumer must ``release``.
    ``next()`` hands chunks back in schedule order: ``(chunk, buf, pooled, error)``.

    Note on threads and memory:
        One scheduling thread walks the chunks in order, takes each one's
        buffer and cuts it into at most ``io_threads`` sub-ranges of at least
        ``MIN_SPLIT_BYTES`` (:func:`split_ranges`); ``io_threads`` IO threads
        ``preadv`` those sub-ranges concurrently into the one buffer (the
        syscall releases the GIL, and first-touch page faults on fresh
        destination memory then run in parallel too). No thread has a buffer
        of its own, so memory does not grow with ``io_threads``: the reader
        holds at most ``ahead`` pool buffers that the consumer has not taken
        (default one, so a pool of two shared with receiving can never
        deadlock), and at most ``READ_AHEAD`` chunks are in flight. A failed
        sub-range fails its chunk, which reaches the consumer (and so error
        agreement) in schedule order; later chunks are not started.
        ``close`` stops and joins every thread it started, on success or
        failure.
    """

    def __init__(
        self,
        plan: LoadPlan,
        sources: dict[int, Source],
        chunks: list[Chunk],
        pool: BufferPool,
        target_for: Callable[[Chunk], torch.Tensor | None],
        *,
        io_threads: int | None = None,
        ahead: int = 1,
        device: torch.device | None = None,
    ):
        self._plan, self._sources, self._pool, self._target_for = plan, sources, pool, target_for
        # A CUDA rank's threads make its GPU current: a pinned allocation or an event query on a
        # thread whose current device is cuda:0 creates a context there (~500 MiB) for every rank.
        self._device = device if device is not None and device.type == "cuda" else None
        self._threads_n = check_io_threads(read_threads(sources) if io_threads is None else io_threads)
        self._todo = chunks
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._ahead = threading.Semaphore(ahead)
        # Enough chunks in flight to keep every request busy when chunks are small (object storage).
        self._window = threading.Semaphore(max(READ_AHEAD, *(s.concurrency or 0 for s in sources.values()), 0))
        self._stop = threading.Event()
        self._failed = threading.Event()
        self.bytes_read = 0
        self._workers: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        if not chunks:
            return
        try:
            for i in range(self._threads_n):
                t = threading.Thread(target=self._work, name=f"distload-io-{i}", daemon=True)
                t.start()
                self._workers.append(t)
            self._thread = threading.Thread(target=self._run, name="distload-reader", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _on_device(self) -> None:
        """(each thread, first) Make this rank's GPU the thread's current device (CUDA state is per thread)."""
        if self._device is not None:
            torch.cuda.set_device(self._device)

    def _run(self) -> None:
        """(scheduling thread) Take each chunk's buffer and queue its sub-range reads."""
        try:
            self._on_device()
            for chunk in self._todo:
                self._window.acquire()
                if self._stop.is_set() or self._failed.is_set():
                    return
                buf, pooled = None, False
                try:
                    buf = self._target_for(chunk)
                    if buf is None:
                        self._ahead.acquire()
                        if self._stop.is_set():
                            return
                        buf, pooled = self._pool.acquire(chunk.nbytes), True
                except BaseException as e:  # handed to the consumer, who reports it to all ranks
                    self._out.put(_Pending(chunk, None, False, 0, e))
                    return
                part = self._sources[chunk.file].part_bytes
                parts = (split_ranges(chunk.nbytes, self._threads_n, MIN_SPLIT_BYTES) if part is None
                         else [(off, min(part, chunk.nbytes - off)) for off in range(0, chunk.nbytes, part)])
                pending = _Pending(chunk, buf, pooled, len(parts))
                self._out.put(pending)
                for off, n in parts:
                    self._tasks.put((pending, off, n))
        finally:
            for _ in self._workers:
                self._tasks.put(None)

    def _work(self) -> None:
        """(IO thread) Read sub-ranges until told to stop."""
        self._on_device()
        while True:
            task = self._tasks.get()
            if task is None:
                return
            pending, off, n = task
            if self._stop.is_set():  # never hand out a partly read chunk as complete
                pending.finish(DistLoadError("reader closed"))
                continue
            chunk = pending.chunk
            try:
                read_exact(self._sources[chunk.file], pending.buf[off : off + n], chunk.start + off,
                           self._plan.files[chunk.file].name)
                pending.finish(None)
            except BaseException as e:
                self._failed.set()
                pending.finish(e)

    def next(self, timeout_s: float | None = None) -> tuple[Chunk | None, torch.Tensor | None, bool,
                                                            BaseException | None]:
        """(owner) The next chunk in schedule order: ``(chunk, buf, pooled, error)``.

        With ``timeout_s``, a chunk not read by then comes back as a
        ``TimeoutError`` (the consumer stops reading after an error).
        """
        try:
            pending: _Pending = self._out.get(timeout=timeout_s)
        except queue.Empty:
            pending = None  # type: ignore[assignment]
        if pending is None or not pending.done.wait(timeout_s):
            # ``timeout_s`` is not None here: without one both waits return only when done.
            return (None if pending is None else pending.chunk), None, False, TimeoutError(
                f"no data from this rank's reader within {timeout_s:g} s: its storage, or its copies "
                "to the GPU, stopped making progress")
        self._window.release()
        if pending.pooled:
            self._ahead.release()
        chunk = pending.chunk
        if pending.error is not None:
            e = pending.error
            add_context(e, f"reading {self._plan.files[chunk.file].name} "
                           f"bytes {chunk.start}-{chunk.start + chunk.nbytes}")
            if pending.pooled:
                self._pool.release(pending.buf)
            return chunk, None, False, e
        self.bytes_read += chunk.nbytes
        return chunk, pending.buf, pending.pooled, None

    def close(self) -> None:
        """Stop reading and join every thread this reader started."""
        self._stop.set()
        self._window.release()
        self._ahead.release()
        self._pool.close()
        if self._thread is not None:
            self._thread.join()
        else:
            for _ in self._workers:
                self._tasks.put(None)
        for t in self._workers:
            t.join()
