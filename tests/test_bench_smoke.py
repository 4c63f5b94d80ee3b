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


def _compare(tmp_path: Path, *args: str, pythonpath: str = "") -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.compare", "--quick", "--size", "smoke", "--world", "2",
           "--data", str(tmp_path / "data"), "--out", str(out), "--timeout", "240", "--no-gpu", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, str(REPO)]))))
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


# Imported first by every Python started with this folder on PYTHONPATH: fastsafetensors is not installed.
_HIDE_FASTSAFETENSORS = """
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fastsafetensors":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _Hide())
"""


def test_a_peer_that_is_not_installed_is_a_skipped_row_not_a_failure(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE_FASTSAFETENSORS)
    result = _compare(tmp_path, "--world", "1", "--mode", "replicated", "--loaders", "distload,fastsafetensors",
                      pythonpath=str(hide))  # exits 0: asserted in _compare
    rows = {r["loader"]: r for r in result["summary"]}
    assert rows["fastsafetensors"]["skipped"] == "fastsafetensors is not installed"
    assert rows["fastsafetensors"]["error"] is None and "seconds" not in rows["fastsafetensors"]
    assert rows["distload"]["error"] is None and rows["distload"]["seconds"] > 0
    table = (tmp_path / "out" / "compare_smoke.md").read_text()
    assert "skipped: fastsafetensors is not installed" in table and table.count("| fs | world |") == 1


def test_the_gpu_script_without_cuda_says_so_and_succeeds():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the benchmark")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu.sh: skipped: CUDA is not available here" in proc.stdout


def test_the_transformers_dtype_keyword_follows_its_version(monkeypatch):
    import transformers

    from benchmarks.loaders import hf_dtype_kw

    for version, kw in (("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.0.0.dev0", "dtype"), ("4.9.1", "torch_dtype")):
        monkeypatch.setattr(transformers, "__version__", version)
        assert hf_dtype_kw() == kw, version


def test_bare_pytest_from_the_repo_root_imports_that_checkouts_distload(tmp_path):
    import shutil

    root = tmp_path / "checkout"
    shutil.copytree(REPO / "distload", root / "distload", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "tests").mkdir()
    (root / "tests" / "test_where.py").write_text(
        "import distload, pathlib\n"
        "def test_where():\n"
        f"    assert pathlib.Path(distload.__file__).is_relative_to({str(root)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pytest_cmd = Path(sys.executable).parent / "pytest"  # the script: `python -m pytest` would put the cwd on the path
    if not pytest_cmd.exists():
        pytest.skip("no pytest script next to this Python")
    proc = subprocess.run([str(pytest_cmd), "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
                          cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
