"""The CUDA path's logic that needs no GPU: device choice, thread set-up, bounded waits, the control group,
status exchanges read a window late, the gloo interface. ``tests/test_cuda_stage.py`` runs the GPU side."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

import distload
import distload.io.reader
from ckpt import write_synthetic
from dist import run_world
from distload.io.reader import BufferPool, ChunkReader, open_verified
from distload.io.stage import wait_event
from distload.plan.items import RankInfo
from distload.plan.load_plan import build_plan
from distload.plan.schedule import BROADCAST, SLICE, Step
from distload.format.header import read_checkpoint
from distload.transfer.loop import spread_slices
from distload.transport import bootstrap, netif
from distload.transport.comm import CONTROL_FRACTION, Comm, broken_error, control_timeout

# ---- which GPU a rank takes ----------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has CUDA with ``n`` GPUs (no group bound to a device)."""

    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(bootstrap, "bound_device", lambda: None)

    return have


def test_cuda_is_the_local_ranks_gpu(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 5)


def test_a_local_rank_without_a_gpu_of_its_own_is_refused_not_wrapped(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(distload.DistLoadError,
                       match=r"^device 'cuda': 4 ranks .* sees 2 GPU\(s\).*local rank 3 has no GPU.*at most 2"):
        bootstrap.resolve_device("cuda")


def test_every_rank_of_a_node_with_too_few_gpus_refuses_not_only_the_last(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(distload.DistLoadError, match=r"4 ranks .* 2 GPU\(s\).*local rank 2 has no GPU"):
        bootstrap.resolve_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 0)


def test_a_launcher_that_gives_each_rank_one_gpu_means_cuda_0(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "6")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")  # srun --gpus-per-task=1
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 0)


def test_slurm_local_id_picks_the_gpu_without_torchrun(gpus, monkeypatch):
    gpus(4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 2)


def test_without_a_launcher_cuda_is_the_current_device(gpus, monkeypatch):
    gpus(4)
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 3)


def test_a_group_bound_to_a_gpu_decides_cuda_and_refuses_another(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(bootstrap, "bound_device", lambda: torch.device("cuda", 4))
    assert bootstrap.resolve_device("cuda") == torch.device("cuda", 4)
    assert bootstrap.resolve_device("cuda:4") == torch.device("cuda", 4)
    with pytest.raises(distload.DistLoadError, match=r"bound to cuda:4.*device='cuda'"):
        bootstrap.resolve_device("cuda:1")


def test_a_gpu_index_past_the_machines_is_refused(gpus):
    gpus(2)
    with pytest.raises(distload.DistLoadError, match=r"does not exist.*2 GPU\(s\), cuda:0 to cuda:1"):
        bootstrap.resolve_device("cuda:2")


# ---- reader threads: the rank's device, bounded waits ------------------------------------------------

@pytest.fixture
def small(tmp_path):
    path = write_synthetic(tmp_path / "ck", n_files=2)
    plan = build_plan(read_checkpoint(path), [RankInfo(0, "h", 0)], bucket_mb=0.01)
    sources = {i: open_verified(plan, i) for i in range(len(plan.files))}
    yield plan, sources
    for src in sources.values():
        src.close()


def test_every_reader_thread_makes_the_ranks_gpu_current(small, monkeypatch):
    plan, fds = small
    seen: dict[str, torch.device] = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.__setitem__(threading.current_thread().name, d))
    chunks = [c for c in plan.chunks if c.nbytes]
    pool = BufferPool(2, plan.bucket_bytes, torch.device("cpu"))
    reader = ChunkReader(plan, fds, chunks, pool, lambda c: None, io_threads=3, device=torch.device("cuda", 5))
    try:
        for _ in chunks:
            _, buf, pooled, err = reader.next()
            assert err is None
            pool.release(buf)
    finally:
        reader.close()
    assert set(seen) == {"distload-reader", "distload-io-0", "distload-io-1", "distload-io-2"}
    assert set(seen.values()) == {torch.device("cuda", 5)}


def test_a_cpu_reader_leaves_the_cuda_device_alone(small, monkeypatch):
    plan, fds = small
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device on a CPU load"))
    chunks = [c for c in plan.chunks if c.nbytes][:2]
    pool = BufferPool(2, plan.bucket_bytes, torch.device("cpu"))
    reader = ChunkReader(plan, fds, chunks, pool, lambda c: None, io_threads=2, device=torch.device("cpu"))
    try:
        for _ in chunks:
            assert reader.next()[3] is None
    finally:
        reader.close()


def test_a_read_that_never_finishes_is_a_timeout_error_within_the_bound(small, monkeypatch):
    plan, fds = small
    stuck = threading.Event()
    monkeypatch.setattr(distload.io.reader, "read_exact", lambda *a: stuck.wait(30))
    chunks = [c for c in plan.chunks if c.nbytes][:1]
    pool = BufferPool(2, plan.bucket_bytes, torch.device("cpu"))
    reader = ChunkReader(plan, fds, chunks, pool, lambda c: None, io_threads=1)
    t0 = time.monotonic()
    try:
        _, buf, _, err = reader.next(timeout_s=0.3)
        assert isinstance(err, TimeoutError) and "no data from this rank's reader within 0.3 s" in str(err)
        assert buf is None and time.monotonic() - t0 < 5
    finally:
        stuck.set()
        reader.close()


