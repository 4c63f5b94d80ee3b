"""The sharded half of the plan: which rank gets which rows of each DTensor, and how it is read.

Pure and deterministic, built by the coordinator alongside the broadcast plan.
Every sharded tensor gets one reading policy:

- ``scatter``: the file's owner reads the tensor once, in row blocks of about
  one bucket, and each :class:`ScatterChunk` sends every rank exactly its
  piece of those rows (small tensors are coalesced into one chunk);
- ``slice``: each rank reads its own piece, one contiguous byte range of the
  file, itself (:class:`~distload.plan.Chunk` items whose ``owner`` is the
  reading rank), with no network traffic.

Either way each byte is read once across the job. As in the broadcast plan,
items say what moves, not how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .index import DTYPE_SIZES, ShardFile
from .plan import Chunk, Piece, interleave
from .shard import Interval, Layout, intersect, length, position

READ_POLICIES = ("auto", "scatter", "slice")
# Under "auto" a rank reads its own slice only when the piece is at least this
# big: below it, one coalesced scatter is cheaper than many small reads.
SLICE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Slab:
    """Rows ``rows`` of one tensor, at ``chunk_offset`` inside a scatter chunk's bytes."""

    name: str
    chunk_offset: int
    rows: Interval  # global dim-0 rows [start, end); elements for 1-D tensors


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
    scattered over 2 or 3 ranks, not 16). ``parts`` is indexed by global
    rank and empty outside ``ranks``. Every segment is padded to
    ``seg_bytes`` so the collective moves equal sizes (what gloo and
    MPI_Scatter need).
    """

    file: int
    owner: int
    start: int
    nbytes: int
    slabs: tuple[Slab, ...]
    parts: tuple[tuple[Part, ...], ...]
    seg_bytes: int
    ranks: tuple[int, ...] = ()  # the ranks the scatter runs over, sorted

    @property
    def send_bytes(self) -> int:
        """The padded send buffer: one segment per rank in ``ranks``."""
        return self.seg_bytes * len(self.ranks)


@dataclass(frozen=True)
class ShardPlan:
    """Everything about DTensor destinations; identical on every rank."""

    read_policy: str  # what the caller asked for
    layouts: dict[str, Layout] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)  # tensor -> "scatter" | "slice"
    scatters: tuple[ScatterChunk, ...] = ()  # the global schedule
    slices: tuple[Chunk, ...] = ()  # owner = the rank reading its own piece

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.scatters) + sum(c.nbytes for c in self.slices)

    def bytes_of(self, rank: int) -> int:
        return (sum(c.nbytes for c in self.scatters if c.owner == rank)
                + sum(c.nbytes for c in self.slices if c.owner == rank))

    @property
    def send_bytes(self) -> int:
        """The largest padded send buffer any scatter needs."""
        return max((c.send_bytes for c in self.scatters), default=0)


def choose_policy(layout: Layout, requested: str, itemsize: int, local_storage: bool) -> str:
    """The reading policy for one sharded tensor.

    ``slice`` needs every piece to be one contiguous, non-overlapping byte
    range (``Shard(0)``); otherwise, or when ``scatter`` is requested, the owner
    scatters. ``auto`` slices only on local storage (many concurrent readers
    are cheap there, and DCP-style reads skip the network copy) and only for
    pieces of at least :data:`SLICE_MIN_BYTES`; on network filesystems one
    large sequential read per file plus a scatter is faster.
    """
    if requested == "scatter" or not layout.sliceable():
        return "scatter"
    if requested == "slice":
        return "slice"
    sizes = [layout.local_numel(r) * itemsize for r in range(len(layout.regions))]
    smallest = min((s for s in sizes if s), default=0)
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
    """(coordinator) Policies, scatter chunks and slice reads for the sharded tensors."""
    policies: dict[str, str] = {}
    streams: dict[int, list[ScatterChunk]] = {}
    slices: list[Chunk] = []
    for i in sorted(range(len(files)), key=lambda i: files[i].name):
        shard, owner = files[i], owners[i]
        scattered = []
        for t in shard.tensors:
            if t.name not in layouts:
                continue
            policy = choose_policy(layouts[t.name], read_policy, DTYPE_SIZES[t.dtype], local_storage)
            policies[t.name] = policy
            if policy == "slice":
                slices.extend(_slice_reads(i, shard, t, layouts[t.name], bucket_bytes))
            else:
                scattered.append(t)
        streams.setdefault(owner, []).extend(
            _scatter_chunks(i, shard, owner, scattered, layouts, world_size, bucket_bytes))
    return ShardPlan(read_policy, dict(layouts), policies, interleave(streams), tuple(slices))  # type: ignore[arg-type]


def _slice_reads(file_idx: int, shard: ShardFile, t, layout: Layout, bucket_bytes: int) -> list[Chunk]:
    """Each rank's own contiguous piece, in bucket-sized reads."""
    item = DTYPE_SIZES[t.dtype]
    out = []
    for rank in range(len(layout.regions)):
        a, b = layout.element_range(rank)  # type: ignore[misc]
        begin, n = shard.data_offset + t.start + a * item, (b - a) * item
        for off in range(0, n, bucket_bytes):
            size = min(bucket_bytes, n - off)
            out.append(Chunk(file_idx, rank, begin + off, size, (Piece(t.name, 0, off, size),)))
    return out


