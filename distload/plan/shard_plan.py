"""The sharded half of the plan: which rank gets which rows of each DTensor, and how it is read.

Pure and deterministic, built by the coordinator alongside the broadcast plan.
Every sharded tensor gets one reading policy:

- ``scatter``: the file's owner reads the tensor once, in row blocks of about
  one bucket, and each :class:`ScatterChunk` sends every rank exactly its
  piece of those rows (small tensors are coalesced into one chunk);
- ``slice``: each rank reads its own piece, one contiguous byte range of the
  file, itself (:class:`~distload.plan.items.Chunk` items whose ``owner`` is the
  reading rank), with no network traffic.

Either way each byte is read once across the job. As in the broadcast plan,
items say what moves, not how.

Note on size:
    What travels is only the inputs: the distinct layouts (one per tensor
    shape and sharding; a mesh of consecutive ranks pickles as a ``range``)
    and, per tensor, an index into them. Every rank derives the same schedule
    from those and the file headers: the global sequence of scatter chunks
    (file, owner, byte range, slabs, segment size), which is linear in the
    checkpoint and independent of the world size, and only then, lazily, each
    rank's own :class:`Part` of each chunk (:meth:`ScatterChunk.parts_of`) and
    its own slice reads (:meth:`ShardPlan.slices_of`). So the plan's bytes do
    not grow with the world, and no rank builds world x chunks objects unless
    it walks every rank's parts (the owner of a chunk, for the chunks it sends).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..format.header import DTYPE_SIZES, ShardFile
from .items import Chunk, Piece, interleave
from .shard import Interval, Layout, PerRank, RankTuple, intersect, length, position

READ_POLICIES = ("auto", "scatter", "slice")
# Under "auto" a rank reads its own slice when the piece is at least this big;
# smaller pieces are scattered where they coalesce with a neighbour (one
# collective for many small reads) and sliced where they would travel alone.
SLICE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Slab:
    """Rows ``rows`` of one tensor, at ``chunk_offset`` inside a scatter chunk's bytes."""

    name: str
    chunk_offset: int
    rows: Interval  # global dim-0 rows [start, end); elements for 1-D tensors
    layout: int = -1  # index into ShardPlan.table (set by the planner)


@dataclass(frozen=True)
class Part:
    """What one rank receives from one slab: a byte range of its local tensor."""

    slab: int  # index into ScatterChunk.slabs
    name: str
    seg_offset: int  # where the bytes sit in the rank's segment
    local_offset: int  # where they go in the rank's local tensor (flat bytes, file dtype)
    nbytes: int
    rows: tuple[Interval, ...]  # the global rows of the slab that the rank holds

    @property
    def piece(self) -> Piece:
        return Piece(self.name, self.seg_offset, self.local_offset, self.nbytes)


@dataclass(frozen=True)
class ScatterChunk:
    """One scatter: the owner reads ``[start, start + nbytes)`` and rank r gets ``parts[r]``.

    The scatter runs over ``ranks``: the owner and every rank on the meshes
    of the chunk's tensors (a tensor on a 2-rank submesh of a 16-rank job is
    scattered over 2 or 3 ranks, not 16); chunks sharing those ranks share
    one tuple. ``parts`` is indexed by global rank and empty outside
    ``ranks``. Every segment is padded to ``seg_bytes`` so the collective
    moves equal sizes (what gloo and MPI_Scatter need). ``seg_bytes`` is an upper
    bound on any rank's packed parts that every rank computes alike without
    looking at every rank: the sum over slabs of the largest piece any rank
    can hold of that slab (each rounded up to 8 bytes). It equals the largest
    segment whenever one rank holds a full piece of every slab (every
    single-slab chunk of a ``Shard(0)`` tensor split evenly, among others).

    ``parts`` is computed per rank when looked up: ``parts_of(rank)`` (or
    ``parts[rank]``) costs one region lookup per slab.
    """

    file: int
    owner: int
    start: int
    nbytes: int
    slabs: tuple[Slab, ...]
    seg_bytes: int
    ranks: tuple[int, ...] = ()  # the ranks the scatter runs over, sorted
    plan: ShardPlan | None = field(default=None, compare=False, repr=False)

    @property
    def send_bytes(self) -> int:
        """The padded send buffer: one segment per rank in ``ranks``."""
        return self.seg_bytes * len(self.ranks)

    def parts_of(self, rank: int) -> tuple[Part, ...]:
        """(any rank) What ``rank`` receives from this chunk, in segment order."""
        assert self.plan is not None, "a ScatterChunk computes parts through its ShardPlan"
        return self.plan._parts(self, rank)

    @property
    def parts(self) -> Sequence[tuple[Part, ...]]:
        """Every rank's parts, as a sequence indexed by rank, each computed when looked up."""
        return _Parts(self, self.plan.world_size if self.plan is not None else 0)


