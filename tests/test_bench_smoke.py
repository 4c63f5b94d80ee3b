"""The benchmark harness end to end on a tiny checkpoint: it runs, agrees and writes its outputs.

Harness only: no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import netfs  # noqa: E402


def _compare(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.compare", "--quick", "--size", "smoke", "--world", "2",
           "--data", str(tmp_path / "data"), "--out", str(out), "--timeout", "240", "--no-gpu", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for ext in ("md", "json", "png"):
        assert (out / f"compare_smoke.{ext}").stat().st_size > 0
    return json.loads((out / "compare_smoke.json").read_text())


def test_compare_quick_runs_every_mode_and_checksums_agree(tmp_path):
    # Two loaders keep the suite fast; the peers share the same worker and probes.
    result = _compare(tmp_path, "--mode", "replicated,fsdp", "--loaders", "distload,floor")
    rows = {(r["mode"], r["loader"]): r for r in result["summary"]}
    assert set(rows) == {(m, n) for m in ("replicated", "fsdp") for n in ("distload", "floor")}
    for (mode, name), r in rows.items():
        assert r["error"] is None, r["error"]
        assert r["seconds"] > 0 and r["runs"] == 1
        if name != "floor":
            assert r["checksum_agrees"], (mode, name)
    ckpt_bytes = result["checkpoint"]["bytes"]
    rep = rows[("replicated", "distload")]
    assert rep["rchar_x"] < 1.5  # each file read once across ranks (plus rank 0's header reads)
    assert rep["local_bytes"] <= ckpt_bytes
    assert rows[("fsdp", "distload")]["local_bytes"] < rep["local_bytes"]  # fsdp ranks hold a share


@pytest.mark.skipif(netfs.fuse_unavailable() is not None, reason=f"FUSE unavailable: {netfs.fuse_unavailable()}")
def test_compare_on_the_emulated_network_filesystem_counts_storage_bytes(tmp_path):
    result = _compare(tmp_path, "--fs", "fuse", "--mode", "replicated", "--loaders", "distload,floor",
                      "--rate-mb", "0", "--mnt", str(tmp_path / "mnt"))
    rows = {r["loader"]: r for r in result["summary"]}
    assert rows["distload"]["error"] is None, rows["distload"]["error"]
    # Each file crosses the "network" once for the whole job (a naive loader pulls 2x at world 2);
    # on this tiny checkpoint rank 0's header reads and the client's readahead add a little.
    assert rows["floor"]["storage_x"] == pytest.approx(1.0, abs=0.05)
    assert rows["distload"]["storage_x"] < 1.5
    assert not os.path.ismount(tmp_path / "mnt")
