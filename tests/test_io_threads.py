"""Threaded reads: every byte lands once, errors in any thread reach every rank, no thread outlives a load.

Sub-range reads are made small (``MIN_SPLIT_BYTES`` patched to 64 KiB) and
buckets odd-sized, so each chunk is read by several threads at once.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distload
import distload.io.reader
from ckpt import read_all
from dist import run_world
from distload.io.reader import BufferPool, split_ranges

ODD_MB = 0.37  # ~379 KiB buckets: chunks end mid-tensor at odd offsets
SPLIT = 64 << 10


def _write_odd(out: Path) -> Path:
    """Two files of odd-sized tensors in four dtypes (a few MiB), with an index."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    files = {
        "a.safetensors": {"big": torch.randn(1_000_003, generator=g),
                          "small": torch.randn(17, generator=g).to(torch.bfloat16),
                          "ints": torch.randint(-100, 100, (333_331,), generator=g, dtype=torch.int8)},
        "b.safetensors": {"half": torch.randn(700_001, generator=g).to(torch.float16),
                          "tail": torch.randn(3, 5, generator=g)},
    }
    for name, tensors in files.items():
        save_file(tensors, str(out / name))
    weight_map = {k: name for name, ts in files.items() for k in ts}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _distload_threads() -> list[str]:
    """The read and write threads alive (an in-process MPI test in the same worker may leave its comm's waiter)."""
    prefixes = ("distload-io-", "distload-reader", "distload-writer")
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefixes))


@pytest.fixture
def odd(tmp_path: Path) -> Path:
    return _write_odd(tmp_path / "odd")


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(distload.io.reader, "MIN_SPLIT_BYTES", SPLIT)


# ---- pure ------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 63, SPLIT, (1 << 20) + 1, (64 << 20) - 3, 3 * (1 << 20) + 5])
@pytest.mark.parametrize("threads", [1, 2, 3, 8, 64])
def test_split_ranges_cover_every_byte_exactly_once(nbytes, threads):
    parts = split_ranges(nbytes, threads)
    assert 1 <= len(parts) <= threads
    pos = 0
    for off, n in parts:
        assert off == pos and n > 0
        pos += n
    assert pos == nbytes
    if len(parts) > 1:
        assert all(n >= 1 << 20 for _, n in parts[:-1]) and all(off % SPLIT == 0 for off, _ in parts)


def test_split_ranges_of_an_empty_chunk_is_empty():
    assert split_ranges(0, 8) == []


# ---- one process -------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_many_threads_land_every_byte_exactly_once(odd, small_splits, monkeypatch, threads):
    real = distload.io.reader.read_exact
    reads: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def recording(fd, buf, offset, name):
        with lock:
            reads.append((name, offset, buf.numel()))
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", recording)
    got = distload.load_state_dict(odd, bucket_mb=ODD_MB, io_threads=threads)
    want = read_all(odd)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    # The reads tile each file's data section: no byte twice, none skipped.
    for name in ("a.safetensors", "b.safetensors"):
        spans = sorted((o, o + n) for f, o, n in reads if f == name)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"{name}: gap or overlap"
        assert spans[-1][1] == (odd / name).stat().st_size
    chunks = [c for c in distload.plan_checkpoint(odd, bucket_mb=ODD_MB).chunks if c.nbytes]
    if threads == 1:
        assert len(reads) == len(chunks)
    else:
        assert len(reads) > len(chunks), "chunks were split between threads"


def test_a_cast_load_through_pool_buffers_is_exact_with_many_threads(odd, small_splits):
    got = distload.load_state_dict(odd, bucket_mb=ODD_MB, io_threads=8, dtype=torch.float64)
    for k, w in read_all(odd).items():
        want = w.to(torch.float64) if w.is_floating_point() else w
        assert torch.equal(got[k], want), k


def test_no_read_thread_outlives_a_successful_load(odd, small_splits):
    assert _distload_threads() == []
    distload.load_state_dict(odd, bucket_mb=ODD_MB, io_threads=8)
    assert _distload_threads() == []


def test_no_read_thread_outlives_a_failed_load(odd, small_splits, monkeypatch):
    real, calls = distload.io.reader.read_exact, [0]
    lock = threading.Lock()

    def failing(fd, buf, offset, name):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 5:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", failing)
    with pytest.raises(distload.DistLoadError, match="injected") as info:
        distload.load_state_dict(odd, bucket_mb=ODD_MB, io_threads=8)
    assert ".safetensors bytes" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert _distload_threads() == []


