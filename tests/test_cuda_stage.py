"""The CUDA data path: pinned staging, copy stream, comm stream and events (skipped without CUDA).

Ordering is checked the hard way: ``torch.cuda._sleep`` makes each copy and
each collective lag behind the host, so a staging buffer recycled before its
copy finished, or a device bucket refilled before its collective and
unpacking finished, would corrupt the bytes the test compares.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch

import distload
import distload.io.reader
from ckpt import read_all
from distload.format.header import read_checkpoint
from distload.model.place import Placement, byte_view, torch_dtype
from distload.plan.load_plan import build_plan
from distload.plan.items import RankInfo
from distload.io.reader import ChunkReader, open_verified

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SPLIT = 64 << 10
LAG_CYCLES = 200_000  # ~0.1 ms of GPU time before every copy and every collective


def _write(out: Path) -> Path:
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    files = {"a.safetensors": {"w": torch.randn(900_001, generator=g), "b": torch.randn(7, generator=g)},
             "b.safetensors": {"h": torch.randn(400_003, generator=g).to(torch.bfloat16),
                               "i": torch.randint(0, 9, (5_001,), generator=g, dtype=torch.int32)}}
    for name, ts in files.items():
        save_file(ts, str(out / name))
    wm = {k: name for name, ts in files.items() for k in ts}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return out


def _threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("distload-"))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return _write(tmp_path / "ckpt")


@pytest.fixture
def nccl_world1():
    """A one-rank NCCL group, so collectives really run on NCCL's stream."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL not available")
    with tempfile.TemporaryDirectory() as tmp:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        try:
            yield dist
        finally:
            dist.destroy_process_group()


def _through_stage(path: Path, dist, *, bucket_mb: float, io_threads: int, staging: int, direct: bool,
                   fail_at: int = 0, sizes: list | None = None) -> dict[str, torch.Tensor]:
    """Walk the schedule as the loop does: threads read into pinned staging, the copy stream
    uploads, the comm stream broadcasts (NCCL) and unpacks into device destinations."""
    from distload.io.stage import CopyStage

    dev = torch.device("cuda", 0)
    plan = build_plan(read_checkpoint(path), [RankInfo(0, "h", 0)], bucket_mb=bucket_mb)
    dests = {k: torch.full(s, 0, dtype=torch_dtype(plan.dtypes[k]), device=dev) for k, s in plan.shapes.items()}
    placement = Placement(dests, plan.dtypes)
    fds = {i: open_verified(plan, i) for i in range(len(plan.files))}
    stage = CopyStage(dev, plan.bucket_bytes, staging=staging)
    chunks = [c for c in plan.chunks if c.nbytes]
    reader = ChunkReader(plan, fds, chunks, stage.pinned, lambda c: None, io_threads=io_threads,
                         ahead=stage.read_ahead)
    try:
        for n, chunk in enumerate(chunks):
            got, host, pooled, err = reader.next()
            if err is not None:
                raise err
            assert got is chunk and pooled
            p = chunk.pieces[0]
            into = byte_view(dests[p.name])[p.tensor_offset: p.tensor_offset + p.nbytes] \
                if (direct and chunk.direct) else None
            with torch.cuda.stream(stage.copy_stream):
                torch.cuda._sleep(LAG_CYCLES)
            buf = stage.upload(host, pooled=pooled, into=into)
            with stage.collective():
                torch.cuda._sleep(LAG_CYCLES)
                dist.broadcast(buf, src=0)
                if into is None:
                    for piece in chunk.pieces:
                        placement.commit(piece.name, piece.tensor_offset,
                                         buf[piece.chunk_offset: piece.chunk_offset + piece.nbytes])
            stage.done(buf)
            if fail_at and n + 1 == fail_at:
                raise RuntimeError("injected consumer failure")
    finally:
        stage.close()
        reader.close()
        for fd in fds.values():
            os.close(fd)
    torch.cuda.synchronize(dev)
    if sizes is not None:
        sizes += [stage.allocated_bytes, plan.bucket_bytes]
    return dests


@pytest.mark.parametrize("direct", [False, True])
def test_stream_and_event_ordering_keeps_every_byte_over_many_small_chunks(ckpt, nccl_world1, monkeypatch, direct):
    monkeypatch.setattr(distload.io.reader, "MIN_SPLIT_BYTES", SPLIT)
    got = _through_stage(ckpt, nccl_world1, bucket_mb=0.05, io_threads=4, staging=3, direct=direct)
    for k, want in read_all(ckpt).items():
        assert torch.equal(got[k].cpu().view(torch.uint8), want.view(torch.uint8)), k


@pytest.mark.parametrize("staging", [1, 2])
def test_staging_buffers_are_recycled_safely_with_more_threads_than_buffers(ckpt, nccl_world1, monkeypatch, staging):
    monkeypatch.setattr(distload.io.reader, "MIN_SPLIT_BYTES", SPLIT)
    sizes: list[int] = []
    got = _through_stage(ckpt, nccl_world1, bucket_mb=0.3, io_threads=8, staging=staging, direct=False, sizes=sizes)
    for k, want in read_all(ckpt).items():
        assert torch.equal(got[k].cpu().view(torch.uint8), want.view(torch.uint8)), k
    assert _threads() == []
    allocated, bucket = sizes
    assert allocated <= (staging + 2) * bucket, "pinned and device buckets stay fixed, whatever io_threads is"


def test_a_failure_mid_stream_closes_the_stage_and_leaves_no_thread(ckpt, nccl_world1):
    with pytest.raises(RuntimeError, match="injected"):
        _through_stage(ckpt, nccl_world1, bucket_mb=0.05, io_threads=8, staging=2, direct=False, fail_at=5)
    torch.cuda.synchronize()
    assert _threads() == []


def test_a_cuda_load_is_bit_identical_with_many_threads_and_small_buckets(ckpt, monkeypatch):
    monkeypatch.setattr(distload.io.reader, "MIN_SPLIT_BYTES", SPLIT)
    got = distload.load_state_dict(ckpt, device="cuda", bucket_mb=0.05, io_threads=8)
    for k, want in read_all(ckpt).items():
        assert got[k].is_cuda and torch.equal(got[k].cpu().view(torch.uint8), want.view(torch.uint8)), k
    assert _threads() == []


def test_a_cuda_load_with_a_cast_matches_a_cast_on_the_host(ckpt):
    got = distload.load_state_dict(ckpt, device="cuda", bucket_mb=0.05, io_threads=8, dtype=torch.bfloat16)
    for k, want in read_all(ckpt).items():
        want = want.to(torch.bfloat16) if want.is_floating_point() else want
        assert torch.equal(got[k].cpu(), want), k


def test_a_read_error_on_the_cuda_path_raises_the_agreed_error_and_leaves_no_thread(ckpt, monkeypatch):
    monkeypatch.setattr(distload.io.reader, "MIN_SPLIT_BYTES", SPLIT)
    real, calls = distload.io.reader.read_exact, [0]
    lock = threading.Lock()

    def failing(fd, buf, offset, name):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 6:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", failing)
    with pytest.raises(distload.DistLoadError, match="injected") as info:
        distload.load_state_dict(ckpt, device="cuda", bucket_mb=0.05, io_threads=8)
    assert ".safetensors bytes" in str(info.value) and isinstance(info.value.__cause__, OSError)
    torch.cuda.synchronize()
    assert _threads() == []
