"""An emulated shared network filesystem: one checkpoint, N "hosts", one bandwidth cap.

A read-only FUSE filesystem mirrors a checkpoint directory at ``MNT/node0`` ...
``MNT/node{N-1}``. Each view is its own set of inodes, so the views share no
page cache, as separate hosts would not; files are opened with ``direct_io``,
so no read is served from the client's cache. One token bucket caps the
bytes per second that all views *together* get, which models the aggregate
bandwidth of shared storage, and a shared counter records the bytes served.

    python -m benchmarks.netfs SRC MNT --views 2 --rate-mb 300   # serve until Ctrl-C

In the benchmark it is a fixture: :func:`mounted` starts the server as a child
process, waits for the mount and always unmounts, even when the body fails.

Note on ``direct_io`` and mmap: the kernel refuses shared mmaps of
``direct_io`` files unless the FUSE library negotiates
``FUSE_DIRECT_IO_ALLOW_MMAP`` (libfuse >= 3.16). safetensors' ``safe_open``
maps files shared, so with an older libfuse the mmap loaders cannot run on a
``direct_io`` mount. :func:`mounted` then falls back to ``cache="page"``:
every open drops the view's cached pages (no ``keep_cache``), and each view
keeps its own page cache within one run, as a real client host would.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

class TokenBucket:
    """Serializes reservations so that all callers together get at most ``rate`` bytes/s.

    Each read reserves the next ``n / rate`` seconds of the shared pipe and
    sleeps until its slot ends; ``burst`` bytes may run ahead of the clock.
    """

    def __init__(self, rate: float, burst: float = 1 << 20):
        self.rate, self.burst = float(rate), float(burst)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst / self.rate)
            self._next = start + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


def _operations(src: Path, views: int, rate: float, served: Counters, cache: str):
    """The FUSE operations object (built in the server process, where mfusepy is imported)."""
    import mfusepy

    bucket = TokenBucket(rate)
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    base = os.stat(src)

    class NetFS(mfusepy.Operations):
        use_ns = True

        def _split(self, path: str) -> tuple[int, str]:
            parts = [p for p in path.split("/") if p]
            if not parts:
                return -1, ""
            view = parts[0]
            if not view.startswith("node") or not view[4:].isdigit() or int(view[4:]) >= views or len(parts) > 2:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if len(parts) == 2 and parts[1] not in names:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return int(view[4:]), parts[1] if len(parts) == 2 else ""

        def getattr(self, path: str, fh=None) -> dict:
            view, name = self._split(path)
            times = {"st_atime": base.st_atime_ns, "st_mtime": base.st_mtime_ns, "st_ctime": base.st_ctime_ns}
            if not name:
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, **times}
            st = os.stat(src / name)
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": st.st_size,
                    "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

        def readdir(self, path: str, fh: int):
            view, name = self._split(path)
            entries = [f"node{i}" for i in range(views)] if view < 0 else names
            return [".", "..", *entries]

        def open(self, path: str, fi) -> int:
            view, name = self._split(path)
            if not name:
                raise mfusepy.FuseOSError(errno.EISDIR)
            if fi.flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            fi.fh = os.open(src / name, os.O_RDONLY) * 64 + view  # the fd, and the view it serves
            fi.direct_io = 1 if cache == "direct" else 0
            fi.keep_cache = 0
            return 0

        def read(self, path: str, size: int, offset: int, fi) -> bytes:
            fd, view = divmod(fi.fh, 64)
            data = os.pread(fd, size, offset)
            bucket.take(len(data))
            served.add(view, len(data))
            return data

        def release(self, path: str, fi) -> int:
            os.close(fi.fh // 64)
            return 0

        def statfs(self, path: str) -> dict:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    return NetFS()


class Counters:
    """Bytes served per view, kept in a small file both processes map.

    The server adds to it; the benchmark reads it. A file (not a pipe or a
    port) so the fixture needs nothing but a path.
    """

    def __init__(self, path: Path, views: int, create: bool = False):
        self.views = views
        if create:
            path.write_bytes(bytes(8 * views))
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 8 * views)
        self._lock = threading.Lock()

    def add(self, view: int, n: int) -> None:
        with self._lock:
            old = struct.unpack_from("<q", self._map, 8 * view)[0]
            struct.pack_into("<q", self._map, 8 * view, old + n)

    def values(self) -> list[int]:
        return list(struct.unpack_from(f"<{self.views}q", self._map, 0))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _serve(src: Path, mnt: Path, views: int, rate: float, stats: Path, cache: str) -> None:
    """(server process) Mount and serve until unmounted."""
    import mfusepy

    counters = Counters(stats, views)
    ops = _operations(src, views, rate, counters, cache)
    mfusepy.FUSE(ops, str(mnt), raw_fi=True, foreground=True, ro=True, fsname="benchnetfs")


@dataclass
class NetFS:
    """A running emulation: where it is mounted and how many bytes it has served."""

    mnt: Path
    views: int
    rate: float
    cache: str
    counters: Counters

    def view(self, k: int) -> Path:
        return self.mnt / f"node{k}"

    def served(self) -> int:
        """Bytes served through every view together since the mount."""
        return sum(self.counters.values())

    def served_per_view(self) -> list[int]:
        return self.counters.values()


def fuse_unavailable() -> str | None:
    """Why FUSE cannot be used here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse: {e}"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no permission to open /dev/fuse"
    return None


