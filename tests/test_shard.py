"""Pure checks of the slice math and the shard plan (no processes)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from distload.format.header import ShardFile, TensorEntry
from distload.plan.shard import Layout, Placement, Sharding, layout_of
from distload.plan.shard_plan import build_shard_plan, choose_policy
from distload.storage.mounts import is_local_storage

CASES = [  # (shape, mesh_shape, torch placements)
    ((13,), (4,), [Shard(0)]),
    ((7, 5), (3,), [Shard(0)]),
    ((5, 13), (3,), [Shard(1)]),
    ((2, 9), (4,), [Shard(0)]),  # more ranks than rows: empty pieces
    ((0, 4), (2,), [Shard(0)]),
    ((11, 3, 4), (2, 2), [Shard(0), Shard(2)]),
    ((11, 6), (2, 2), [Shard(0), Shard(0)]),
    ((11, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((13, 10), (2, 3), [_StridedShard(1, split_factor=3), Shard(1)]),
    ((9, 5), (2, 2), [Replicate(), Shard(0)]),
    ((7, 9), (2, 2), [Shard(1), Shard(0)]),
]


def _plain(p) -> Placement:
    if isinstance(p, _StridedShard):
        return Placement("strided", p.dim, p.split_factor)
    if isinstance(p, Shard):
        return Placement("shard", p.dim)
    return Placement("replicate")


def _dtensor_piece(full: torch.Tensor, mesh_shape, placements, coord) -> torch.Tensor:
    """What DTensor's own placement code gives mesh coordinate ``coord``, left to right."""
    t = full
    for mdim, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        shards, _ = p._split_tensor(t, mesh_shape[mdim], with_padding=False)
        t = shards[coord[mdim]]
    return t


def _gather(full: torch.Tensor, region) -> torch.Tensor:
    t = full
    for d, ranges in enumerate(region):
        index = torch.cat([torch.arange(a, b) for a, b in ranges] or [torch.zeros(0, dtype=torch.long)])
        t = t.index_select(d, index)
    return t


@pytest.mark.parametrize("shape,mesh_shape,placements", CASES)
def test_every_ranks_region_is_exactly_what_dtensor_gives_it(shape, mesh_shape, placements):
    full = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    world = int(torch.tensor(mesh_shape).prod())
    sharding = Sharding(tuple(range(world)), tuple(mesh_shape), tuple(_plain(p) for p in placements))
    layout = layout_of(shape, sharding, world)
    for rank, coord in enumerate(itertools.product(*(range(n) for n in mesh_shape))):
        want = _dtensor_piece(full, mesh_shape, placements, coord)
        assert layout.local_shape(rank) == tuple(want.shape)
        assert torch.equal(_gather(full, layout.regions[rank]), want), (rank, coord)


def _file(shapes: dict[str, tuple[int, ...]]) -> ShardFile:
    entries, pos = [], 0
    for name, shape in shapes.items():
        n = int(torch.tensor(shape).prod()) * 4
        entries.append(TensorEntry(name, "F32", shape, pos, pos + n))
        pos += n
    return ShardFile("a.safetensors", 100 + pos, 100, tuple(entries))


def _shard0(shape, world) -> Layout:
    return layout_of(shape, Sharding(tuple(range(world)), (world,), (Placement("shard", 0),)), world)


def _shard1(shape, world) -> Layout:
    return layout_of(shape, Sharding(tuple(range(world)), (world,), (Placement("shard", 1),)), world)


@pytest.mark.parametrize("bucket", [64, 256, 1 << 20])
def test_scatter_chunks_give_each_rank_every_local_byte_once_and_read_each_byte_once(bucket):
    world = 3
    layouts = {"w": _shard0((10, 7), world), "b": _shard0((5,), world), "c": _shard1((4, 11), world)}
    f = _file({"w": (10, 7), "b": (5,), "c": (4, 11)})
    sp = build_shard_plan((f,), (0,), layouts, world_size=world, bucket_bytes=bucket, read_policy="scatter")
    read = sorted((c.start, c.start + c.nbytes) for c in sp.scatters)
    assert read[0][0] == 100 and read[-1][1] == f.size and all(a[1] == b[0] for a, b in zip(read, read[1:]))
    for rank in range(world):
        for name, layout in layouts.items():
            covered = sorted((p.local_offset, p.local_offset + p.nbytes)
                             for c in sp.scatters for p in c.parts[rank] if p.name == name)
            total = layout.local_numel(rank) * 4
            assert sum(b - a for a, b in covered) == total
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    for c in sp.scatters:
        assert c.nbytes <= bucket or len(c.slabs) == 1  # one row may exceed a tiny bucket
        for parts in c.parts:  # a message is its parts back to back, no padding
            assert [p.seg_offset for p in parts] == [sum(q.nbytes for q in parts[:i]) for i in range(len(parts))]
            assert sum(p.nbytes for p in parts) <= c.recv_bound