def test_default_read_threads_share_the_nodes_cores_among_its_ranks(monkeypatch):
    from distload.plan.load_plan import LoadPlan
    from distload.transfer.loop import Transfer

    monkeypatch.setattr(distload.io.reader.os, "cpu_count", lambda: 16)
    assert [distload.io.reader.default_io_threads(n) for n in (1, 2, 4, 8, 32)] == [8, 8, 4, 2, 1]
    comm = distload.transport.comm.LocalComm(torch.device("cpu"))
    plan = LoadPlan("/ckpt", 1, (), (), 1 << 20)
    shared = Transfer(comm, plan, None, {}, ranks_here=4)
    assert (shared.feed_threads, shared.slice_threads) == (4, 8)  # slice reads are the whole job: every core
    given = Transfer(comm, plan, None, {}, io_threads=3, ranks_here=4)
    assert (given.feed_threads, given.slice_threads) == (3, 3)


def test_io_threads_must_be_a_positive_integer(odd):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(distload.DistLoadError, match="io_threads"):
            distload.load_state_dict(odd, io_threads=bad)


class _CountingPool(BufferPool):
    """Records the most buffers held at once."""

    held = 0
    most = 0
    lock = threading.Lock()

    def acquire(self, nbytes):
        buf = super().acquire(nbytes)
        with _CountingPool.lock:
            _CountingPool.held += 1
            _CountingPool.most = max(_CountingPool.most, _CountingPool.held)
        return buf

    def release(self, buf):
        with _CountingPool.lock:
            _CountingPool.held -= 1
        super().release(buf)


@pytest.mark.parametrize("threads", [1, 8])
def test_pool_buffers_in_use_do_not_grow_with_io_threads(odd, small_splits, monkeypatch, threads):
    # A cast puts every chunk through pool buffers: at most two, however many threads read.
    import distload.transfer.loop

    monkeypatch.setattr(distload.transfer.loop, "BufferPool", _CountingPool)
    _CountingPool.held = _CountingPool.most = 0
    distload.load_state_dict(odd, bucket_mb=ODD_MB, io_threads=threads, dtype=torch.float64)
    assert 1 <= _CountingPool.most <= 2


# ---- several ranks -----------------------------------------------------------------


def _thread_fails_on(rank: int, world: int, path: str, bad_rank: int) -> dict:
    """(every rank) Load with 8 threads; ``bad_rank``'s fourth sub-range read fails."""
    distload.io.reader.MIN_SPLIT_BYTES = SPLIT
    if rank == bad_rank:
        real, calls = distload.io.reader.read_exact, [0]
        lock = threading.Lock()

        def failing(fd, buf, offset, name):
            with lock:
                calls[0] += 1
                n = calls[0]
            if n == 4:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return real(fd, buf, offset, name)

        distload.io.reader.read_exact = failing
    try:
        distload.load_state_dict(path, bucket_mb=ODD_MB, io_threads=8)
        rec = {"kind": "ok"}
    except distload.DistLoadError as e:
        rec = {"kind": "DistLoadError", "message": str(e), "failures": sorted(e.failures), "agreed": e.agreed}
    rec["threads"] = _distload_threads()
    return rec


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_an_error_in_any_read_thread_fails_every_rank_naming_it(odd, bad_rank):
    results = run_world(_thread_fails_on, 2, str(odd), bad_rank, timeout=150)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["failures"] == [bad_rank] and rec["agreed"]
        assert f"rank(s) {bad_rank}:" in rec["message"] and "injected" in rec["message"]
        assert rec["threads"] == [], f"rank {r} left threads behind: {rec['threads']}"
    assert len({rec["message"] for rec in results}) == 1


def _threaded_world(rank: int, world: int, path: str) -> tuple[dict, list[str]]:
    distload.io.reader.MIN_SPLIT_BYTES = SPLIT
    sd = distload.load_state_dict(path, bucket_mb=ODD_MB, io_threads=8)
    return {k: v.clone() for k, v in sd.items()}, _distload_threads()


def test_a_threaded_world_of_two_is_bit_identical_on_every_rank(odd):
    want = read_all(odd)
    for got, threads in run_world(_threaded_world, 2, str(odd), timeout=150):
        assert threads == []
        for k in want:
            assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def _control(rank: int, world: int) -> tuple[bool, list[int]]:
    from distload.transport.comm import control_group

    import torch.distributed as dist

    first = control_group(None, list(range(world)), 30)
    again = control_group(None, list(range(world)), 30)
    t = torch.tensor([rank + 1])
    dist.all_reduce(t, group=first)
    return first is again, t.tolist()


def test_the_gloo_control_group_is_made_once_per_data_group_and_reduces(tmp_path):
    for same, total in run_world(_control, 2, timeout=150):
        assert same and total == [3]
