"""Faults injected into real multi-process loads: every surviving rank raises, naming the rank at fault, fast.

Read and placement faults are injected by monkeypatching inside the child
process (no test hooks in distload). Dead and hung ranks run under
``torchrun --standalone`` (free ports), through the real CLI.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import distload
from ckpt import write_sized
from dist import run_world

HERE = Path(__file__).parent
SIZES_KIB = [64, 48, 32, 16]  # four files, so every rank of a world of up to 4 owns one
BUCKET_MB = 0.01  # ~10 KiB chunks: many collectives per file, so faults land mid-load
# Bounds. LOAD_S: from the load call to the agreed error, measured in each
# rank (milliseconds in practice). JOB_S: a whole torchrun job, interpreter
# start-ups included. HANG_S: when the harness declares a child hung; it is
# generous because spawning several torch processes on a busy 2-core machine
# can take tens of seconds, which says nothing about distload.
LOAD_S = 30.0
JOB_S = 60.0
HANG_S = 150.0


@pytest.fixture(scope="module")
def sized(tmp_path_factory) -> Path:
    return write_sized(tmp_path_factory.mktemp("faults") / "ckpt", SIZES_KIB)


def _outcome(e: BaseException, rank: int) -> dict:
    rec = {"kind": type(e).__name__, "message": str(e)}
    if isinstance(e, distload.DistLoadError):
        cause = e.__cause__
        rec.update(phase=e.phase, failures=e.failures, agreed=e.agreed,
                   tracebacks=sorted(e.tracebacks),
                   cause=type(cause).__name__ if cause is not None else None,
                   cause_traceback=cause is not None and cause.__traceback__ is not None)
    return rec


class _Sized(nn.Module):
    """A model with the tensors of ``write_sized(SIZES_KIB)``."""

    def __init__(self) -> None:
        super().__init__()
        for i, kib in enumerate(SIZES_KIB):
            layer = nn.Module()
            layer.weight = nn.Parameter(torch.empty(kib, 256))
            layer.bias = nn.Parameter(torch.empty(5))
            setattr(self, f"layer{i}", layer)


def _read_fails_on(rank: int, world: int, path: str, bad_rank: int) -> dict:
    """(every rank) Load; ``bad_rank``'s second chunk read fails with EIO. Counts collectives."""
    import distload.transport.comm
    import distload.io.reader

    import torch.distributed as dist

    counts = {"broadcasts": 0, "statuses": 0, "failed_at": None, "reduced_sizes": set()}
    real_broadcast, real_status = distload.transport.comm.TorchComm.broadcast_, distload.transport.comm.TorchComm.post_status
    real_reduce = dist.all_reduce

    def broadcast_(self, buf, src):
        counts["broadcasts"] += 1
        return real_broadcast(self, buf, src)

    def post_status(self, failed):
        counts["statuses"] += 1
        return real_status(self, failed)

    def all_reduce(tensor, *args, **kwargs):  # every agreement: one scalar, whatever the world size
        counts["reduced_sizes"].add(tensor.numel())
        return real_reduce(tensor, *args, **kwargs)

    distload.transport.comm.TorchComm.broadcast_, distload.transport.comm.TorchComm.post_status = broadcast_, post_status
    dist.all_reduce = all_reduce
    if rank == bad_rank:
        real, calls = distload.io.reader.read_exact, [0]

        def failing(fd, buf, offset, name):
            calls[0] += 1
            if calls[0] == 2:
                counts["failed_at"] = counts["broadcasts"]
                raise OSError(errno.EIO, "Input/output error (injected)")
            return real(fd, buf, offset, name)

        distload.io.reader.read_exact = failing
    t0 = time.monotonic()
    try:
        distload.load_state_dict(path, bucket_mb=BUCKET_MB)
        return {"kind": "ok"}
    except Exception as e:
        return {**_outcome(e, rank), "seconds": time.monotonic() - t0, **counts}


