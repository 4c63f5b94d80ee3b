"""Pure checks of where gathered conversions run and how their sources get there (no processes)."""

from __future__ import annotations

import pickle

from distload.format.header import ShardFile, TensorEntry
from distload.plan.keys import GatheredOp
from distload.plan.op_plan import choose_op_ranks, op_batches
from distload.plan.load_plan import LoadPlan
from distload.plan.schedule import SCATTER, SLICE, schedule


def _file(name: str, tensors: list[tuple[str, int]]) -> ShardFile:
    entries, at = [], 0
    for key, n in tensors:
        entries.append(TensorEntry(key, "F32", (n // 4,), at, at + n))
        at += n
    return ShardFile(name, 8 + at, 8, tuple(entries))


def _op(layer: str, *sources: str) -> GatheredOp:
    return GatheredOp("Chunk(dim=0)", layer, None, (("p", sources),), (layer,))


FILES = (_file("a.safetensors", [("x", 400), ("y", 40)]), _file("b.safetensors", [("z", 80), ("w", 80)]))
OWNERS = (0, 1)


def test_the_op_rank_owns_most_of_the_sources_bytes():
    assert choose_op_ranks([_op("t1", "x", "z"), _op("t2", "y", "z")], FILES, OWNERS) == (0, 1)


def test_ties_go_to_the_rank_with_fewer_op_bytes():
    ops = [_op("t1", "y", "w"), _op("t2", "y", "w"), _op("t3", "y", "w")]  # 40 bytes on rank 0, 80 on rank 1
    assert choose_op_ranks(ops, FILES, OWNERS) == (1, 1, 1)
    even = (_file("a.safetensors", [("x", 40)]), _file("b.safetensors", [("z", 40)]))
    assert choose_op_ranks([_op("t1", "x", "z"), _op("t2", "x", "z"), _op("t3", "x", "z")], even, OWNERS) == (0, 1, 0)


def _plan(world: int, op_ranks: tuple[int, ...], bucket: int = 1 << 20) -> LoadPlan:
    return LoadPlan("/ckpt", world, FILES, OWNERS, bucket, op_ranks=op_ranks)


def test_sources_move_to_the_op_rank_only():
    ops = [_op("t1", "x", "z")]
    for world in (2, 3, 5):
        (batch,) = op_batches(_plan(world, (0,)), ops)
        sp = batch.plan.sharded
        assert sp is not None and batch.plan.chunks == ()  # nothing is broadcast
        assert sp.policies == {"x": "slice", "z": "scatter"}  # rank 0 owns x's file and reads it itself
        assert [c.owner for c in sp.slices] == [0] and sp.slices[0].nbytes == 400
        (chunk,) = sp.scatters
        assert chunk.owner == 1 and list(chunk.parts_by_rank()) == [0]  # z goes from its file's owner to the op rank
        assert [sum(p.nbytes for p in chunk.parts_of(r)) for r in range(world)] == [80] + [0] * (world - 1)
        kinds = [s.kind for s in schedule(batch.plan)]
        assert kinds == [SCATTER, SLICE]
        assert [batch.plan.files[k].name for k in range(len(batch.files))] == ["a.safetensors", "b.safetensors"]


def test_a_scalar_source_moves_as_one_element():
    scalar = ShardFile("b.safetensors", 12, 8, (TensorEntry("s", "F32", (), 0, 4),))
    files = (_file("a.safetensors", [("x", 40)]), scalar)
    plan = LoadPlan("/ckpt", 2, files, OWNERS, 1 << 20, op_ranks=(0,))
    (batch,) = op_batches(plan, [_op("t1", "x", "s")])
    (chunk,) = batch.plan.sharded.scatters
    assert chunk.owner == 1 and [sum(p.nbytes for p in chunk.parts_of(r)) for r in (0, 1)] == [4, 0]


def test_batches_hold_about_one_bucket_of_sources():
    ops = [_op("t1", "x"), _op("t2", "y"), _op("t3", "z"), _op("t4", "w")]
    batches = list(op_batches(_plan(2, (0, 0, 1, 1), bucket=128), ops))
    assert [b.ops for b in batches] == [(0,), (1, 2), (3,)]  # an op larger than the bucket goes alone
    assert [b.source_bytes for b in batches] == [400, 120, 80]


def test_op_ranks_travel_with_the_plan():
    plan = _plan(3, (2, 0))
    assert pickle.loads(pickle.dumps(plan)).op_ranks == (2, 0)
    assert "gathered conversions: 2, each run by one rank (rank 0: 1, rank 2: 1)" in plan.describe()
