"""The CLI under a real ``mpiexec`` (mpich): with the mpi4py transport, and with
torch.distributed bootstrapped from MPI. Every rank's tensors must equal a
single-process safetensors read, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import write_synthetic
from launch_env import CLI_CHECK, TESTS, clean_env, rank_results, venv_tool

pytestmark = pytest.mark.mpi

MPIEXEC = venv_tool("mpiexec")


def _require_mpi() -> None:
    if MPIEXEC is None:
        pytest.skip("mpiexec not found (pip install 'distload[mpi]' provides mpich's)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'distload[mpi]')")


def _mpiexec(n: int, ckpt: Path, out: Path, *cli: str) -> subprocess.CompletedProcess:
    _require_mpi()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [MPIEXEC, "-n", str(n), sys.executable, str(CLI_CHECK), str(out), str(ckpt),
           "--bucket-mb", "0.01", "--report", str(out / "report.json"), *cli]
    # Hydra picks its own ports; the torch bootstrap gets a free one from the TCPStore.
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=100)


def _assert_loaded_everywhere(proc: subprocess.CompletedProcess, out: Path, world: int) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for res in rank_results(out, world):
        assert res["rc"] == 0 and res["mismatches"] == [] and res["checked"] == 10, res
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == world
    read = sorted(f for r in report["ranks"] for f in r["files"])
    assert read == sorted(p.name for p in (out.parent / "ckpt").glob("*.safetensors")), "each file read once"
    return report


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "ckpt", n_files=4)


@pytest.mark.parametrize("world", [2, 3])
def test_mpi_transport_loads_every_tensor_bit_for_bit(ckpt, tmp_path, world):
    proc = _mpiexec(world, ckpt, tmp_path / "out", "--comm", "mpi")
    _assert_loaded_everywhere(proc, tmp_path / "out", world)


@pytest.mark.parametrize("world", [2, 3])
def test_torch_distributed_bootstrapped_from_mpiexec_loads_bit_for_bit(ckpt, tmp_path, world):
    proc = _mpiexec(world, ckpt, tmp_path / "out", "--comm", "torch")
    _assert_loaded_everywhere(proc, tmp_path / "out", world)



def test_mpi_collectives_broadcast_scatter_and_agree_on_errors(tmp_path):
    """MpiComm alone, 3 ranks: objects, any-dtype broadcasts, variable-size sends, a gather to one rank, and
    error agreement."""
    _require_mpi()
    proc = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(TESTS / "mpi_comm_check.py"), str(tmp_path)],
                          env=clean_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r, seen in enumerate(rank_results(tmp_path, 3)):
        assert seen["gathered"] == [{"r": 0}, {"r": 1}, {"r": 2}]
        assert seen["object"] == ["plan", 3]
        assert seen["bcast"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 3.5]
        assert seen["scatter"] == [10 * r + i for i in range(r + 1)], "each rank gets exactly its own bytes"
        assert seen["records"] == ([0, 100, 1, 101, 2, 102] if r == 2 else None), "only the root receives records"
        assert seen["failed_none"] is False and seen["failed"] is True
        assert seen["agreed"] == {"failures": {"2": "OSError: disk gone on rank 2"}, "phase": "transfer"}


def test_a_hung_rank_fails_the_mpi_load_and_ends_the_job(ckpt):
    """MPI collectives have no timeout: distload's must, and the job must end rather than hang."""
    import time

    _require_mpi()
    started = time.time()
    t0 = time.monotonic()
    try:
        proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(TESTS / "mpi_hang_check.py"), str(ckpt)],
                              env=clean_env(), capture_output=True, text=True, timeout=120)
    finally:
        _remove_orphaned_mpich_shm(started)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "distload: error" in proc.stderr and "timed out after 3 s" in proc.stderr, proc.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def _remove_orphaned_mpich_shm(since: float) -> None:
    """MPI_Abort skips mpich's cleanup: remove its /dev/shm segments made since ``since``
    that no live process maps any more (other tests' running jobs keep theirs)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/mpich_shm_" in line)
        except OSError:
            continue
    for seg in Path("/dev/shm").glob("mpich_shm_*"):
        try:
            if seg.stat().st_mtime >= since - 1 and str(seg) not in mapped:
                seg.unlink()
        except OSError:
            continue


def test_the_mpi_waiter_raises_a_failed_wait_and_reports_a_stuck_one():
    """An MPI error inside the waiter thread reaches the caller as itself, not as a timeout."""
    import threading

    from distload.transport.mpi import _Waiter

    class Failing:
        def Wait(self):
            raise RuntimeError("MPI_ERR_PROC_FAILED")

    class Never:
        def __init__(self):
            self.release = threading.Event()

        def Wait(self):
            self.release.wait()

    waiter = _Waiter(threaded=True)
    with pytest.raises(RuntimeError, match="MPI_ERR_PROC_FAILED"):
        waiter.wait(Failing(), 5)
    assert not waiter.stuck
    never = Never()
    assert waiter.wait(never, 0.2) is False and waiter.stuck
    never.release.set()


def test_a_timed_out_mpi_broadcast_keeps_its_buffer_until_the_request_completes(tmp_path):
    """MPI cannot cancel a posted collective: its memory must outlive the loader's reference to it."""
    _require_mpi()
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(TESTS / "mpi_stranded_check.py"), str(tmp_path)],
                          env=clean_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen == {"timed_out": True, "alive_after_timeout": True, "stranded_after_timeout": 1,
                    "zeros_until_the_root_sends": True, "released_after_completion": True,
                    "stranded_after_completion": 0}


def test_the_mpi_waiter_holds_a_stuck_requests_buffers_until_it_completes():
    import gc
    import threading
    import weakref

    import torch

    from distload.transport.mpi import _Waiter, stranded

    class Late:
        def __init__(self):
            self.release = threading.Event()

        def Wait(self):
            self.release.wait()

    waiter, late = _Waiter(threaded=True), Late()
    buf = torch.zeros(16)
    ref = weakref.ref(buf)
    before = stranded()
    assert waiter.wait(late, 0.1, keep=(buf,)) is False
    del buf
    gc.collect()
    assert ref() is not None and stranded() == before + 1
    late.release.set()
    for _ in range(200):
        if ref() is None:
            break
        threading.Event().wait(0.02)
        gc.collect()
    assert ref() is None and stranded() == before