class _Parts(PerRank):
    __slots__ = ("chunk", "world")

    def __init__(self, chunk: ScatterChunk, world: int):
        self.chunk, self.world = chunk, world

    def __len__(self) -> int:
        return self.world

    def _at(self, rank: int) -> tuple[Part, ...]:
        return self.chunk.parts_of(rank)


@dataclass(frozen=True)
class ShardPlan:
    """Everything about DTensor destinations; identical on every rank.

    Holds only the inputs of the sharded schedule (see the module note);
    ``layouts``, ``policies``, ``scatters`` and ``slices`` are derived on
    first use, the same on every rank. Per-rank accessors, what the transfer
    loop should call at large worlds: :meth:`ScatterChunk.parts_of`,
    :meth:`slices_of`, :meth:`bytes_of`.
    """

    read_policy: str  # what the caller asked for
    world_size: int = 1
    bucket_bytes: int = 64 << 20
    local_storage: bool = True
    files: tuple[ShardFile, ...] = ()
    owners: tuple[int, ...] = ()
    table: tuple[Layout, ...] = ()  # the distinct layouts
    which: array = field(default_factory=lambda: array("i"))  # per tensor, in file order: table index or -1

    def __reduce__(self):
        return ShardPlan, (self.read_policy, self.world_size, self.bucket_bytes, self.local_storage, self.files,
                           self.owners, self.table, self.which)

    def _sharded(self) -> list:
        """(file index, tensor entry, table index) of every sharded tensor, in file order."""
        got = self.__dict__.get("_entries")
        if got is None:
            got, k, which = [], 0, self.which
            for i, f in enumerate(self.files):
                for t in f.tensors:
                    j = which[k] if k < len(which) else -1
                    k += 1
                    if j >= 0:
                        got.append((i, t, j))
            self.__dict__["_entries"] = got
        return got

    @cached_property
    def layouts(self) -> dict[str, Layout]:
        return {t.name: self.table[j] for _, t, j in self._sharded()}

    @cached_property
    def policies(self) -> dict[str, str]:
        """tensor -> "scatter" | "slice" (a tensor that only its file's owner holds is always sliced).

        Under ``auto`` on local storage, a small piece is scattered only when
        its bytes coalesce with a scattered neighbour's. Alone between sliced
        tensors (a norm between two projections, as transformers writes them)
        it would cost a collective of its own, every rank in lockstep, for a
        few KiB that each rank reads itself in microseconds.
        """
        memo: dict[tuple[int, int], str] = {}
        out = {}
        for i, t, j in self._sharded():
            layout = self.table[j]
            if layout.holders == (self.owners[i],) and layout.sliceable():
                out[t.name] = "slice"  # only the file's owner holds it: it reads it, no collective needed
                continue
            key = (j, DTYPE_SIZES[t.dtype])
            if key not in memo:
                memo[key] = choose_policy(self.table[j], self.read_policy, key[1], self.local_storage)
            out[t.name] = memo[key]
        if self.read_policy == "auto" and self.local_storage:
            out.update(dict.fromkeys(self._lone_small_scatters(out), "slice"))
        return out

    def _lone_small_scatters(self, policies: dict[str, str]) -> list[str]:
        """Sliceable tensors scattered for their size whose bytes touch no other scattered tensor's."""
        holders = {t.name: self.table[j].holders for _, t, j in self._sharded()}
        lone = []
        for f in self.files:
            row = [t for t in f.tensors if t.nbytes]  # in file order; empty tensors move nothing

            def joins(a, b) -> bool:  # would a and b share a scatter chunk?
                return (a.end == b.start and policies.get(a.name) == policies.get(b.name) == "scatter"
                        and holders[a.name] == holders[b.name])

            for k, t in enumerate(row):
                if policies.get(t.name) != "scatter" or not self.layouts[t.name].sliceable():
                    continue
                if not (k > 0 and joins(row[k - 1], t)) and not (k + 1 < len(row) and joins(t, row[k + 1])):
                    lone.append(t.name)
        return lone

    @cached_property
    def itemsizes(self) -> dict[str, int]:
        return {t.name: DTYPE_SIZES[t.dtype] for _, t, _ in self._sharded()}

    @cached_property
    def scatters(self) -> tuple[ScatterChunk, ...]:
        """The global schedule of scatter chunks, identical on every rank."""
        policies = self.policies
        streams: dict[int, list[ScatterChunk]] = {}
        by_file: dict[int, list] = {}
        for i, t, j in self._sharded():
            if policies[t.name] == "scatter":
                by_file.setdefault(i, []).append((t, j))
        for i in sorted(range(len(self.files)), key=lambda i: self.files[i].name):
            streams.setdefault(self.owners[i], []).extend(
                _scatter_chunks(self, i, self.files[i], self.owners[i], by_file.get(i, []), self.bucket_bytes))
        return interleave(streams)  # type: ignore[arg-type]

    def slices_of(self, rank: int) -> tuple[Chunk, ...]:
        """(any rank) The slice reads ``rank`` makes itself, in file order."""
        out: list[Chunk] = []
        for i in sorted(range(len(self.files)), key=lambda i: self.files[i].name):
            for t in self._slice_tensors.get(i, ()):
                out.extend(_slice_reads(i, self.files[i], t, self.layouts[t.name], self.bucket_bytes, (rank,)))
        return tuple(out)

    @cached_property
    def _slice_tensors(self) -> dict[int, list]:
        policies = self.policies
        out: dict[int, list] = {}
        for i, t, _ in self._sharded():
            if policies[t.name] == "slice":
                out.setdefault(i, []).append(t)
        return out

    @cached_property
    def slices(self) -> tuple[Chunk, ...]:
        """Every rank's slice reads (world x sliced tensors items: use :meth:`slices_of` at scale)."""
        out: list[Chunk] = []
        for i in sorted(range(len(self.files)), key=lambda i: self.files[i].name):
            for t in self._slice_tensors.get(i, ()):
                out.extend(_slice_reads(i, self.files[i], t, self.layouts[t.name], self.bucket_bytes,
                                        range(self.world_size)))
        return tuple(out)

    @property
    def sliced_bytes(self) -> int:
        """Bytes of the tensors that ranks read themselves, each tensor once."""
        return sum(t.nbytes for ts in self._slice_tensors.values() for t in ts)

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.scatters) + self.sliced_bytes

    def bytes_of(self, rank: int) -> int:
        return (sum(c.nbytes for c in self.scatters if c.owner == rank)
                + sum(c.nbytes for c in self.slices_of(rank)))

    @property
    def send_bytes(self) -> int:
        """The largest padded send buffer any scatter needs."""
        return max((c.send_bytes for c in self.scatters), default=0)

    def _group(self, owner: int, holders: tuple[int, ...]) -> tuple[int, ...]:
        """The ranks a scatter runs over: ``holders`` plus ``owner``, one shared tuple per distinct set."""
        cache = self.__dict__.setdefault("_groups", {})
        key = (id(holders), owner)
        got = cache.get(key)
        if got is None:
            i = bisect_left(holders, owner)
            ranks = holders if i < len(holders) and holders[i] == owner else \
                RankTuple(holders[:i] + (owner,) + holders[i:])
            got = cache[key] = (holders, ranks)  # holding holders keeps its id unique
        return got[1]

    def _held(self, rank: int, j: int):
        """``rank``'s dim-0 ranges and elements per row under layout ``j``; None if it holds nothing."""
        cache = self.__dict__.setdefault("_held_cache", {})
        key = (rank, j)
        if key not in cache:
            region = self.table[j].regions[rank]
            if region is None or any(not r for r in region):
                cache[key] = None
            else:
                cache[key] = (region[0], math.prod(length(r) for r in region[1:]))
        return cache[key]

    def _parts(self, chunk: ScatterChunk, rank: int) -> tuple[Part, ...]:
        items = self.itemsizes
        mine: list[Part] = []
        off = 0
        for k, slab in enumerate(chunk.slabs):
            held = self._held(rank, slab.layout)
            if held is None:
                continue
            dim0, row_elems = held
            lo, hi = slab.rows
            if len(dim0) == 1:
                a, b = max(dim0[0][0], lo), min(dim0[0][1], hi)
                if a >= b:
                    continue
                rows: tuple[Interval, ...] = ((a, b),)
                count, first = b - a, a - dim0[0][0]
            else:
                rows = intersect(dim0, lo, hi)
                if not rows:
                    continue
                count, first = length(rows), position(dim0, rows[0][0])
            item = items[slab.name]
            n = count * row_elems * item
            off = -(-off // 8) * 8  # element-aligned for every dtype
            mine.append(Part(k, slab.name, off, first * row_elems * item, n, rows))
            off += n
        return tuple(mine)


def choose_policy(layout: Layout, requested: str, itemsize: int, local_storage: bool) -> str:
    """The reading policy for one sharded tensor.

    ``slice`` needs every piece to be one contiguous, non-overlapping byte
    range (``Shard(0)``); otherwise, or when ``scatter`` is requested, the owner
    scatters. ``auto`` slices only on local storage (many concurrent readers
    are cheap there, and DCP-style reads skip the network copy) and only for
    pieces of at least :data:`SLICE_MIN_BYTES` (:attr:`ShardPlan.policies`
    also slices smaller ones that no scatter would coalesce); on network
    filesystems one large sequential read per file plus a scatter is faster.
    """
    if requested == "scatter" or not layout.sliceable():
        return "scatter"
    if requested == "slice":
        return "slice"
    smallest = layout.summary.min_numel * itemsize
    return "slice" if local_storage and smallest >= SLICE_MIN_BYTES else "scatter"


def build_shard_plan(
    files: tuple[ShardFile, ...],
    owners: tuple[int, ...],
    layouts: dict[str, Layout],
    *,
    world_size: int,
    bucket_bytes: int,
    read_policy: str = "auto",
    local_storage: bool = True,
) -> ShardPlan:
    """(coordinator) The sharded plan's inputs: distinct layouts and which tensor has which.

    Policies, scatter chunks and slice reads are derived from them on each
    rank (see the module note).
    """
    index: dict[Layout, int] = {}
    which = array("i")
    for f in files:
        for t in f.tensors:
            layout = layouts.get(t.name)
            which.append(-1 if layout is None else index.setdefault(layout, len(index)))
    return ShardPlan(read_policy, world_size, bucket_bytes, local_storage, tuple(files), tuple(owners),
                     tuple(index), which)


def _slice_reads(file_idx: int, shard: ShardFile, t, layout: Layout, bucket_bytes: int, ranks) -> list[Chunk]:
    """Each of ``ranks``' own contiguous piece, in bucket-sized reads."""
    item = DTYPE_SIZES[t.dtype]
    out = []
    for rank in ranks:
        a, b = layout.element_range(rank)  # type: ignore[misc]
        begin, n = shard.data_offset + t.start + a * item, (b - a) * item
        for off in range(0, n, bucket_bytes):
            size = min(bucket_bytes, n - off)
            out.append(Chunk(file_idx, rank, begin + off, size, (Piece(t.name, 0, off, size),)))
    return out


def _scatter_chunks(plan: ShardPlan, file_idx: int, shard: ShardFile, owner: int, tensors: list,
                    bucket_bytes: int) -> list[ScatterChunk]:
    """Cut one file's scattered tensors into row blocks and coalesce neighbours.

    A chunk's weight is its bytes times the tensor's replication, which bounds
    the padded send buffer to about one bucket as well as the read. Only
    tensors on the same ranks share a chunk, so each scatter runs over its
    tensors' own mesh.
    """
    out: list[ScatterChunk] = []
    slabs: list[Slab] = []
    start = end = weight = seg = 0
    group: tuple[int, ...] = ()

    def close() -> None:
        nonlocal slabs
        if slabs:
            out.append(ScatterChunk(file_idx, owner, start, end - start, tuple(slabs), -(-seg // 8) * 8,
                                    plan._group(owner, group), plan))
        slabs = []

    for t, j in tensors:
        layout = plan.table[j]
        rows = layout.shape[0] if layout.shape else 0
        if rows == 0 or t.nbytes == 0:
            continue
        holders = layout.holders
        if holders is not group and holders != group:
            close()
            group = holders
        row_bytes = t.nbytes // rows
        summary = layout.summary
        rep = summary.replication
        item = DTYPE_SIZES[t.dtype]
        per_block = max(1, bucket_bytes // max(1, row_bytes * rep))
        for a in range(0, rows, per_block):
            b = min(rows, a + per_block)
            pos = shard.data_offset + t.start + a * row_bytes
            w = (b - a) * row_bytes * rep
            if slabs and (pos != end or weight + w > bucket_bytes):
                close()
            if not slabs:
                start = end = pos
                weight = seg = 0
            slabs.append(Slab(t.name, pos - start, (a, b), j))
            end = pos + (b - a) * row_bytes
            weight += w
            piece = min(b - a, summary.max_rows) * summary.max_row_elems * item
            seg = -(-seg // 8) * 8 + piece
    close()
    return out
