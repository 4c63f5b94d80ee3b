"""Local checkpoint files: refusing names that escape the checkpoint, opening without races, exact reads.

Process-local, on whichever rank opens a file: the coordinator reading
headers and each owner reading its data. Every check raises
:class:`~distload.errors.DistLoadError` naming the file. :class:`LocalStore`
and :class:`FileSource` are the local side of the storage seam
(:mod:`distload.storage.base`).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import DistLoadError
from .base import Source, Store, check_plain_name


def check_file_name(root: Path, name: str) -> Path:
    """Refuse names that could read outside ``root`` or block on open.

    Returns the path to open. Runs on rank 0 while planning and again on each
    owner before it opens the file (storage may differ between nodes). To open
    the file, use :func:`open_checked`, which also closes the race between
    this check and the open.
    """
    return _check(root, name)[0]


def _check(root: Path, name: str) -> tuple[Path, os.stat_result]:
    check_plain_name(name, root)
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    allowed = [real_root]
    repo = hub_repo_folder(real_root)
    if repo is not None:  # a cache snapshot: its files link to ../../blobs/<hash>
        allowed.append(repo)
    if not any(os.path.commonpath([a, real]) == a for a in allowed):
        inside = real_root if repo is None else f"{real_root} or its Hugging Face cache folder {repo}"
        raise DistLoadError(f"refusing {name}: it resolves to {real}, outside the checkpoint directory {inside}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise DistLoadError(f"missing file {path}") from None
    except OSError as e:
        raise DistLoadError(f"cannot stat {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise DistLoadError(f"{path} is not a regular file (a FIFO, device or directory)")
    return path, st


def hub_repo_folder(real_dir: str) -> str | None:
    """The cache repo folder (``.../models--org--name``) holding ``real_dir`` in a snapshot, else None.

    The Hugging Face cache keeps ``<repo>/snapshots/<commit>/<file>`` as
    relative symlinks to ``<repo>/blobs/<hash>``.
    """
    p = Path(real_dir)
    for anc in (p, *p.parents):
        repo = anc.parent.parent
        if anc.parent.name == "snapshots" and re.fullmatch(r"(models|datasets|spaces)--.+", repo.name):
            return str(repo)
    return None


def open_checked(root: Path, name: str) -> tuple[int, Path]:
    """Check ``name`` as :func:`check_file_name` does, open it, and verify the open file is the checked one.

    Between the check and the open, a symlink could be swapped to point
    elsewhere: the opened descriptor must be the same regular file (device
    and inode) that was checked. Returns ``(fd, path)``; the caller closes ``fd``.
    """
    path, checked = _check(root, name)
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
            raise DistLoadError(f"{path} changed between checking and opening it (another file was swapped in)")
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def open_regular(path: Path) -> int:
    """Open ``path`` read-only, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO that replaced the file since it was
    checked return at once instead of waiting for a writer; it has no effect
    on reads of regular files.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise DistLoadError(f"missing file {path}") from e
    except OSError as e:
        raise DistLoadError(f"cannot open {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DistLoadError(f"{path} is not a regular file (a FIFO, device or directory)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, view: memoryview, offset: int, name: object) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` with ``preadv``; a short file is a truncation error.

    The one read loop: headers here, tensor bytes in :mod:`distload.io.reader`.
    OS errors propagate as themselves, so callers can say what they were reading.
    """
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DistLoadError(f"{name}: truncated: file ended {total - done} bytes early at offset {offset + done}")
        done += n


def read_all(fd: int, n: int, name: object, offset: int = 0) -> bytes:
    """Exactly ``n`` bytes at ``offset``."""
    buf = bytearray(n)
    try:
        pread_into(fd, memoryview(buf), offset, name)
    except OSError as e:
        raise DistLoadError(f"{name}: read failed: {e.strerror or e}") from e
    return bytes(buf)


class FileSource(Source):
    """(any rank) One open local file: ``preadv`` reads by the caller's threads."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.name, self.version = fd, str(path), ""
        try:
            self.size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise DistLoadError(f"{path}: cannot stat: {e.strerror or e}") from e

    def read_into(self, view: memoryview, offset: int, what: str | None = None) -> None:
        pread_into(self.fd, view, offset, what or self.name)

    def sequential(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class LocalStore(Store):
    """(any rank) A checkpoint directory on this node."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(root)

    def open(self, name: str, *, checked: bool = True) -> FileSource:
        if checked:
            fd, path = open_checked(self.root, name)
        else:
            path = self.root / name
            fd = open_regular(path)
        return FileSource(fd, path)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def get_small(self, name: str, limit: int) -> bytes | None:
        path = self.root / name
        if not path.is_file():
            return None
        src = FileSource(open_regular(path), path)
        try:
            if src.size > limit:
                raise DistLoadError(f"{path}: {src.size} bytes exceeds the {limit} byte limit")
            return src.read(src.size)
        finally:
            src.close()

    def uri(self, name: str) -> str:
        return str(self.root / name)
