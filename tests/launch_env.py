"""Helpers for tests that start real launchers (mpiexec, torchrun, SLURM) as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

TESTS = Path(__file__).parent
CLI_CHECK = TESTS / "cli_check.py"
# Variables an outer launcher (say pytest under srun or torchrun) would leak into the children.
_LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_", "TORCHELASTIC_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_VARS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def venv_tool(name: str) -> str | None:
    """``name`` next to this Python (the venv's mpiexec/torchrun) or on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def free_port() -> int:
    """A port free right now; the launcher binds it moments later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_results(out_dir: Path, world: int) -> list[dict]:
    """Each rank's ``cli_check`` verdict, in rank order."""
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
