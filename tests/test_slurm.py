"""A real one-node SLURM on localhost runs slurm/load_cpu.sbatch against a small checkpoint.

The test starts Debian's munged, slurmctld and slurmd itself (as root, from a
generated slurm.conf in tmp_path, on free ports) and stops them by pid. It
skips with the reason when SLURM is not installed or cannot start. Only this
one test starts SLURM, and everything it writes is under its own tmp_path, so
it runs side by side with the rest of the suite under ``pytest -n auto``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt import write_synthetic
from launch_env import CLI_CHECK, clean_env, free_port, rank_results

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SBATCH_CPU = REPO / "slurm" / "load_cpu.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel")


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin")
                                       if (p := Path(d) / name).exists()), None)


class LocalSlurm:
    """munged + slurmctld + slurmd for this host, with all state under ``root``."""

    def __init__(self, root: Path):
        self.root, self.host = root, socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.env = clean_env(SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        (r / "munge").chmod(0o755)  # munged wants its socket's directory searchable
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text("\n".join([
            "ClusterName=distloadtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/sock",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self) -> None:
        """munged, then slurmctld, then slurmd, each in the foreground so its pid is ours."""
        r = self.root
        self._spawn("munged", [_tool("munged"), "-F", "--force", f"--socket={r}/munge/sock",
                               f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
                               f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/seed"])
        self._wait(lambda: (r / "munge" / "sock").exists(), "munged socket", 20)
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0 and "UP" in self._run("scontrol", "ping").stdout,
                   "slurmctld to answer scontrol ping", 30)
        self._spawn("slurmd", [_tool("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self._node_idle, f"node {self.host} to become idle", 40)

    def _spawn(self, name: str, cmd: list) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen([str(c) for c in cmd], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _run(self, tool: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([_tool(tool) or tool, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def _node_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
        return bool(out) and out[0].startswith("idle")

    def _wait(self, ready, what: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited early; logs:\n{self.logs()}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}; logs:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())

    def sbatch(self, script: Path, *args: str, env: dict[str, str], timeout: float) -> tuple[str, str]:
        """Submit ``script`` and wait for the job; returns its final state and exit code.

        Polls ``scontrol`` every half second (``sbatch --wait`` polls every ten).
        """
        sub = subprocess.run([_tool("sbatch"), "--parsable", *args, str(script)], env={**self.env, **env},
                             capture_output=True, text=True, timeout=30, cwd=self.root)
        if sub.returncode != 0:
            return "SUBMIT_FAILED", sub.stderr
        job_id = sub.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = dict(kv.split("=", 1) for kv in self._run("scontrol", "-o", "show", "job", job_id).stdout.split()
                        if "=" in kv)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info["JobState"], info.get("ExitCode", "")
            time.sleep(0.5)
        self._run("scancel", job_id)
        return "TEST_TIMEOUT", ""

    def stop(self) -> None:
        """slurmd, slurmctld, munged: SIGTERM each by pid, SIGKILL what lingers."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (SlurmUser=root)")
    missing = [t for t in DAEMONS + CLIENTS if _tool(t) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}); "
                    "apt-get install munge slurmctld slurmd slurm-client")
    # A short path: slurmd and munged keep unix sockets in here (108-byte limit).
    root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    cluster = LocalSlurm(root)
    cluster.write_config()
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        pytest.skip(f"SLURM could not start here: {str(e)[:3000]}")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_cpu_sbatch_script_loads_a_checkpoint_on_two_slurm_tasks(slurm, tmp_path):
    ckpt = write_synthetic(tmp_path / "ckpt", n_files=4)
    out = tmp_path / "out"
    out.mkdir()
    report = out / "report.json"
    state, code = slurm.sbatch(
        SBATCH_CPU, "--output", str(out / "job.out"),
        env={"CKPT": str(ckpt), "PYTHON": sys.executable, "REPORT": str(report), "BUCKET_MB": "0.01",
             # The real CLI (distload.load.main), followed by a bit-for-bit check on every rank.
             "ENTRY": f"{CLI_CHECK} {out}", "PYTHONPATH": str(CLI_CHECK.parent)},
        timeout=100)
    job_log = (out / "job.out").read_text() if (out / "job.out").exists() else "(no job output)"
    assert (state, code) == ("COMPLETED", "0:0"), f"job {state} {code}\njob output:\n{job_log}\n{slurm.logs()}"

    for res in rank_results(out, 2):
        assert res["rc"] == 0 and res["mismatches"] == [] and res["checked"] == 10, res
    rep = json.loads(report.read_text())
    assert rep["world_size"] == 2
    assert sorted(r["local_rank"] for r in rep["ranks"]) == [0, 1], "SLURM_LOCALID became the local rank"
    assert sorted(f for r in rep["ranks"] for f in r["files"]) == sorted(
        p.name for p in ckpt.glob("*.safetensors")), "each file read once, by one of the two tasks"
    assert "world 2" in job_log
