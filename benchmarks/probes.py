"""Per-process measurements for the benchmark: memory, IO counters, residency, checksums.

Everything here reads this process's own ``/proc/self`` files, so each rank
measures itself; the worker gathers the figures afterwards.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def proc_io() -> dict[str, int]:
    """``/proc/self/io``: rchar counts read() bytes (page cache included), read_bytes storage reads."""
    out: dict[str, int] = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, val = line.partition(":")
            out[key.strip()] = int(val)
    return out


class MemorySampler:
    """Samples RSS and anonymous RSS on a thread; peaks are reported as growth over the start.

    A thread, not ``VmHWM``, because anonymous memory has no high-water mark
    and mmap loaders grow file-backed RSS, which is page cache, not a copy.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.base = proc_status()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)

    def _sample(self) -> None:
        now = proc_status()
        for k, v in now.items():
            if v > self.peak.get(k, 0):
                self.peak[k] = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth(self) -> dict[str, int]:
        """Peak minus baseline for VmRSS and RssAnon, in bytes."""
        return {"peak_rss_growth": self.peak["VmRSS"] - self.base["VmRSS"],
                "peak_anon_growth": self.peak["RssAnon"] - self.base["RssAnon"]}


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict entry as the plain tensor this rank holds (a DTensor's local shard)."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if hasattr(t, "to_local"):
            t = t.to_local()
        out[name] = t
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def touch(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor, so every byte is resident.

    Cheap for owned memory, and forces mmap loaders to fault in (and read)
    what they deferred. Returns a value so the reads cannot be skipped.
    """
    acc = 0
    for t in tensors:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        b = _bytes(t)
        acc += int(b[::4096].sum()) + int(b[-1])
    return acc


def checksum(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """CRC32 of every tensor's bytes, by name (device tensors are copied to host first)."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type != "cpu":
            t = t.cpu()
        out[name] = zlib.crc32(memoryview(_bytes(t).numpy()))
    return out


def combine(per_rank: list[dict[str, int]]) -> str:
    """One hex digest from every rank's per-tensor CRCs."""
    crc = 0
    for r, sums in enumerate(per_rank):
        for name in sorted(sums):
            crc = zlib.crc32(f"{r}:{name}:{sums[name]};".encode(), crc)
    return f"{crc:08x}"


def _file_maps() -> list[tuple[int, int, str]]:
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, parts[5].strip()))
    return maps


def mmap_fraction(tensors: Iterable[torch.Tensor]) -> float:
    """Share of bytes whose memory is a file mapping (page-cache views) rather than owned memory."""
    maps = [m for m in _file_maps() if m[2].endswith(".safetensors")]
    mapped = total = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        n = t.numel() * t.element_size()
        total += n
        p = t.data_ptr()
        if any(lo <= p < hi for lo, hi, _ in maps):
            mapped += n
    return mapped / total if total else 0.0


def evict(paths: Iterable[Path]) -> None:
    """Drop these files from the page cache (clean pages only; the files are never written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def machine() -> dict:
    """Cores, memory and accelerator, for the table and the plot."""
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    thp = ""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return {"cores": os.cpu_count(), "mem_gib": round(mem / 2**30, 1), "cpu": cpu, "gpu": gpu,
            "thp": thp, "torch": torch.__version__}
