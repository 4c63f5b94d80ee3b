"""Writing a save's files: staging directory, temporary names, ``pwrite`` on a thread, fsync, rename.

Runs on each rank, locally (no collectives). The driver decides when each
step may happen; this module only does file IO.

Note on staging:
    A save writes into a hidden staging directory beside the target
    (``.NAME.distload-TOKEN``), each file first under a temporary name, then
    fsynced and renamed. Once a rank's files are complete they belong to the
    staging directory, which only rank 0 removes (after a failure) or commits
    (:mod:`distload.io.commit`): a rank that fails later never deletes a
    finished file, which may already be part of the checkpoint being swapped in.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import shutil
import threading
from pathlib import Path

import torch

TMP_SUFFIX = ".distload-tmp"
_STAGE = ".distload-"


def stage_dir(target: Path, token: str) -> Path:
    """The hidden staging directory beside ``target`` (resolved) for one save."""
    return target.parent / f".{target.name}{_STAGE}{token}"


def target_of(stage: Path) -> Path:
    """The target directory a staging directory (:func:`stage_dir`) is for."""
    return stage.parent / stage.name[1:].rsplit(_STAGE, 1)[0]


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    """One ``pwrite``; a module attribute so tests can inject write errors."""
    return os.pwrite(fd, data, offset)


def byte_view(t: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory, without copying."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = _pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data, offset = data[n:], offset + n


class OutFile:
    """One file being written under a temporary name in the staging directory."""

    def __init__(self, stage: Path, name: str, size: int):
        self.final = stage / name
        self.tmp = stage / (name + TMP_SUFFIX)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(self.fd, size)  # the size up front; pwrites then fill holes
        except OSError:
            os.close(self.fd)
            os.unlink(self.tmp)
            raise

    def finish(self) -> None:
        """fsync, close, rename to the final name."""
        fd, self.fd = self.fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp, self.final)

    def abort(self) -> None:
        """Close and remove the temporary file; a finished file stays (see the module note)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class WriteQueue:
    """A background thread that performs ``pwrite`` jobs in order while the caller moves the next chunk.

    A job holds its buffer until written, then hands it back through its
    ``done`` callback (to the staging pool). The first error stops further
    writes; :meth:`error` reports it to the driver, which agrees on it with
    the other ranks.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="distload-writer", daemon=True)
        self._thread.start()

    def submit(self, fd: int, offset: int, buf: torch.Tensor, done=None, what: str = "") -> None:
        self._jobs.put((fd, offset, buf, done, what))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fd, offset, buf, done, what = job
            try:
                if self._error is None:
                    write_all(fd, byte_view(buf), offset)
                    self.bytes_written += buf.numel() * buf.element_size()
            except BaseException as e:
                if isinstance(e, OSError) and what:
                    e.add_note(f"writing {what} at byte {offset}")
                self._error = e
            finally:
                if done is not None:
                    done()

    def error(self) -> BaseException | None:
        return self._error

    def close(self) -> BaseException | None:
        """Wait for every job, stop the thread; the first write error, if any."""
        self._jobs.put(None)
        self._thread.join()
        return self._error


class StagingPool:
    """At most ``count`` reusable byte buffers of ``nbytes``; :meth:`get` blocks until the writer returns one."""

    def __init__(self, nbytes: int, count: int = 2):
        self.nbytes = nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._count = count

    def get(self) -> torch.Tensor:
        if self._made < self._count and self._free.empty():
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
            self._made += 1  # only once it exists: a failed allocation must not count as a buffer to wait for
            return buf
        return self._free.get()

    def put(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def write_small(path: Path, data: bytes) -> None:
    """Write a whole small file atomically: temporary name, fsync, rename."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, memoryview(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def remove_stage(stage: Path) -> None:
    """(rank 0, after a failure before the commit) Remove the staging directory and everything in it."""
    shutil.rmtree(stage, ignore_errors=True)
