"""The sharded half of the plan: which rank gets which rows of each DTensor, and how it is read.

Pure and deterministic, built by the coordinator alongside the broadcast plan.
Every sharded tensor gets one reading policy:

- ``scatter``: the file's owner reads the tensor once, in row blocks of about
  one bucket, and each :class:`ScatterChunk` sends every rank that holds some
  of those rows exactly its piece, nothing else (small tensors are coalesced
  into one chunk);
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
    (file, owner, byte range, slabs, bounds), which is linear in the
    checkpoint and independent of the world size, and only then, lazily, each
    rank's own :class:`Part` of each chunk (:meth:`ScatterChunk.parts_of`) and
    its own slice reads (:meth:`ShardPlan.slices_of`). An owner finds the
    ranks it sends a chunk to by walking only the ranks that hold rows of it
    (:meth:`ScatterChunk.parts_by_rank`). So the plan's bytes do not grow with
    the world, and no rank builds world x chunks objects.

Note on what travels:
    A chunk's messages are exact: rank r receives the bytes of its parts,
    packed back to back, and no rank outside the holders of the chunk's rows
    takes part. So the bytes on the wire are the ideal (what each rank needs
    and does not read itself), and the owner's send buffer is the chunk's
    bytes times their replication, which the row blocks keep to about one
    bucket (:attr:`ScatterChunk.send_bytes`).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from ..format.header import DTYPE_SIZES, ShardFile
from .items import Chunk, Piece, interleave
from .shard import Interval, Layout, PerRank, Ranges, intersect, length, position

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


class Part(NamedTuple):
    """What one rank receives from one slab: a byte range of its local tensor.

    A named tuple, not a dataclass: an owner makes one per holder per slab
    (about a million per owner for a 16,384-rank FSDP load), and a tuple is
    the cheapest immutable record to make.
    """

    slab: int  # index into ScatterChunk.slabs
    name: str
    seg_offset: int  # where the bytes sit in the rank's message (parts back to back, no padding)
    local_offset: int  # where they go in the rank's local tensor (flat bytes, file dtype)
    nbytes: int
    rows: tuple[Interval, ...]  # the global rows of the slab that the rank holds

    @property
    def piece(self) -> Piece:
        return Piece(self.name, self.seg_offset, self.local_offset, self.nbytes)


@dataclass(frozen=True)
class ScatterChunk:
    """One scatter: the owner reads ``[start, start + nbytes)`` and sends rank r exactly ``parts_of(r)``.

    Point to point: only the owner and the ranks holding rows of the chunk
    take part, each receiving one message of its parts back to back. The
    chunk's tensors may live on different meshes.

    ``send_bytes`` is every holder's parts together (the owner's own
    included): the chunk's bytes times each tensor's replication, which the
    planner keeps to about one bucket. ``recv_bound`` bounds any one rank's
    message, computed alike on every rank without looking at any: the sum
    over slabs of the largest piece any rank can hold of it (exact whenever
    one rank holds a full piece of every slab, as in every single-slab chunk
    of an evenly split ``Shard(0)`` tensor).

    ``parts_of(rank)`` costs one region lookup per slab; the owner's
    ``parts_by_rank()`` costs one step per part.
    """

    file: int
    owner: int
    start: int
    nbytes: int
    slabs: tuple[Slab, ...]
    recv_bound: int
    send_bytes: int
    plan: ShardPlan | None = field(default=None, compare=False, repr=False)

    def parts_of(self, rank: int) -> tuple[Part, ...]:
        """(any rank) What ``rank`` receives from this chunk, in message order."""
        assert self.plan is not None, "a ScatterChunk computes parts through its ShardPlan"
        return self.plan._parts(self, rank)

    def parts_by_rank(self) -> dict[int, tuple[Part, ...]]:
        """(the owner) Every holder's parts, by rank (ascending): what ``parts_of`` gives each, in one walk."""
        assert self.plan is not None, "a ScatterChunk computes parts through its ShardPlan"
        return self.plan._parts_by_rank(self)

    def own_bytes(self, rank: int) -> int:
        """The bytes of ``rank``'s parts (its message's size)."""
        return sum(p.nbytes for p in self.parts_of(rank))

    @property
    def send_buffer(self) -> int:
        """The owner's send buffer: every message that needs packing fits, in rounds of at most a
        bucket (or of one message, when that is larger)."""
        bucket = self.plan.bucket_bytes if self.plan is not None else self.send_bytes
        return min(self.send_bytes, max(bucket, self.recv_bound))

    @property
    def wire_bytes(self) -> int:
        """What this chunk puts on the wire: every holder's parts but the owner's own."""
        return self.send_bytes - self.own_bytes(self.owner)

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
        lone = []
        for f in self.files:
            row = [t for t in f.tensors if t.nbytes]  # in file order; empty tensors move nothing

            def joins(a, b) -> bool:  # would a and b share a scatter chunk?
                return a.end == b.start and policies.get(a.name) == policies.get(b.name) == "scatter"

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
        """The largest send buffer any scatter needs: its holders' parts together."""
        return max((c.send_bytes for c in self.scatters), default=0)

    @property
    def recv_bound(self) -> int:
        """The largest message any rank can receive from one scatter (:attr:`ScatterChunk.recv_bound`)."""
        return max((c.recv_bound for c in self.scatters), default=0)

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
            part = _part(k, slab, dim0, row_elems, items[slab.name], off)
            if part is not None:
                mine.append(part)
                off += part.nbytes
        return tuple(mine)

    def _parts_by_rank(self, chunk: ScatterChunk) -> dict[int, tuple[Part, ...]]:
        """Slab by slab, only the ranks holding rows of each (:meth:`Layout.meeting`)."""
        items = self.itemsizes
        out: dict[int, list[Part]] = {}
        offs: dict[int, int] = {}
        for k, slab in enumerate(chunk.slabs):
            layout = self.table[slab.layout]
            box = (slab.rows, *((0, n) for n in layout.shape[1:]))
            for rank, region in layout.meeting(box):
                off = offs.get(rank, 0)
                row_elems = 1
                for r in region[1:]:
                    row_elems *= r[0][1] - r[0][0] if len(r) == 1 else length(r)
                part = _part(k, slab, region[0], row_elems, items[slab.name], off)
                if part is not None:
                    out.setdefault(rank, []).append(part)
                    offs[rank] = off + part.nbytes
        return {r: tuple(out[r]) for r in sorted(out)}