def _unmount(mnt: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    for flags in (["-u"], ["-uz"]):
        if not os.path.ismount(mnt):
            return
        subprocess.run([tool, *flags, str(mnt)], capture_output=True, timeout=30)
        for _ in range(50):
            if not os.path.ismount(mnt):
                return
            time.sleep(0.1)


def shared_mmap_works(path: Path) -> bool:
    """Whether a shared read-only mmap (what safetensors does) succeeds on this file."""
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ):
                return True
        except OSError:
            return False


@contextlib.contextmanager
def mounted(src: str | os.PathLike, mnt: str | os.PathLike, *, views: int, rate: float,
            cache: str = "auto", timeout_s: float = 30) -> Iterator[NetFS]:
    """Mount the emulation of ``src`` at ``mnt`` for the ``with`` body; always unmount.

    ``rate`` is the shared cap in bytes/s (0: none). ``cache`` is ``"direct"``
    (``direct_io``), ``"page"`` (per-view page cache, dropped on each open) or
    ``"auto"``: direct unless shared mmaps fail there (see the module note).
    """
    src, mnt = Path(src).resolve(), Path(mnt)
    if not 0 < views <= 64:
        raise ValueError("views must be 1..64")
    mnt.mkdir(parents=True, exist_ok=True)
    want = "direct" if cache == "auto" else cache
    with tempfile.TemporaryDirectory(prefix="netfs-") as tmp:
        stats = Path(tmp) / "served"
        while True:
            counters = Counters(stats, views, create=True)
            log = open(Path(tmp) / "server.log", "w+")
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.netfs", "--serve", str(src), str(mnt), "--views", str(views),
                 "--rate-mb", str(rate / 1e6), "--cache", want, "--stats", str(stats)],
                cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout_s
                while not os.path.ismount(mnt):
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"the FUSE server exited with code {proc.returncode} before mounting "
                                           f"{mnt}: {log.read()[-2000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{mnt} was not mounted within {timeout_s} s")
                    time.sleep(0.05)
                fs = NetFS(mnt, views, rate, want, counters)
                probe = next((p for p in sorted(fs.view(0).iterdir()) if p.suffix == ".safetensors"), None)
                if cache == "auto" and want == "direct" and probe is not None and not shared_mmap_works(probe):
                    want = "page"
                    continue  # the finally below unmounts; mount again with the page cache
                yield fs
                return
            finally:
                _unmount(mnt)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                counters.close()
                log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("mnt", type=Path)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--rate-mb", type=float, default=300, help="shared cap in MB/s (0: none)")
    p.add_argument("--cache", choices=["auto", "direct", "page"], default="auto")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the fixture's server process
    p.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        _serve(args.src, args.mnt, args.views, args.rate_mb * 1e6, args.stats, args.cache)
        return
    with mounted(args.src, args.mnt, views=args.views, rate=args.rate_mb * 1e6, cache=args.cache) as fs:
        print(f"serving {args.src} at {fs.mnt}/node0..node{fs.views - 1}, cap {args.rate_mb} MB/s, "
              f"cache={fs.cache}; Ctrl-C to unmount")
        try:
            while True:
                time.sleep(5)
                print(f"served {fs.served() / 1e6:.1f} MB {[round(v / 1e6, 1) for v in fs.served_per_view()]}")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