def test_slice_reads_cover_each_ranks_rows_as_one_byte_range():
    world = 3
    layouts = {"w": _shard0((10, 7), world)}
    f = _file({"w": (10, 7)})
    sp = build_shard_plan((f,), (0,), layouts, world_size=world, bucket_bytes=1 << 20, read_policy="slice")
    assert sp.policies == {"w": "slice"} and not sp.scatters
    assert [(c.owner, c.start, c.nbytes) for c in sp.slices] == [(0, 100, 4 * 28), (1, 212, 4 * 28), (2, 324, 4 * 14)]


def test_shard1_is_scattered_even_when_slices_are_asked_for():
    assert choose_policy(_shard1((4, 11), 2), "slice", 4, True) == "scatter"
    assert choose_policy(_shard0((4, 11), 2), "slice", 4, True) == "slice"


def test_auto_slices_big_pieces_on_local_disks_and_scatters_on_network_filesystems():
    big = _shard0((1024, 1024), 2)  # 2 MiB per rank in F32
    assert choose_policy(big, "auto", 4, local_storage=True) == "slice"
    assert choose_policy(big, "auto", 4, local_storage=False) == "scatter"
    assert choose_policy(_shard0((16, 16), 2), "auto", 4, local_storage=True) == "scatter"


def test_auto_slices_a_small_piece_that_no_scatter_would_coalesce():
    # As transformers writes a layer: norms between big projections; two norms side by side at the end.
    world = 2
    shapes = {"a.norm": (64,), "a.proj": (1024, 1024), "b.norm": (64,), "c.norm": (64,), "d.proj": (1024, 1024)}
    layouts = {k: _shard0(v, world) for k, v in shapes.items()}
    f = _file(shapes)
    local = build_shard_plan((f,), (0,), layouts, world_size=world, bucket_bytes=1 << 20, read_policy="auto")
    assert local.policies == {"a.norm": "slice", "a.proj": "slice", "b.norm": "scatter", "c.norm": "scatter",
                              "d.proj": "slice"}
    assert [[s.name for s in c.slabs] for c in local.scatters] == [["b.norm", "c.norm"]]  # one collective
    network = build_shard_plan((f,), (0,), layouts, world_size=world, bucket_bytes=1 << 20, read_policy="auto",
                               local_storage=False)
    assert set(network.policies.values()) == {"scatter"}
    asked = build_shard_plan((f,), (0,), layouts, world_size=world, bucket_bytes=1 << 20, read_policy="scatter")
    assert set(asked.policies.values()) == {"scatter"}


def test_replicated_halves_of_a_2d_mesh_are_not_sliced_twice():
    hsdp = layout_of((8, 4), Sharding((0, 1, 2, 3), (2, 2), (Placement("replicate"), Placement("shard", 0))), 4)
    assert not hsdp.sliceable() and hsdp.replication == 2


def test_tmp_is_local_storage(tmp_path):
    assert is_local_storage(tmp_path)


def test_replicas_on_disjoint_submeshes_make_one_layout():
    """FSDP over "dp" in a 2x2 dp x tp job: ranks 0, 2 and ranks 1, 3 each hold the tensor on their own submesh."""
    import pickle

    from distload.plan.shard import Placement, Sharding, UnionRegions, layout_of

    shard0 = (Placement("shard", 0),)
    column0, column1 = Sharding((0, 2), (2,), shard0), Sharding((1, 3), (2,), shard0)
    layout = layout_of((6, 4), [column1, column0], 4)
    assert isinstance(layout.regions, UnionRegions)
    assert [layout.regions[r] for r in range(4)] == [(((0, 3),), ((0, 4),)), (((0, 3),), ((0, 4),)),
                                                     (((3, 6),), ((0, 4),)), (((3, 6),), ((0, 4),))]
    assert layout.holders == (0, 1, 2, 3) and layout.replication == 2 and not layout.replicated
    assert pickle.loads(pickle.dumps(layout)) == layout
    assert layout_of((6, 4), [column0, column0], 4) == layout_of((6, 4), column0, 4)  # one mesh, reported twice
    with pytest.raises(ValueError, match="two different meshes"):
        layout_of((6, 4), [column0, Sharding((0, 1), (2,), shard0)], 4)
