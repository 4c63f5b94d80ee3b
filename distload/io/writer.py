"""Atomic checkpoint writing: staging directory, temporary names, ``pwrite`` on a thread, fsync, rename.

Runs on each rank, locally (no collectives). The driver decides when each
step may happen; this module only does file IO.

Note on atomicity:
    A save writes into a hidden staging directory beside the target
    (``.NAME.distload-TOKEN``), each file first under a temporary name, then
    fsynced and renamed. Only when every rank has reported success does rank 0
    write the index (the file that makes a directory a checkpoint), fsync the
    directory and swap it in for the target: one ``renameat2(RENAME_EXCHANGE)``
    when the target exists (two renames where the kernel or filesystem lacks
    it), one ``rename`` when it does not. Files of the old directory that are
    not weights or configs (a tokenizer, a README) are moved into the new
    one. So the target is always either the old checkpoint or the new,
    complete one, and a failed save leaves no index anywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import secrets
import shutil
import threading
from pathlib import Path

import torch

from ..storage.base import REPLACED, Output, Sink

TMP_SUFFIX = ".distload-tmp"


def stage_dir(target: Path, token: str) -> Path:
    return target.parent / f".{target.name}.distload-{token}"


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


class OutFile(Output):
    """One file being written under a temporary name in the staging directory."""

    def __init__(self, stage: Path, name: str, size: int):
        self.name = name
        self.final = stage / name
        self.tmp = stage / (name + TMP_SUFFIX)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(self.fd, size)  # the size up front; pwrites then fill holes
        except OSError:
            os.close(self.fd)
            os.unlink(self.tmp)
            raise

    def write(self, offset: int, data: memoryview) -> None:
        write_all(self.fd, data, offset)

    def finish(self) -> None:
        """fsync, close, rename to the final name (in the staging directory, which the commit swaps in)."""
        fd, self.fd = self.fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp, self.final)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for p in (self.tmp, self.final):
            try:
                os.unlink(p)
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

    def submit(self, out: Output, offset: int, buf: torch.Tensor, done=None, what: str = "") -> None:
        self._jobs.put((out, offset, buf, done, what))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            out, offset, buf, done, what = job
            try:
                if self._error is None:
                    out.write(offset, byte_view(buf))
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
            self._made += 1
            return torch.empty(self.nbytes, dtype=torch.uint8)
        return self._free.get()

    def put(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def commit(stage: Path, target: Path) -> None:
    """(rank 0, after every rank succeeded) Make the staged checkpoint the target directory."""
    fsync_dir(stage)
    if not target.exists():
        os.rename(stage, target)
        fsync_dir(target.parent)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if not _exchange(stage, target):
        trash = stage.with_name(stage.name + ".old")
        os.rename(target, trash)
        os.rename(stage, target)
        stage = trash
    old = stage  # after the swap the staging path holds the previous checkpoint
    for entry in os.listdir(old):
        if not REPLACED.fullmatch(entry) and not (target / entry).exists():
            os.rename(old / entry, target / entry)
    fsync_dir(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stage(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)


class LocalSink(Sink):
    """(every rank of a save) A local target: files staged in a hidden directory beside it, swapped in by commit."""

    def __init__(self, target: Path, stage: str | None = None):
        self.target = target
        self.stage = Path(stage) if stage else None

    def begin(self) -> str:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        stage = stage_dir(self.target.absolute(), secrets.token_hex(6))
        os.mkdir(stage)
        self.stage = stage
        return str(stage)

    def create(self, name: str, size: int) -> OutFile:
        assert self.stage is not None
        return OutFile(self.stage, name, size)

    def put_small(self, name: str, data: bytes) -> None:
        assert self.stage is not None
        write_small(self.stage / name, data)

    def commit(self, index_name: str, index: bytes, files: list[str]) -> list[str]:
        assert self.stage is not None
        write_small(self.stage / index_name, index)
        commit(self.stage, self.target)
        return []

    def discard(self) -> None:
        if self.stage is not None:
            remove_stage(self.stage)