@pytest.mark.parametrize("world,bad_rank", [(2, 1), (3, 2), (4, 1)])
def test_a_read_error_on_one_rank_fails_every_rank_naming_it(sized, world, bad_rank):
    results = run_world(_read_fails_on, world, str(sized), bad_rank, timeout=HANG_S)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["phase"] == "transfer" and rec["agreed"]
        assert list(rec["failures"]) == [bad_rank]
        assert f"rank(s) {bad_rank}:" in rec["message"]
        assert "Input/output error (injected)" in rec["message"]
        assert ".safetensors bytes" in rec["message"], "the error names the file and byte range"
        assert rec["tracebacks"] == [bad_rank]
        assert rec["seconds"] < LOAD_S
    assert len({rec["message"] for rec in results}) == 1
    bad = results[bad_rank]
    assert bad["cause"] == "OSError" and bad["cause_traceback"], "the original exception is the cause"
    assert all(rec["cause"] is None for r, rec in enumerate(results) if r != bad_rank)
    # The failed rank kept taking part (every rank made the same broadcasts) up to the next
    # status exchange: within AGREE_EVERY collectives of the step whose read failed, which
    # the reader ran at most READ_AHEAD chunks early.
    from distload.io.reader import READ_AHEAD
    from distload.transfer.loop import AGREE_EVERY

    assert len({rec["broadcasts"] for rec in results}) == 1, [rec["broadcasts"] for rec in results]
    assert bad["failed_at"] is not None and bad["broadcasts"] - bad["failed_at"] <= AGREE_EVERY + READ_AHEAD
    assert bad["statuses"] < bad["broadcasts"], "status exchanges are batched on CPU"
    assert all(rec["reduced_sizes"] == {1} for rec in results), "an agreement all-reduces one scalar"


def _placement_fails_on_last(rank: int, world: int, path: str) -> dict:
    """(every rank) Load into a model with a cast; the last rank's third placement raises."""
    import distload.model.place

    if rank == world - 1:
        real, calls = distload.model.place.Placement.commit, [0]

        def failing(self, name, offset, src):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected placement failure")
            return real(self, name, offset, src)

        distload.model.place.Placement.commit = failing
    with distload.empty_init():
        model = _Sized()
    t0 = time.monotonic()
    try:
        distload.load_checkpoint(model, path, dtype=torch.bfloat16, bucket_mb=BUCKET_MB)
        rec = {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e, rank)
    rec["seconds"] = time.monotonic() - t0
    rec["all_meta"] = all(p.is_meta for p in model.parameters())
    return rec


def test_a_placement_error_on_the_last_rank_fails_every_rank_and_leaves_models_on_meta(sized):
    results = run_world(_placement_fails_on_last, 2, str(sized), timeout=HANG_S)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["phase"] == "transfer" and list(rec["failures"]) == [1]
        assert "injected placement failure" in rec["message"]
        assert "placing 'layer" in rec["message"], "the error names the key"
        assert rec["all_meta"], f"rank {r}: a failed load must not leave a usable-looking model"
        assert rec["seconds"] < LOAD_S
    assert results[1]["cause"] == "RuntimeError" and results[1]["cause_traceback"]


def _own_paths(rank: int, world: int, cases: list[list[str]]) -> list[dict]:
    """(every rank) Load each case from this rank's own path, as with node-local storage.

    Each rank plays a node of its own (torchrun's ``GROUP_RANK``), as on a
    cluster where every node holds its own copy.
    """
    os.environ["GROUP_RANK"] = str(rank)
    out = []
    for paths in cases:
        try:
            distload.load_state_dict(paths[rank], bucket_mb=BUCKET_MB)
            out.append({"kind": "ok"})
        except Exception as e:
            out.append(_outcome(e, rank))
    return out


