"""The storage seam: what the rest of distload asks of wherever checkpoint bytes live.

Two implementations: local files (:mod:`distload.storage.files`) and object
storage (:mod:`distload.storage.s3`). Header parsing, the reader and the
save writer use only what is declared here, so the planner, the transfer
loop and placement never learn which backend they use.

Process-local, on whichever rank calls: the coordinator finding the
checkpoint and reading headers, owners reading tensor data, writers writing
a save. Nothing here talks to other ranks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

from ..errors import DistLoadError

OBJECT_SCHEMES = ("s3://",)


def is_object_uri(location: object) -> bool:
    """True for an object-storage location (``s3://bucket/prefix``), which is never a local path."""
    return isinstance(location, str) and location.startswith(OBJECT_SCHEMES)


def check_plain_name(name: str, where: object) -> None:
    """Refuse a name (from an untrusted index) that is not one plain file name inside ``where``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or ".." in name:
        raise DistLoadError(f"refusing file name {name!r}: it must be a plain file name inside {where}")


class Source(ABC):
    """One opened file or object: exact reads of its byte ranges into the caller's buffers.

    ``size`` and ``version`` are what the open found: ``version`` pins the
    content (an object's ETag), or is ``""`` where storage has none that
    other nodes share (a local file, re-checked by its header instead).
    Reads are thread-safe: the reader's IO threads share one source.
    """

    name: str  # for messages: the path or URI
    size: int
    version: str
    # Object storage reads in requests of a fixed size, ``concurrency`` at a
    # time; None leaves both to the reader's defaults for local files.
    part_bytes: int | None = None
    concurrency: int | None = None

    @abstractmethod
    def read_into(self, view: memoryview, offset: int, what: str | None = None) -> None:
        """Fill ``view`` with the bytes at ``offset``. A short file or object is a truncation error naming
        ``what`` (default: the source); storage errors propagate, so callers can say what they were reading."""

    def read(self, n: int, offset: int = 0, what: str | None = None) -> bytes:
        """Exactly ``n`` bytes at ``offset``; any failure is a :class:`DistLoadError` naming ``what``."""
        buf = bytearray(n)
        try:
            self.read_into(memoryview(buf), offset, what)
        except OSError as e:
            raise DistLoadError(f"{what or self.name}: read failed: {e.strerror or e}") from e
        return bytes(buf)

    def sequential(self) -> None:
        """A hint that the source will be read front to back (no-op where storage takes no hints)."""

    def close(self) -> None:
        """Release what the open holds (a descriptor); reads after it fail."""


class Store(ABC):
    """A checkpoint location: a local directory or an object-storage prefix, and the objects directly in it."""

    # Object storage counts as network storage for read_policy="auto", and its
    # headers are fetched concurrently (each read is a round trip).
    remote: ClassVar[bool] = False
    location: str  # for messages and plans: the directory or ``s3://bucket/prefix``

    @abstractmethod
    def open(self, name: str, *, checked: bool = True) -> Source:
        """Open object ``name`` for reading. ``checked`` refuses names and links that leave the location
        (an index the user named directly is opened unchecked, as a file they chose)."""

    @abstractmethod
    def names(self) -> list[str]:
        """The objects directly in the location, sorted (nothing from deeper levels)."""

    @abstractmethod
    def get_small(self, name: str, limit: int) -> bytes | None:
        """A whole small object (``config.json``), or None when it does not exist; over ``limit`` bytes fails."""

    def uri(self, name: str) -> str:
        """How messages name object ``name``."""
        return f"{self.location.rstrip('/')}/{name}"


class Output(ABC):
    """One file or object being written by a save, on its writer rank.

    ``write`` is called by one thread, in file order (the header at offset 0
    first); ``finish`` makes every byte durable but not yet visible as the
    new checkpoint's; ``publish`` makes it visible under its final name
    (after every writer finished); ``abort`` removes whatever this save
    wrote of it, at any step.
    """

    name: str

    @abstractmethod
    def write(self, offset: int, data: memoryview) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...

    def publish(self) -> None:
        """Nothing to do where ``finish`` already put the file in its staging place."""

    @abstractmethod
    def abort(self) -> None: ...


class Sink(ABC):
    """Where one save's files go, seen from one rank.

    (rank 0) :meth:`begin` prepares the save and returns the token every rank
    passes back to rebuild the same sink; (writer ranks) :meth:`create` one
    :class:`Output` per file; (rank 0, once every writer published)
    :meth:`put_small` the configs, then :meth:`commit` with the index, which
    is written last; (rank 0, on failure) :meth:`discard` removes what the
    save wrote beside the outputs each writer aborts itself.
    """

    @abstractmethod
    def begin(self) -> str: ...

    @abstractmethod
    def create(self, name: str, size: int) -> Output: ...

    @abstractmethod
    def put_small(self, name: str, data: bytes) -> None: ...

    @abstractmethod
    def commit(self, index_name: str, index: bytes) -> list[str]:
        """Write the index last and retire the previous checkpoint; returns warnings (nothing failed)."""

    @abstractmethod
    def discard(self) -> None: ...

    def close(self) -> None:
        """(every rank, at the end of a save) Stop what the sink started (upload threads)."""


def open_store(location: str | os.PathLike) -> Store:
    """(any rank) The store for a directory or an ``s3://bucket/prefix`` (object storage needs ``distload[s3]``)."""
    if is_object_uri(location):
        from .s3 import S3Store

        return S3Store(str(location))
    from pathlib import Path

    from .files import LocalStore

    return LocalStore(Path(location))