def _part(k: int, slab: Slab, dim0: Ranges, row_elems: int, item: int, off: int) -> Part | None:
    """A rank's part of slab ``k``, given its dim-0 ranges and elements per row, at ``off`` in its message."""
    lo, hi = slab.rows
    if len(dim0) == 1:
        a, b = max(dim0[0][0], lo), min(dim0[0][1], hi)
        if a >= b:
            return None
        rows: tuple[Interval, ...] = ((a, b),)
        count, first = b - a, a - dim0[0][0]
    else:
        rows = intersect(dim0, lo, hi)
        if not rows:
            return None
        count, first = length(rows), position(dim0, rows[0][0])
    return Part(k, slab.name, off, first * row_elems * item, count * row_elems * item, rows)


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

    A chunk's weight is its bytes times each tensor's replication: what the
    owner sends in all, so the send buffer stays about one bucket, as does
    the read. Tensors on different meshes may share a chunk: each message
    goes to the ranks holding rows of it, whatever their mesh.
    """
    out: list[ScatterChunk] = []
    slabs: list[Slab] = []
    start = end = weight = bound = 0

    def close() -> None:
        nonlocal slabs
        if slabs:
            out.append(ScatterChunk(file_idx, owner, start, end - start, tuple(slabs), bound, weight, plan))
        slabs = []

    for t, j in tensors:
        layout = plan.table[j]
        rows = layout.shape[0] if layout.shape else 0
        if rows == 0 or t.nbytes == 0:
            continue
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
                weight = bound = 0
            slabs.append(Slab(t.name, pos - start, (a, b), j))
            end = pos + (b - a) * row_bytes
            weight += w
            bound += min(b - a, summary.max_rows) * summary.max_row_elems * item
    close()
    return out
