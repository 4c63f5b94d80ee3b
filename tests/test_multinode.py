"""Two torchrun agents on one machine emulate two nodes (``--nnodes 2``, c10d rendezvous
on 127.0.0.1, 2 ranks each). The plan must treat them as two nodes and spread
the files over both, and every rank must hold the checkpoint bit for bit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ckpt import write_synthetic
from launch_env import CLI_CHECK, clean_env, free_port, rank_results, venv_tool


def _agents(ckpt: Path, out: Path) -> list[subprocess.CompletedProcess]:
    torchrun = venv_tool("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to this Python or on PATH")
    out.mkdir(parents=True, exist_ok=True)
    port, run_id = free_port(), f"distload-{out.name}-{free_port()}"
    procs = []
    for node in (0, 1):
        cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
               # Both agents run on this host: say which one serves the rendezvous store.
               "--rdzv_conf", f"is_host={int(node == 0)}",
               str(CLI_CHECK), str(out), str(ckpt), "--bucket-mb", "0.01", "--report", str(out / "report.json")]
        procs.append(subprocess.Popen(cmd, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    done = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=100)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_two_torchrun_agents_spread_files_over_both_nodes_and_load_bit_for_bit(tmp_path):
    ckpt = write_synthetic(tmp_path / "ckpt", n_files=4)
    out = tmp_path / "out"
    for agent in _agents(ckpt, out):
        assert agent.returncode == 0, agent.stdout
    for res in rank_results(out, 4):
        assert res["rc"] == 0 and res["mismatches"] == [] and res["checked"] == 10, res

    report = json.loads((out / "report.json").read_text())
    nodes = {r["rank"]: r["node"] for r in report["ranks"]}
    assert len(set(nodes.values())) == 2, f"the two agents must be two nodes: {nodes}"
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3], "torchrun puts 2 consecutive ranks on each node"
    assert sorted(r["local_rank"] for r in report["ranks"]) == [0, 0, 1, 1]
    files_by_node: dict[str, list[str]] = {}
    for r in report["ranks"]:
        files_by_node.setdefault(r["node"], []).extend(r["files"])
    assert all(files_by_node[n] for n in set(nodes.values())), f"every node reads: {files_by_node}"
    assert sorted(f for fs in files_by_node.values() for f in fs) == sorted(
        p.name for p in ckpt.glob("*.safetensors")), "each file is read exactly once"