def _scatter_chunks(file_idx: int, shard: ShardFile, owner: int, tensors: list, layouts: dict[str, Layout],
                    world_size: int, bucket_bytes: int) -> list[ScatterChunk]:
    """Cut one file's scattered tensors into row blocks and coalesce neighbours.

    A chunk's weight is its bytes times the tensor's replication, which bounds
    the padded send buffer to about one bucket as well as the read. Only
    tensors on the same ranks share a chunk, so each scatter runs over its
    tensors' own mesh.
    """
    out: list[ScatterChunk] = []
    slabs: list[tuple[Slab, object]] = []
    start = end = weight = 0
    group: tuple[int, ...] = ()

    def close() -> None:
        nonlocal slabs
        if slabs:
            out.append(_make_chunk(file_idx, owner, start, end - start, slabs, layouts, world_size))
        slabs = []

    for t in tensors:
        layout = layouts[t.name]
        rows = layout.shape[0] if layout.shape else 0
        if rows == 0 or t.nbytes == 0:
            continue
        row_bytes = t.nbytes // rows
        rep = layout.replication
        per_block = max(1, bucket_bytes // max(1, row_bytes * rep))
        holders = tuple(r for r, region in enumerate(layout.regions) if region is not None)
        if holders != group:
            close()
            group = holders
        for a in range(0, rows, per_block):
            b = min(rows, a + per_block)
            pos = shard.data_offset + t.start + a * row_bytes
            w = (b - a) * row_bytes * rep
            if slabs and (pos != end or weight + w > bucket_bytes):
                close()
            if not slabs:
                start = end = pos
                weight = 0
            slabs.append((Slab(t.name, pos - start, (a, b)), t))
            end = pos + (b - a) * row_bytes
            weight += w
    close()
    return out


def _make_chunk(file_idx: int, owner: int, start: int, nbytes: int, slabs: list, layouts: dict[str, Layout],
                world_size: int) -> ScatterChunk:
    parts: list[tuple[Part, ...]] = []
    for rank in range(world_size):
        mine: list[Part] = []
        off = 0
        for k, (slab, t) in enumerate(slabs):
            region = layouts[slab.name].regions[rank]
            if region is None or any(not r for r in region):
                continue
            rows = intersect(region[0], *slab.rows)
            if not rows:
                continue
            item = DTYPE_SIZES[t.dtype]
            row_elems = math.prod(length(r) for r in region[1:])
            n = length(rows) * row_elems * item
            off = -(-off // 8) * 8  # element-aligned for every dtype
            local = position(region[0], rows[0][0]) * row_elems * item
            mine.append(Part(k, slab.name, off, local, n, rows))
            off += n
        parts.append(tuple(mine))
    seg = max((p[-1].seg_offset + p[-1].nbytes for p in parts if p), default=0)
    group = {owner} | {r for slab, _ in slabs for r, region in enumerate(layouts[slab.name].regions)
                       if region is not None}
    return ScatterChunk(file_idx, owner, start, nbytes, tuple(s for s, _ in slabs), tuple(parts), -(-seg // 8) * 8,
                        tuple(sorted(group)))
