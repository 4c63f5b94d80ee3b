"""Exit status 0 every time: the CLI (FSDP2 and replicated) and a load-train-destroy library script.

``--mode fsdp`` used to exit with SIGABRT ("terminate called without an
active exception") now and then after a successful load: the gloo process
group outlived ``destroy_process_group`` (DTensor's caches and objects built
with the group up held it) and was torn down with the interpreter. Each job
here runs its 2 ranks as plain processes (no torchrun agent, so more jobs
fit) and requires every exit status to be 0; for the CLI it also requires
that no gloo thread is alive when teardown begins, which is the cause itself,
not only its occasional symptom.

``DISTLOAD_EXIT_RUNS`` sets the jobs per kind (default 4; the issue's check is 20).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from exit_check import write_checkpoint  # noqa: E402

RUNS = int(os.environ.get("DISTLOAD_EXIT_RUNS", "4"))
PARALLEL = 2  # jobs at once (4 processes)
JOBS = {
    "fsdp": ["cli", "--model", "exit_check:build", "--mode", "fsdp"],
    "replicated": ["cli", "--model", "exit_check:build"],
    "train": ["train"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, ckpt: Path, kind: str, job: int) -> list[tuple[subprocess.Popen, Path]]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        out = tmp / f"{kind}-{job}-{rank}.json"
        mode, *rest = JOBS[kind]
        cmd = [sys.executable, str(HERE / "exit_check.py"), str(out), mode, str(ckpt), *rest]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                      out))
    return procs


def test_every_run_of_the_cli_and_a_training_script_exits_0_with_no_process_group_left(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(str(ckpt))
    todo = [(kind, job) for job in range(RUNS) for kind in JOBS]
    running: list[tuple[str, int, list[tuple[subprocess.Popen, Path]]]] = []
    failures = []
    t0 = time.monotonic()
    while todo or running:
        while todo and len(running) < PARALLEL:
            kind, job = todo.pop(0)
            running.append((kind, job, _start(tmp_path, ckpt, kind, job)))
        kind, job, procs = running.pop(0)
        for rank, (proc, out) in enumerate(procs):
            _, err = proc.communicate(timeout=300)
            threads = json.loads(out.read_text()) if out.exists() else None
            gloo = [t for t in threads or [] if "gloo" in t or "tcpstore" in t]
            # The CLI must leave no group behind. A training script's group can still be held by
            # torch internals after destroy_process_group (autograd/optimizer state): there the
            # exit status is what is required.
            if proc.returncode != 0 or threads is None or (gloo and kind != "train"):
                failures.append(f"{kind} job {job} rank {rank}: exit {proc.returncode}, threads at exit "
                                f"{threads}: {err.strip()[-600:]}")
    seconds = time.monotonic() - t0
    print(f"{RUNS} job(s) x {len(JOBS)} kinds in {seconds:.1f} s")
    assert not failures, "\n".join(failures)
