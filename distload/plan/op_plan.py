"""Where gathered conversions run, and the plans that bring their sources there.

Pure and deterministic. A :class:`~distload.plan.keys.GatheredOp` (``Chunk``,
``Transpose``, ...) runs on one rank, its *op rank*:

- (coordinator) :func:`choose_op_ranks` picks it at plan time: the owner of
  the files holding most of the op's source bytes, ties to the rank with the
  fewest op bytes so far, then the lowest. The plan carries one int per op
  (``LoadPlan.op_ranks``), whatever the world size.
- (every rank alike) :func:`op_batches` cuts the ops, in key-map order, into
  batches of about one bucket of source bytes (at least one op), and gives
  each batch a small :class:`~distload.plan.load_plan.LoadPlan` whose only items move
  each source to its op rank: a source's layout is the whole tensor on the
  op rank and nothing elsewhere, so the ordinary transfer loop sends the
  bytes nowhere else (the op rank reads sources in files it owns itself, a
  slice step; the owners of the others scatter them to it alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass

from ..format.header import ShardFile, TensorEntry
from .keys import GatheredOp
from .load_plan import LoadPlan, tensor_mask
from .shard import Layout, Sharding, layout_of
from .shard import Placement as MeshPlacement
from .shard_plan import build_shard_plan


def choose_op_ranks(ops: Sequence[GatheredOp], files: Sequence[ShardFile], owners: Sequence[int]) -> tuple[int, ...]:
    """(coordinator) The rank that runs each op: the owner of most of its source bytes (see the module doc)."""
    wanted = {k for g in ops for k in g.sources}
    where = {t.name: (owners[i], t.nbytes) for i, f in enumerate(files) for t in f.tensors if t.name in wanted}
    load: dict[int, int] = {}
    out = []
    for g in ops:
        by_rank: dict[int, int] = {}
        for k in g.sources:
            r, n = where[k]
            by_rank[r] = by_rank.get(r, 0) + n
        pick = min(by_rank, key=lambda r: (-by_rank[r], load.get(r, 0), r))
        load[pick] = load.get(pick, 0) + sum(by_rank.values())
        out.append(pick)
    return tuple(out)


def private_layout(shape: tuple[int, ...], rank: int, world_size: int) -> Layout:
    """The whole tensor on ``rank``, nothing on any other rank (pickles as shape, rank and world).

    A scalar is laid out as one element: scatters and slice reads move rows.
    """
    return layout_of(tuple(shape) or (1,), Sharding((rank,), (1,), (MeshPlacement("replicate"),)), world_size)


@dataclass(frozen=True)
class OpBatch:
    """Consecutive gathered ops whose sources move together, and the plan that moves them."""

    ops: tuple[int, ...]  # indices into KeyMap.gathered
    plan: LoadPlan  # moves each source to its op rank only
    files: tuple[int, ...]  # plan.files[k] is the load plan's files[files[k]] (for file descriptors)
    source_bytes: int


def op_batches(plan: LoadPlan, ops: Sequence[GatheredOp]) -> Iterator[OpBatch]:
    """(every rank alike) The batches of ``ops`` in order, each made when reached (see the module doc)."""
    wanted = {k for g in ops for k in g.sources}
    where: dict[str, tuple[int, TensorEntry]] = {
        t.name: (i, t) for i, f in enumerate(plan.files) for t in f.tensors if t.name in wanted}
    batch: list[int] = []
    size = 0
    for i, g in enumerate(ops):
        n = sum(where[k][1].nbytes for k in g.sources)
        if batch and size + n > plan.bucket_bytes:
            yield _batch(plan, ops, batch, where, size)
            batch, size = [], 0
        batch.append(i)
        size += n
    if batch:
        yield _batch(plan, ops, batch, where, size)


def _batch(plan: LoadPlan, ops: Sequence[GatheredOp], batch: list[int],
           where: dict[str, tuple[int, TensorEntry]], size: int) -> OpBatch:
    by_file: dict[int, list[TensorEntry]] = {}
    layouts: dict[str, Layout] = {}
    for i in batch:
        for k in ops[i].sources:
            f, t = where[k]
            by_file.setdefault(f, []).append(t)
            layouts[k] = private_layout(t.shape, plan.op_ranks[i], plan.world_size)
    index = tuple(sorted(by_file))
    files = tuple(dataclasses.replace(plan.files[i], tensors=tuple(sorted(by_file[i], key=lambda t: t.start)))
                  for i in index)
    owners = tuple(plan.owners[i] for i in index)
    sp = build_shard_plan(files, owners, layouts, world_size=plan.world_size, bucket_bytes=plan.bucket_bytes,
                          read_policy="scatter", local_storage=False)
    sub = LoadPlan(plan.root, plan.world_size, files, owners, plan.bucket_bytes,
                   moved=tensor_mask(files, set()), sharded=sp)
    return OpBatch(tuple(batch), sub, index, size)