@pytest.fixture(scope="module")
def per_node(sized, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Both node-local cases in one world-2 job: an agreed error leaves the group usable."""
    tmp = tmp_path_factory.mktemp("nodes")
    # Rank 1's "node" has the index but none of the shards.
    partial = tmp / "partial"
    partial.mkdir()
    shutil.copy(sized / "model.safetensors.index.json", partial)
    # Same names and sizes, different headers: rank 0 planned with other bytes.
    other = tmp / "other"
    shutil.copytree(sized, other)
    for f in sorted(other.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        at = raw.index(b'"F32"')
        raw[at : at + 5] = b'"I32"'
        f.write_bytes(bytes(raw))
    results = run_world(_own_paths, 2, [[str(sized), str(partial)], [str(sized), str(other)]], timeout=HANG_S)
    return {"partial": (partial, [r[0] for r in results]), "other": (other, [r[1] for r in results])}


def test_a_file_missing_on_one_node_fails_every_rank_naming_that_rank(per_node):
    partial, results = per_node["partial"]
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["phase"] == "open" and list(rec["failures"]) == [1]
        assert f"missing file {partial}" in rec["message"]


def test_a_shard_that_differs_on_one_node_fails_every_rank(per_node):
    _, results = per_node["other"]
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert list(rec["failures"]) == [1] and "differs from the one rank 0 planned with" in rec["message"]


def test_a_failed_load_can_be_retried_on_the_same_model(sized, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sized, broken)
    last = sorted(broken.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-4])
    with distload.empty_init():
        model = _Sized()
    with pytest.raises(distload.DistLoadError, match="truncated"):
        distload.load_checkpoint(model, broken)
    assert all(p.is_meta for p in model.parameters())
    distload.load_checkpoint(model, sized)
    assert not any(p.is_meta for p in model.parameters())


def _torchrun(ckpt: Path, nproc: int, fault_rank: int, fault: str, *cli: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    # A 2 s monitor interval: on a loaded machine the agent's default 0.1 s could stop
    # the survivor before it prints the error these tests read (the job still ends).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval", "2",
           "--nproc_per_node", str(nproc), str(HERE / "fault_worker.py"), str(ckpt), "--fault-rank", str(fault_rank), "--fault", fault,
           "--", "--bucket-mb", str(BUCKET_MB), *cli]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, env=env)
    return proc, time.monotonic() - t0


def test_a_rank_killed_mid_load_under_torchrun_ends_the_job_nonzero_quickly(sized):
    proc, seconds = _torchrun(sized, 2, 1, "kill", "--timeout-s", "30")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < JOB_S
    assert "rank 1 kills itself now" in out
    # The survivor raises a clear error naming the phase ...
    assert "distload: error: transfer failed on rank 0" in out, out[-3000:]
    assert "did another rank die or time out?" in out
    # ... and torchrun names the dead rank and its signal.
    assert "rank      : 1" in out and "exitcode  : -9" in out


def test_a_rank_hung_mid_load_under_torchrun_ends_the_job_after_timeout_s(sized):
    proc, seconds = _torchrun(sized, 2, 1, "hang", "--timeout-s", "5")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < JOB_S
    assert "rank 1 hangs itself now" in out
    assert "distload: error: transfer failed on ranks 0-1" in out, out[-3000:]
    assert "Timed out" in out and "rank 1: did not respond" in out, "the survivor names the hung rank"


def _hang_on_a_dedicated_group(rank: int, world: int, path: str) -> dict:
    """(every rank) Load over ``dist.new_group(timeout=3s)``; rank 1's first read stalls for 12 s."""
    import datetime

    import torch.distributed as dist

    import distload.io.reader

    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        real, calls = distload.io.reader.read_exact, [0]

        def stalled(*a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                time.sleep(12)
            return real(*a, **kw)

        distload.io.reader.read_exact = stalled
    t0 = time.monotonic()
    try:
        distload.load_state_dict(path, bucket_mb=BUCKET_MB, process_group=group)
        rec = {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e, rank)
    rec["seconds"] = time.monotonic() - t0
    return rec


def test_a_dedicated_group_timeout_bounds_the_load_and_names_the_stalled_rank(sized):
    rank0, rank1 = run_world(_hang_on_a_dedicated_group, 2, str(sized), timeout=HANG_S)
    assert rank0["kind"] == "DistLoadError" and rank0["phase"] == "transfer"
    assert "rank(s) 1 did not respond" in rank0["message"] and 1 in rank0["failures"]
    assert rank0["seconds"] < 11, "the group's 3 s timeout (plus a 3 s check-in) bounds the wait, not the stall"
    assert rank1["kind"] == "DistLoadError"


# ---- allocation and write failures, replicated and FSDP2 ----------------------------

def _fails_on_last(rank: int, world: int, path: str, fault: str, model_kind: str, policy: str) -> dict:
    """(every rank) Load with a cast; on the last rank the first buffer allocation or write fails.

    ``fault="alloc"``: the main thread's first ``BufferPool.acquire`` (a
    receive buffer, allocated before the collective) raises MemoryError.
    ``fault="write"``: the first ``Placement.commit`` (casting bytes into
    place) raises. ``model_kind`` is ``replicated`` or ``fsdp``.
    """
    import threading

    import distload.model.place
    import distload.io.reader
    from test_fsdp import _fsdp_odd

    if rank == world - 1:
        if fault == "alloc":
            real_acquire = distload.io.reader.BufferPool.acquire

            def acquire(self, nbytes):
                if threading.current_thread() is threading.main_thread():
                    raise MemoryError("injected allocation failure")
                return real_acquire(self, nbytes)

            distload.io.reader.BufferPool.acquire = acquire
        else:
            def commit(self, name, offset, src):
                raise RuntimeError("injected write failure")

            distload.model.place.Placement.commit = commit
    if model_kind == "fsdp":
        model = _fsdp_odd(world)
    else:
        with distload.empty_init():
            model = _Sized()
    t0 = time.monotonic()
    try:
        distload.load_checkpoint(model, path, dtype=torch.bfloat16, bucket_mb=0.0002 if model_kind == "fsdp"
                                 else BUCKET_MB, read_policy=policy)
        rec = {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e, rank)
    rec["seconds"] = time.monotonic() - t0
    rec["all_meta"] = all(t.is_meta for t in model.parameters())
    return rec


@pytest.mark.parametrize("fault,model_kind,policy", [
    ("alloc", "replicated", "auto"),
    ("alloc", "fsdp", "scatter"),
    ("write", "fsdp", "scatter"),
    ("write", "fsdp", "slice"),
])
def test_an_allocation_or_write_failure_on_one_rank_fails_every_rank_and_leaves_all_on_meta(
        sized, tmp_path, fault, model_kind, policy):
    from test_fsdp import write_odd

    path = sized
    if model_kind == "fsdp":
        path = tmp_path / "odd.safetensors"
        write_odd(path)
    results = run_world(_fails_on_last, 2, str(path), fault, model_kind, policy, timeout=HANG_S)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["phase"] == "transfer" and list(rec["failures"]) == [1], rec
        assert f"injected {'allocation' if fault == 'alloc' else 'write'} failure" in rec["message"]
        assert rec["all_meta"], f"rank {r}: a failed load must leave every parameter on meta"
        assert rec["seconds"] < LOAD_S


def _sharded_differently_on_last(rank: int, world: int, path: str) -> dict:
    """(every rank) FSDP2 load where the last rank shards ``a`` on dim 1 and every other rank on dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    with distload.empty_init():
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    mesh = init_device_mesh("cpu", (world,))
    dim = 1 if rank == world - 1 else 0
    fully_shard(model[1], mesh=mesh)
    fully_shard(model[0], mesh=mesh, shard_placement_fn=lambda p: Shard(dim if p.ndim == 2 else 0))
    try:
        distload.load_checkpoint(model, path)
        rec = {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e, rank)
    rec["all_meta"] = all(t.is_meta for t in model.parameters())
    return rec


def test_a_dtensor_sharded_differently_on_one_rank_fails_every_rank_and_leaves_all_on_meta(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).state_dict().items()},
              str(tmp_path / "m.safetensors"))
    results = run_world(_sharded_differently_on_last, 2, str(tmp_path / "m.safetensors"), timeout=HANG_S)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert rec["phase"] == "open" and list(rec["failures"]) == [1], rec
        assert "0.weight: local shard is" in rec["message"]
        assert rec["all_meta"], f"rank {r}: a failed load must leave every parameter on meta"
