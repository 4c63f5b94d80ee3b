"""The CUDA data path, on a real GPU (skipped without CUDA); ``benchmarks/gpu_check.sh`` runs it.

- Pinned staging, copy stream, comm stream and events. Ordering is checked the
  hard way: ``torch.cuda._sleep`` makes each copy and each collective lag
  behind the host, so a staging buffer recycled before its copy finished, or a
  device bucket refilled before its collective and unpacking finished, would
  corrupt the bytes the test compares.
- The real torch.distributed path on one GPU: a one-rank NCCL group with
  ``DISTLOAD_WORLD1_COLLECTIVES=1`` (``tests/world1.py``): replicated, FSDP2
  scatter and slice (with and without a cast), an injected read error.
- Pinned memory given back, the report's clock after the device, reader
  threads on the rank's GPU.
- With two GPUs: a 2-rank ``torchrun`` job (``tests/cuda_worker.py``) on the
  caller's own NCCL group, and a hung peer.
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


# ---- the real torch.distributed path on one GPU: a one-rank NCCL group (tests/world1.py) ----------

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    from ckpt import write_llama

    return write_llama(tmp_path / "llama")


def _spy_transport(monkeypatch) -> dict[str, list]:
    """Record the kind of every status exchange the loop posts and the backend of every control message."""
    import torch.distributed as dist

    from distload.transport.comm import TorchComm

    seen: dict[str, list] = {"statuses": [], "control": []}
    post, ctl = TorchComm.post_status, TorchComm._ctl

    def post_status(self, failed):
        status = post(self, failed)
        seen["statuses"].append(type(status).__name__)
        return status

    def control(self):
        group = ctl(self)
        seen["control"].append(dist.get_backend(group))
        return group

    monkeypatch.setattr(TorchComm, "post_status", post_status)
    monkeypatch.setattr(TorchComm, "_ctl", control)
    return seen


def test_world1_nccl_replicated_load_matches_from_pretrained_through_nccl_and_the_side_group(llama, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from world1 import full_state, reference, world1_group

    seen = _spy_transport(monkeypatch)
    with world1_group("nccl", CUDA0):
        with distload.empty_init():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama))
        report = distload.load_checkpoint(model, llama, device="cuda", bucket_mb=0.01)
        got = full_state(model)
    assert report.device == "cuda:0" and report.chunks > 16
    assert seen["statuses"] and set(seen["statuses"]) == {"_OnDevice"}, "statuses ride the GPU stream"
    assert seen["control"] and set(seen["control"]) == {"gloo"}, "plans and reports travel over gloo"
    for k, want in reference(llama).items():
        assert torch.equal(got[k], want), k
    assert _threads() == []


@pytest.mark.parametrize("policy", ["scatter", "slice"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_world1_nccl_fsdp2_load_scatters_or_slices_and_matches_from_pretrained(llama, monkeypatch, policy, dtype):
    from world1 import force_sharded, fsdp_llama, full_state, reference, world1_group

    force_sharded(monkeypatch, policy)
    with world1_group("nccl", CUDA0):
        model = fsdp_llama(llama, CUDA0)
        report = distload.load_checkpoint(model, llama, device="cuda", bucket_mb=0.01, read_policy=policy,
                                          dtype=dtype)
        got = full_state(model)
    assert set(report.read_policy.values()) == {policy}
    for k, want in reference(llama, dtype).items():
        assert torch.equal(got[k], want), k


def test_world1_nccl_read_error_is_the_agreed_error_and_leaves_the_gpu_usable(llama, monkeypatch):
    from world1 import world1_group

    real, calls = distload.io.reader.read_exact, [0]

    def failing(fd, buf, offset, name):
        calls[0] += 1
        if calls[0] == 30:  # past the first status window: the failed rank takes part with stand-ins
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", failing)
    with world1_group("nccl", CUDA0):
        with pytest.raises(distload.DistLoadError, match="injected") as info:
            distload.load_state_dict(llama, device="cuda", bucket_mb=0.01, io_threads=1)
        torch.cuda.synchronize()
        again = distload.load_state_dict(llama, device="cuda", bucket_mb=0.01)  # the group still works
    assert info.value.phase == "transfer" and list(info.value.failures) == [0]
    assert all(torch.equal(again[k].cpu(), v) for k, v in read_all(llama).items())
    assert _threads() == []


def test_a_cuda_load_gives_its_pinned_memory_back_and_times_the_device(ckpt, monkeypatch):
    import distload.loader

    waits = []
    real = distload.loader.wait_for_device
    monkeypatch.setattr(distload.loader, "wait_for_device", lambda dev, s: waits.append(dev) or real(dev, s))
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip(f"torch {torch.__version__} has no host_memory_stats")
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    distload.load_state_dict(ckpt, device="cuda", bucket_mb=1)
    after = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    assert waits == [torch.device("cuda", 0)], "the report's clock stops after the device finished"
    assert after <= before, f"{after - before} pinned bytes still held after the load"


def test_reader_threads_make_the_ranks_gpu_current(ckpt, monkeypatch):
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    seen = set()
    real = torch.cuda.set_device

    def set_device(d):
        if threading.current_thread().name.startswith("distload-"):
            seen.add(torch.device(d))
        return real(d)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    got = distload.load_state_dict(ckpt, device=dev, bucket_mb=0.05, io_threads=4)
    assert seen == {dev} and all(t.device == dev for t in got.values())


# ---- two GPUs: a real 2-rank torchrun job --------------------------------------------------------

def _torchrun(tmp_path: Path, ckpt: Path, case: str, timeout: float, ranks=(0, 1)) -> list[dict]:
    import json
    import subprocess

    from launch_env import clean_env, free_port, venv_tool

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torchrun = venv_tool("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / f"out_{case}"
    out.mkdir()
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "cuda_worker.py"), str(out), str(ckpt), case]
    proc = subprocess.run(cmd, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)
    results = []
    for r in ranks:
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results.append(json.loads(path.read_text()))
    return results


def test_two_ranks_on_two_gpus_load_bit_for_bit_on_their_own_gpus(tmp_path, llama):
    results = _torchrun(tmp_path, llama, "loads", timeout=300)
    for r, res in enumerate(results):
        assert "traceback" not in res, res
        assert res["device"] == f"cuda:{r}" and res["current_device"] == r, res
        for case in ("replicated", "fsdp_scatter", "fsdp_slice", "fsdp_auto"):
            assert res[case] == [], (r, case, res[case])


def test_a_hung_peer_fails_the_other_gpu_rank_with_distloads_error_inside_nccls_timeout(tmp_path, llama):
    from cuda_worker import NCCL_TIMEOUT_S

    rank0 = _torchrun(tmp_path, llama, "hang", timeout=300, ranks=(0,))[0]  # rank 1 is the one that hangs
    # Rank 0 lived to write this: distload gave up (0.8 x NCCL's timeout after its last status) and
    # aborted the group before NCCL's watchdog would have torn the process down.
    assert rank0["kind"] == "DistLoadError", rank0
    assert rank0["seconds"] < NCCL_TIMEOUT_S + 10 and rank0["synced"], rank0
    assert "rank(s) 1" in rank0["message"] or "did not" in rank0["message"], rank0
