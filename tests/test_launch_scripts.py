"""The launch/ and slurm/ scripts: valid bash, with a usable --help and documented parameters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = ["torchrun_local.sh", "torchrun_multinode.sh", "mpiexec.sh", "dry_run.sh"]
SBATCH = ["load.sbatch", "load_cpu.sbatch", "train_fsdp.sbatch"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launch_script_prints_usage_with_help(script):
    out = subprocess.run([str(REPO / "launch" / script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: launch/{script}"), out.stderr


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launch_script_without_a_checkpoint_shows_usage_and_fails(script):
    out = subprocess.run([str(REPO / "launch" / script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_script_is_valid_bash_and_documents_its_parameters(script):
    path = REPO / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    text = path.read_text()
    assert "#SBATCH --nodes=" in text and "CKPT" in text.split("#SBATCH")[0], "parameters documented at the top"