class _NeverDone:
    def query(self) -> bool:
        return False


def test_waiting_on_a_gpu_event_is_bounded_and_can_be_stopped():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="copy did not finish within 0.2 s: timed out"):
        wait_event(_NeverDone(), 0.2, "copy did not finish")  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 3
    stop = threading.Event()
    stop.set()
    assert wait_event(_NeverDone(), None, "never", stop) is False  # type: ignore[arg-type]


# ---- the transfer loop's order on CUDA ----------------------------------------------------------------

def test_own_slices_spread_between_collectives_that_keep_their_order():
    coll = [Step(BROADCAST, object()) for _ in range(4)]  # type: ignore[arg-type]
    own = [Step(SLICE, object()) for _ in range(6)]  # type: ignore[arg-type]
    out = spread_slices(tuple(coll + own))
    assert [s for s in out if s.kind != SLICE] == coll and [s for s in out if s.kind == SLICE] == own
    assert out[0] is coll[0] and out[-1] is own[-1]
    gaps = [sum(1 for s in out[out.index(a) + 1 : out.index(b)] if s.kind == SLICE) for a, b in zip(coll, coll[1:])]
    assert gaps == [1, 2, 1], "slices are spread out, not all after the last collective"
    assert spread_slices(tuple(own)) == tuple(own) and spread_slices(tuple(coll)) == tuple(coll)


# ---- timeouts and aborts -------------------------------------------------------------------------------

def test_distloads_waits_on_nccl_end_well_inside_ncclss_timeout():
    assert control_timeout(300) == pytest.approx(300 * CONTROL_FRACTION) and control_timeout(300) < 300
    assert control_timeout(600) < 600 and control_timeout(0.5) >= 1.0


class _Aborting(Comm):
    rank, world_size, device = 0, 2, torch.device("cpu")

    def __init__(self):
        self.aborted = 0

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, src=0):
        return obj

    def broadcast_(self, buf, src):
        return None

    def gather_(self, buf, dst=0):
        return buf.clone()

    def any_failed(self, failed):
        return failed

    def exchange_(self, sends, recvs):
        return None

    def abort(self):
        self.aborted += 1


def test_a_broken_collective_aborts_the_transport_before_the_error_is_raised():
    comm = _Aborting()
    err = broken_error(comm, "distload", "transfer", "t", RuntimeError("NCCL communicator was aborted"))
    assert comm.aborted == 1 and isinstance(err, distload.DistLoadError) and err.phase == "transfer"


# ---- the control group and status exchanges over real processes ---------------------------------------

def _control_on_nccl_like_comm(rank: int, world: int) -> dict:
    """A TorchComm whose data device is CUDA (never touched here): control messages take the side group."""
    import torch.distributed as dist

    from benchmarks.gloo_sockets import sockets
    from distload.transport.comm import TorchComm, nccl_timeout

    comm = TorchComm(None, torch.device("cuda"), timeout_s=50.0)
    before = sockets()
    side = comm._ctl()
    made = sockets() - before
    gathered = comm.all_gather_object({"r": rank})
    got = comm.broadcast_object("plan" if rank == 1 else None, src=1)
    none_failed = comm.any_failed(False)
    one_failed = comm.any_failed(rank == world - 1)
    try:
        comm.agree("open", OSError("disk gone") if rank == 0 else None)
        agreed = None
    except distload.DistLoadError as e:
        agreed = sorted(e.failures)
    return {"side_is_gloo": dist.get_backend(side) == "gloo" and side is not None, "same": comm._ctl() is side,
            "wait_s": comm.wait_s, "group_timeout": nccl_timeout(None), "made_sockets": made, "gathered": gathered, "got": got,
            "none_failed": none_failed, "one_failed": one_failed, "agreed": agreed}


def test_control_messages_on_nccl_travel_over_a_lazily_connected_gloo_side_group():
    results = run_world(_control_on_nccl_like_comm, 4, timeout=150)
    for r, res in enumerate(results):
        assert res["side_is_gloo"] and res["same"], res
        assert res["wait_s"] == pytest.approx(CONTROL_FRACTION * res["group_timeout"]), "inside the group's timeout"
        assert res["made_sockets"] <= 2, f"rank {r}: the side group connected eagerly ({res['made_sockets']} sockets)"
        assert res["gathered"] == [{"r": i} for i in range(4)] and res["got"] == "plan"
        assert res["none_failed"] is False and res["one_failed"] is True
        assert res["agreed"] == [0]


