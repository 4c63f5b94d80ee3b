"""A stream over groups an engine gives: per-rank tensors move point to point, and no process group is made."""

from __future__ import annotations

import torch

import distload
from ckpt import read_all, write_sized
from dist import run_world
from distload.transport.comm import TorchComm


def _child_stream(rank, world, path, wanted):
    import torch.distributed as dist

    from torch.distributed import distributed_c10d as c10d

    control = dist.new_group(backend="gloo")  # an engine's own CPU group
    before = len(c10d._world.pg_map)
    comm = TorchComm(None, torch.device("cpu"), control_group=control)
    s = distload.TensorStream(comm, torch.device("cpu"), path, names=set(wanted[rank]), bucket_mb=0.01)
    got = {n: t.clone() for n, t in s}
    assert len(c10d._world.pg_map) == before, "the stream made a process group"
    return got


def test_a_stream_over_given_groups_moves_per_rank_tensors_point_to_point(tmp_path):
    path = write_sized(tmp_path / "c", [40, 24, 12])
    want = read_all(path)
    wanted = [["layer0.weight", "layer2.weight"], ["layer1.weight", "layer0.bias"], ["layer2.weight", "layer0.bias"]]
    for rank, got in enumerate(run_world(_child_stream, 3, path, wanted)):
        assert sorted(got) == sorted(wanted[rank])
        for k in got:
            assert torch.equal(got[k], want[k]), k
