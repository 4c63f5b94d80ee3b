"""PeerGroup: collectives over part of a group as point-to-point sends, making no process group."""

from __future__ import annotations

import torch

import distload
from ckpt import read_all, write_sized
from dist import run_world
from distload.transport.comm import TorchComm


def _child_peer(rank, world):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    before = len(c10d._world.pg_map)
    comm = TorchComm(None, torch.device("cpu"), make_groups=False)
    sub = comm.subgroup((0, 2))
    if rank == 1:
        dist.barrier()
        return sub is None and len(c10d._world.pg_map) == before
    buf = torch.full((4,), rank, dtype=torch.uint8)
    sub.broadcast_(buf, 1)  # member 1 is rank 2
    seg = torch.empty(3, dtype=torch.uint8)
    send = torch.arange(6, dtype=torch.uint8) if sub.rank == 0 else None
    sub.scatter_(seg, 0, send)
    out = (buf.tolist(), seg.tolist(), sub.any_failed(rank == 2), sub.all_gather_object({"r": rank}),
           sub.broadcast_object("hello" if sub.rank == 0 else None, 0))
    assert len(c10d._world.pg_map) == before  # no group was made
    dist.barrier()
    return out


def test_peer_group_collectives_run_on_its_members_only():
    r0, r1, r2 = run_world(_child_peer, 3)
    assert r1 is True
    assert r0 == ([2] * 4, [0, 1, 2], True, [{"r": 0}, {"r": 2}], "hello")
    assert r2 == ([2] * 4, [3, 4, 5], True, [{"r": 0}, {"r": 2}], "hello")


def _child_stream(rank, world, path, wanted):
    import torch.distributed as dist

    control = dist.new_group(backend="gloo")  # an engine's own CPU group
    comm = TorchComm(None, torch.device("cpu"), control_group=control, make_groups=False)
    s = distload.TensorStream(comm, torch.device("cpu"), path, names=set(wanted[rank]), bucket_mb=0.01)
    return {n: t.clone() for n, t in s}


def test_a_stream_over_given_groups_moves_per_rank_tensors_point_to_point(tmp_path):
    path = write_sized(tmp_path / "c", [40, 24, 12])
    want = read_all(path)
    wanted = [["layer0.weight", "layer2.weight"], ["layer1.weight", "layer0.bias"], ["layer2.weight", "layer0.bias"]]
    for rank, got in enumerate(run_world(_child_stream, 3, path, wanted)):
        assert sorted(got) == sorted(wanted[rank])
        for k in got:
            assert torch.equal(got[k], want[k]), k