def _lagged_read_failure(rank: int, world: int, path: str, bad_rank: int) -> dict:
    """Load with every status read a window late (as on CUDA); ``bad_rank``'s 2nd read fails."""
    import distload.transfer.loop

    distload.transfer.loop.STATUS_LAG = {"cpu": 1, "cuda": 1}
    if rank == bad_rank:
        real, calls = distload.io.reader.read_exact, [0]

        def failing(fd, buf, offset, name):
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return real(fd, buf, offset, name)

        distload.io.reader.read_exact = failing
    try:
        distload.load_state_dict(path, bucket_mb=0.002, io_threads=1)
        return {"kind": "ok"}
    except distload.DistLoadError as e:
        return {"kind": "DistLoadError", "phase": e.phase, "failures": sorted(e.failures), "message": str(e)}


@pytest.mark.parametrize("world,bad_rank", [(2, 1), (4, 0)])
def test_statuses_read_a_window_late_still_fail_every_rank_with_one_error(tmp_path, world, bad_rank):
    path = write_synthetic(tmp_path / "ck", n_files=world)
    results = run_world(_lagged_read_failure, world, str(path), bad_rank, timeout=150)
    assert all(r["kind"] == "DistLoadError" and r["phase"] == "transfer" for r in results), results
    assert all(r["failures"] == [bad_rank] for r in results)
    assert len({r["message"] for r in results}) == 1 and "injected" in results[0]["message"]


def _lagged_load(rank: int, world: int, path: str) -> dict:
    import distload.transfer.loop

    distload.transfer.loop.STATUS_LAG = {"cpu": 1, "cuda": 1}
    return distload.load_state_dict(path, bucket_mb=0.002)


def test_statuses_read_a_window_late_load_bit_for_bit(tmp_path):
    from ckpt import read_all

    path = write_synthetic(tmp_path / "ck", n_files=3)
    want = read_all(path)
    for got in run_world(_lagged_load, 3, str(path), timeout=150):
        assert all(torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in want.items())


# ---- the interface gloo binds on several nodes -------------------------------------------------------

IFACES = {"lo": "127.0.0.1", "docker0": "172.17.0.1", "eno1": "10.0.0.5", "ib0": "192.168.10.5"}
TWO_NODES = {"GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_single_node_job_leaves_gloo_alone():
    assert netif.gloo_interface({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "NCCL_SOCKET_IFNAME": "ib"},
                                IFACES) is None


def test_gloo_socket_ifname_wins():
    assert netif.gloo_interface({**TWO_NODES, "GLOO_SOCKET_IFNAME": "eth9"}, IFACES) is None


@pytest.mark.parametrize("spec,want", [("ib", "ib0"), ("=eno1", "eno1"), ("^lo,docker", "eno1"),
                                       ("eth,ib", "ib0"), ("^=lo,docker0", "eno1"), ("nothere", None)])
def test_ncclss_interface_choice_is_read_in_ncclss_syntax(spec, want):
    assert netif.gloo_interface({**TWO_NODES, "NCCL_SOCKET_IFNAME": spec}, IFACES) == want


def test_without_nccls_choice_gloo_takes_the_interface_that_routes_to_the_master(monkeypatch):
    monkeypatch.setattr(netif, "_route_source", lambda host, port: "10.0.0.5" if host == "10.0.0.1" else None)
    assert netif.gloo_interface(TWO_NODES, IFACES) == "eno1"


def test_on_the_master_whose_name_resolves_to_loopback_gloo_takes_the_default_route(monkeypatch):
    monkeypatch.setattr(netif, "_route_source", lambda host, port: "127.0.1.1" if host == "node0" else "10.0.0.5")
    assert netif.gloo_interface({**TWO_NODES, "MASTER_ADDR": "node0"}, IFACES) == "eno1"


@pytest.mark.parametrize("env,multi", [({"GROUP_WORLD_SIZE": "2"}, True), ({"SLURM_NNODES": "4"}, True),
                                       ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, True),
                                       ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, False),
                                       ({}, False)])
def test_the_launcher_says_whether_a_job_spans_nodes(env, multi):
    assert netif.multi_node(env) is multi


def test_this_hosts_interfaces_include_loopback():
    assert netif.ipv4_interfaces().get("lo") == "127.0.0.1"


def test_a_two_node_emulation_on_one_host_binds_gloo_to_loopback():
    env = {"GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert netif.gloo_interface(env) == "lo"


def test_the_gloo_environment_is_set_only_while_a_group_is_made():
    env = {**TWO_NODES, "NCCL_SOCKET_IFNAME": "lo"}
    with netif.gloo_group_env(env) as changes:
        assert env["TORCH_GLOO_LAZY_INIT"] == "1" and env["GLOO_SOCKET_IFNAME"] == "lo"
        assert changes == {"TORCH_GLOO_LAZY_INIT": "1", "GLOO_SOCKET_IFNAME": "lo"}
    assert "TORCH_GLOO_LAZY_INIT" not in env and "GLOO_SOCKET_IFNAME" not in env
    mine = {**TWO_NODES, "TORCH_GLOO_LAZY_INIT": "0", "GLOO_SOCKET_IFNAME": "eth3"}
    with netif.gloo_group_env(mine) as changes:
        assert changes == {} and mine["TORCH_GLOO_LAZY_INIT"] == "0" and mine["GLOO_SOCKET_IFNAME"] == "eth3"
