"""Launcher environments -> rank, world size, local rank and rendezvous (no processes started)."""

from __future__ import annotations

import pytest

from distload import DistLoadError
from distload.transport import bootstrap
from distload.transport.bootstrap import LaunchEnv, detect_launch, first_host, node_key, slurm_port

# What `srun -N2 -n8` exports to task 5 (the second node's second task).
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
}


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch):
    """Keep tests independent of an installed SLURM: hostnames come from the built-in parser."""
    monkeypatch.setattr(bootstrap, "slurm_master", first_host)


def test_no_launcher_means_a_single_process():
    assert detect_launch({"HOME": "/root", "PATH": "/usr/bin"}) is None


def test_torchrun_environment_is_read_as_is():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert detect_launch(env) == LaunchEnv("torchrun", 3, 4, 1, "node0", 29500)


def test_torchrun_without_master_port_is_a_clear_error():
    with pytest.raises(DistLoadError, match="MASTER_PORT not set"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node0"})


def test_world_size_without_rank_is_a_clear_error():
    with pytest.raises(DistLoadError, match="RANK"):
        detect_launch({"WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "1"})


def test_a_lone_world_size_of_one_is_a_single_process():
    assert detect_launch({"WORLD_SIZE": "1"}) is None


def test_torchrun_inside_srun_wins_over_slurm():
    env = dict(SLURM_TASK, RANK="6", WORLD_SIZE="16", LOCAL_RANK="2", MASTER_ADDR="gpu007", MASTER_PORT="15000")
    assert detect_launch(env) == LaunchEnv("torchrun", 6, 16, 2, "gpu007", 15000)


def test_srun_task_uses_procid_ntasks_localid_and_the_first_node():
    assert detect_launch(SLURM_TASK) == LaunchEnv("slurm", 5, 8, 1, "gpu007", slurm_port(4242, 0))


def test_slurm_port_is_derived_from_the_job_and_step_ids():
    assert slurm_port(4242, 0) == slurm_port(4242, 0) != slurm_port(4243, 0)
    assert all(1024 < slurm_port(j, s) < 32768 for j in (0, 1, 19999, 20000, 10**9 + 7) for s in (0, 1, 7, 10**6))


def test_slurm_master_can_be_overridden():
    env = dict(SLURM_TASK, MASTER_ADDR="10.0.0.9", MASTER_PORT="23456")
    assert detect_launch(env) == LaunchEnv("slurm", 5, 8, 1, "10.0.0.9", 23456)


def test_step_task_count_wins_over_the_job_task_count():
    env = dict(SLURM_TASK, SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="8")
    assert detect_launch(env).world_size == 8


def test_sbatch_batch_script_is_not_a_multi_process_launch():
    env = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"}
    assert detect_launch(env) is None


def test_srun_without_task_count_is_a_clear_error():
    env = {k: v for k, v in SLURM_TASK.items() if k not in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")}
    with pytest.raises(DistLoadError, match="SLURM_NTASKS"):
        detect_launch(env)


def test_srun_without_node_list_is_a_clear_error():
    env = {k: v for k, v in SLURM_TASK.items() if not k.endswith("NODELIST")}
    with pytest.raises(DistLoadError, match="SLURM_JOB_NODELIST"):
        detect_launch(env)


def test_srun_with_a_garbled_rank_is_a_clear_error():
    with pytest.raises(DistLoadError, match="SLURM_PROCID"):
        detect_launch(dict(SLURM_TASK, SLURM_PROCID="x"))


def test_rank_outside_the_world_is_a_clear_error():
    with pytest.raises(DistLoadError, match="outside world size"):
        detect_launch(dict(SLURM_TASK, SLURM_PROCID="8"))


def test_open_mpi_environment():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert detect_launch(env) == LaunchEnv("mpi", 2, 3, 0, None, None)


def test_mpich_hydra_environment():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "7"}
    assert detect_launch(env) == LaunchEnv("mpi", 1, 2, 1, None, None)


def test_mpi_takes_a_preset_master_instead_of_asking_mpi4py():
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "head", "MASTER_PORT": "24000"}
    assert detect_launch(env) == LaunchEnv("mpi", 0, 2, 0, "head", 24000)


def test_mpi_rank_without_size_is_a_clear_error():
    with pytest.raises(DistLoadError, match="PMI_SIZE"):
        detect_launch({"PMI_RANK": "0"})


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"),
    ("node1,node2", "node1"),
    ("gpu[007-008]", "gpu007"),
    ("gpu[3,5-9],login1", "gpu3"),
    ("rack[2-3]-gpu[01-04]", "rack2-gpu01"),
    ("a[10-12]b", "a10b"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_node_key_separates_torchrun_agents_on_one_host():
    a, b = node_key({"GROUP_RANK": "0"}), node_key({"GROUP_RANK": "1"})
    assert a != b and a.split("/")[0] == b.split("/")[0]


def test_node_key_is_the_hostname_without_a_node_rank():
    import socket

    assert node_key({}) == socket.gethostname()


def test_init_distributed_exports_a_torchrun_style_environment(monkeypatch):
    """The SLURM path hands torch.distributed an env:// rendezvous; its arguments are checked here."""
    import torch.distributed as dist

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    for k in list(bootstrap.os.environ) + list(exported):
        if k.startswith(("SLURM_", "PMI_", "OMPI_")) or k in exported:
            monkeypatch.setenv(k, "")  # records the original (even absence) for the undo
            monkeypatch.delenv(k)
    for k, v in SLURM_TASK.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    assert bootstrap.init_distributed("cpu") is True
    assert seen["backend"] == "gloo" and seen["init_method"] == "env://"
    assert (seen["rank"], seen["world_size"]) == (5, 8)
    env = bootstrap.os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu007", str(slurm_port(4242, 0)))


def test_unknown_transport_is_a_clear_error():
    import torch

    with pytest.raises(DistLoadError, match="comm must be one of"):
        bootstrap.make_comm(torch.device("cpu"), kind="nccl2")


def test_ranks_on_one_host_with_two_node_keys_are_planned_as_two_nodes(tmp_path):
    """The multi-node emulation: same hostname, two torchrun agents -> files on both 'nodes'."""
    from ckpt import write_synthetic
    from distload.format.header import read_checkpoint
    from distload.plan.load_plan import build_plan
    from distload.plan.items import RankInfo

    ckpt = read_checkpoint(write_synthetic(tmp_path / "c", n_files=4))
    ranks = [RankInfo(r, "vm", r % 2, node=f"vm/{r // 2}") for r in range(4)]
    plan = build_plan(ckpt, ranks)
    node_of = {r.rank: r.node for r in ranks}
    assert {node_of[o] for o in plan.owners} == {"vm/0", "vm/1"}
    assert "on vm/1" in plan.describe() and "(node vm/0, local rank 1)" in plan.describe()


def test_without_node_keys_ranks_on_one_host_form_one_node(tmp_path):
    from ckpt import write_synthetic
    from distload.format.header import read_checkpoint
    from distload.plan.load_plan import assign_files
    from distload.plan.items import RankInfo

    ckpt = read_checkpoint(write_synthetic(tmp_path / "c", n_files=4))
    one_host = assign_files(ckpt.files, [RankInfo(r, "vm", r) for r in range(4)])
    two_hosts = assign_files(ckpt.files, [RankInfo(r, f"h{r // 2}", r % 2) for r in range(4)])
    assert one_host == assign_files(ckpt.files, [RankInfo(r, "vm", r, node="vm") for r in range(4)])
    assert {o // 2 for o in two_hosts} == {0, 1}
