"""Slice math: which elements of a global tensor each rank holds under a DTensor sharding.

Pure and process-local (no torch). A :class:`Sharding` is the plain-data copy
of a DTensor's mesh and placements; :func:`layout_of` turns it into one
:class:`Layout` per tensor: for every rank, the global index ranges it holds
along each dimension. The semantics follow DTensor's own chunking exactly:
``Shard(d)`` splits like ``torch.chunk`` (ceil-sized pieces, so the last ranks
get smaller or empty ones), mesh dimensions apply left to right, and
``_StridedShard`` (FSDP2 x TP on the same dim) first splits into
``split_factor`` pieces, shards each, and concatenates a rank's parts.

Because every step keeps ranges sorted, a rank's local tensor is always the
row-major gather of ``region[0] x region[1] x ...`` in increasing order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Interval = tuple[int, int]  # [start, end) of global indices along one dim
Ranges = tuple[Interval, ...]  # sorted, disjoint, non-empty intervals
Region = tuple[Ranges, ...]  # one Ranges per tensor dim


@dataclass(frozen=True)
class Placement:
    """One mesh dimension's placement: ``shard`` on ``dim``, ``strided`` or ``replicate``."""

    kind: str  # "shard" | "strided" | "replicate"
    dim: int = -1
    split: int = 1  # _StridedShard's split_factor


@dataclass(frozen=True)
class Sharding:
    """A DTensor's distribution as plain data (mesh ranks are process-group ranks)."""

    mesh: tuple[int, ...]  # ranks, row-major over mesh_shape
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class Layout:
    """Where every element of one tensor lives: ``regions[r]`` for group rank ``r``.

    ``None`` means rank ``r`` is outside the tensor's mesh and holds nothing.
    """

    shape: tuple[int, ...]
    regions: tuple[Region | None, ...]

    def local_shape(self, rank: int) -> tuple[int, ...]:
        region = self.regions[rank]
        if region is None:
            return (0,) * len(self.shape)
        return tuple(length(r) for r in region)

    def local_numel(self, rank: int) -> int:
        return math.prod(self.local_shape(rank))

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole tensor: the broadcast path serves it."""
        full = tuple(full_ranges(n) for n in self.shape)
        return all(r == full for r in self.regions)

    @property
    def replication(self) -> int:
        """How many ranks hold a typical element (1 for pure sharding)."""
        total = math.prod(self.shape)
        held = sum(self.local_numel(r) for r in range(len(self.regions)))
        return max(1, -(-held // total)) if total else 1

    def element_range(self, rank: int) -> Interval | None:
        """Rank's piece as one contiguous range of row-major elements, else None.

        True when it holds one run of whole dim-0 rows (what ``Shard(0)`` gives);
        an empty piece is the empty range.
        """
        region = self.regions[rank]
        if region is None or any(not r for r in region):
            return (0, 0)
        if not self.shape or len(region[0]) != 1:
            return None
        if any(r != full_ranges(n) for r, n in zip(region[1:], self.shape[1:])):
            return None
        row = math.prod(self.shape[1:])
        a, b = region[0][0]
        return a * row, b * row

    def sliceable(self) -> bool:
        """Each rank's piece is one contiguous byte range and no two overlap."""
        spans = [self.element_range(r) for r in range(len(self.regions))]
        if any(s is None for s in spans):
            return False
        spans_sorted = sorted(s for s in spans if s and s[1] > s[0])  # type: ignore[misc]
        return all(a[1] <= b[0] for a, b in zip(spans_sorted, spans_sorted[1:]))


def full_ranges(n: int) -> Ranges:
    return ((0, n),) if n > 0 else ()


def length(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def chunk_bounds(n: int, k: int, i: int) -> Interval:
    """Piece ``i`` of ``k`` of a length-``n`` dim, as ``torch.chunk`` (and DTensor) cut it."""
    size = -(-n // k) if n else 0
    start = min(i * size, n)
    return start, min(start + size, n)


def take(ranges: Ranges, start: int, end: int) -> Ranges:
    """The global ranges at local positions ``[start, end)`` of the concatenation of ``ranges``."""
    out: list[Interval] = []
    pos = 0
    for a, b in ranges:
        lo, hi = max(start, pos), min(end, pos + b - a)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += b - a
    return merge(out)


def merge(ranges: list[Interval]) -> Ranges:
    out: list[Interval] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return tuple(out)


def intersect(ranges: Ranges, lo: int, hi: int) -> Ranges:
    return merge([(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)])


def position(ranges: Ranges, index: int) -> int:
    """Local position of global ``index`` (which must lie in ``ranges``)."""
    pos = 0
    for a, b in ranges:
        if a <= index < b:
            return pos + index - a
        pos += b - a
    raise ValueError(f"{index} not in {ranges}")


def local_region(shape: tuple[int, ...], sharding: Sharding, coord: tuple[int, ...]) -> Region:
    """The global ranges held at mesh coordinate ``coord``, applying placements left to right."""
    region = [full_ranges(n) for n in shape]
    for mdim, pl in enumerate(sharding.placements):
        k, i = sharding.mesh_shape[mdim], coord[mdim]
        if pl.kind == "replicate":
            continue
        cur = region[pl.dim]
        if pl.kind == "shard":
            region[pl.dim] = take(cur, *chunk_bounds(length(cur), k, i))
        else:  # strided: split into `split` pieces, shard each, keep piece i of every one
            parts: list[Interval] = []
            for j in range(pl.split):
                piece = take(cur, *chunk_bounds(length(cur), pl.split, j))
                parts.extend(take(piece, *chunk_bounds(length(piece), k, i)))
            region[pl.dim] = merge(parts)
    return tuple(region)


def layout_of(shape: tuple[int, ...], sharding: Sharding, world_size: int) -> Layout:
    """(coordinator) Every rank's region of one tensor."""
    regions: list[Region | None] = [None] * world_size
    for flat, rank in enumerate(sharding.mesh):
        coord, rest = [], flat
        for n in reversed(sharding.mesh_shape):
            coord.append(rest % n)
            rest //= n
        regions[rank] = local_region(shape, sharding, tuple(reversed(coord)))
    return Layout(tuple(shape), tuple(regions))
