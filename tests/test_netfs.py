"""The emulated network filesystem fixture: mount, read through two views, count, unmount."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import netfs  # noqa: E402

_WHY = netfs.fuse_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"FUSE unavailable: {_WHY}")


def _src(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "model.safetensors").write_bytes(data)
    (src / "config.json").write_text("{}")
    return src, data


def test_two_views_serve_the_same_bytes_and_are_counted(tmp_path):
    src, data = _src(tmp_path)
    mnt = tmp_path / "mnt"
    with netfs.mounted(src, mnt, views=2, rate=0) as fs:
        assert sorted(p.name for p in fs.view(1).iterdir()) == ["config.json", "model.safetensors"]
        for k in (0, 1):
            assert (fs.view(k) / "model.safetensors").read_bytes() == data
        assert fs.served_per_view() == [len(data), len(data)]
        assert fs.served() == 2 * len(data)
    assert not os.path.ismount(mnt)


def test_views_have_their_own_inodes(tmp_path):
    src, _ = _src(tmp_path)
    with netfs.mounted(src, tmp_path / "mnt", views=2, rate=0) as fs:
        a, b = (os.stat(fs.view(k) / "model.safetensors") for k in (0, 1))
        assert a.st_ino != b.st_ino


def test_is_read_only(tmp_path):
    src, _ = _src(tmp_path)
    with netfs.mounted(src, tmp_path / "mnt", views=1, rate=0) as fs:
        with pytest.raises(OSError):
            open(fs.view(0) / "model.safetensors", "r+b")


def test_unmounts_when_the_body_fails(tmp_path):
    src, _ = _src(tmp_path)
    mnt = tmp_path / "mnt"
    with pytest.raises(RuntimeError, match="boom"):
        with netfs.mounted(src, mnt, views=2, rate=0):
            raise RuntimeError("boom")
    assert not os.path.ismount(mnt)


def test_token_bucket_reserves_bytes_over_rate_seconds(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(netfs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(netfs.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    bucket = netfs.TokenBucket(rate=50e6, burst=0)
    for _ in range(10):
        bucket.take(5_000_000)
    assert clock[0] == pytest.approx(101.0)  # 50 MB at 50 MB/s, whoever asks


def test_compare_unmounts_and_stops_its_job_on_sigterm(tmp_path):
    """A cancelled benchmark (scancel, kill) leaves no mount and no running job behind."""
    import signal
    import subprocess
    import time

    mnt = tmp_path / "mnt"
    repo = Path(__file__).resolve().parent.parent
    # A slow cap keeps the job inside the mount when the signal arrives.
    cmd = [sys.executable, "-m", "benchmarks.compare", "--quick", "--size", "smoke", "--fs", "fuse", "--world", "2",
           "--loaders", "floor", "--rate-mb", "0.2", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
           "--mnt", str(mnt), "--no-gpu"]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(repo)), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "out" / "logs").glob("*floor.log")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the benchmark job never started"
            time.sleep(0.2)
        time.sleep(3)  # the torchrun job is up and reading through the mount
        assert os.path.ismount(mnt)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert not os.path.ismount(mnt)
    left = subprocess.run(["pgrep", "-f", f"netfs {mnt}"], capture_output=True, text=True).stdout.split()
    assert not left, f"benchmark workers still running: {left}"
