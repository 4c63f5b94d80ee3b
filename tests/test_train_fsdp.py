"""launch/train_fsdp.py under torchrun: FSDP2 shards filled by distload, then real optimizer steps."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

from ckpt import write_llama
from launch_env import clean_env, venv_tool

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train_fsdp.py"


def test_training_entry_point_loads_sharded_and_takes_finite_steps_on_two_ranks(tmp_path):
    ckpt = write_llama(tmp_path / "llama", hidden=48)
    proc = subprocess.run(
        [venv_tool("torchrun"), "--standalone", "--nproc_per_node", "2", str(TRAIN), str(ckpt),
         "--device", "cpu", "--steps", "2", "--seq", "16", "--bucket-mb", "0.05"],
        env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world 2" in proc.stdout and "sharded tensors:" in proc.stdout, "distload filled DTensor shards"
    losses = [float(x) for x in re.findall(r"step \d+: loss ([-\d.naif]+)", proc.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), proc.stdout
