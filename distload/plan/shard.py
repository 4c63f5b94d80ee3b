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

import itertools
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

Interval = tuple[int, int]  # [start, end) of global indices along one dim
Ranges = tuple[Interval, ...]  # sorted, disjoint, non-empty intervals
Region = tuple[Ranges, ...]  # one Ranges per tensor dim
Box = tuple[Interval, ...]  # one [start, end) per tensor dim


@dataclass(frozen=True)
class Placement:
    """One mesh dimension's placement: ``shard`` on ``dim``, ``strided`` or ``replicate``."""

    kind: str  # "shard" | "strided" | "replicate"
    dim: int = -1
    split: int = 1  # _StridedShard's split_factor


@dataclass(frozen=True)
class Sharding:
    """A DTensor's distribution as plain data (mesh ranks are process-group ranks).

    Many tensors share one mesh, so a Sharding caches its hash and its
    rank -> mesh position map, and pickles a mesh of consecutive ranks as a
    ``range``: its size on the wire does not grow with the world.
    """

    mesh: tuple[int, ...]  # ranks, row-major over mesh_shape
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, tuple):
            object.__setattr__(self, "mesh", tuple(self.mesh))

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.mesh, self.mesh_shape, self.placements))
            object.__setattr__(self, "_hash", h)
        return h

    def __reduce__(self):
        m = self.mesh
        compact = range(m[0], m[0] + len(m)) if m and m == tuple(range(m[0], m[0] + len(m))) else m
        return Sharding, (compact, self.mesh_shape, self.placements)

    @property
    def ranks(self) -> RankTuple:
        """The mesh's ranks, sorted (one shared tuple)."""
        got = self.__dict__.get("_ranks")
        if got is None:
            got = RankTuple(sorted(self.mesh))
            object.__setattr__(self, "_ranks", got)
        return got

    def coord(self, rank: int) -> tuple[int, ...] | None:
        """``rank``'s mesh coordinate, or None when the mesh does not hold it."""
        where = self.__dict__.get("_where")
        if where is None:
            where = {r: i for i, r in enumerate(self.mesh)}
            object.__setattr__(self, "_where", where)
        flat = where.get(rank)
        if flat is None:
            return None
        coord = []
        for n in reversed(self.mesh_shape):
            coord.append(flat % n)
            flat //= n
        return tuple(reversed(coord))


class RankTuple(tuple):
    """A sorted tuple of ranks that hashes once: many chunks share one, and loops key groups by it."""

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = tuple.__hash__(self)
        return h


class PerRank(Sequence):
    """A read-only sequence indexed by rank whose items are computed on lookup (``_at``).

    Indexing follows tuples (negative ranks, slices, IndexError past the world),
    so it stands wherever a per-rank tuple would, without building one.
    """

    __slots__ = ()

    @abstractmethod
    def __len__(self) -> int:
        """The world size."""

    @abstractmethod
    def _at(self, rank: int):
        """Rank ``rank``'s item, ``0 <= rank < len(self)``."""

    def __getitem__(self, rank):  # type: ignore[override]
        n = len(self)
        if isinstance(rank, slice):
            return tuple(self._at(r) for r in range(*rank.indices(n)))
        if rank < 0:
            rank += n
        if not 0 <= rank < n:
            raise IndexError(rank)
        return self._at(rank)

    def __iter__(self):
        return (self._at(r) for r in range(len(self)))


class LazyRegions(PerRank):
    """Every rank's region of one tensor under one sharding, each computed when first asked for.

    What :func:`layout_of` returns as ``Layout.regions``: a world of 16,384
    ranks costs nothing until a rank looks up its own region (or an owner
    walks the ranks it sends to). Equal and hashed by ``(shape, sharding,
    world)``, and pickled as just those.
    """

    __slots__ = ("shape", "sharding", "world", "_cache")

    def __init__(self, shape: tuple[int, ...], sharding: Sharding, world: int):
        self.shape, self.sharding, self.world = tuple(shape), sharding, world
        self._cache: dict[int, Region | None] = {}

    def __len__(self) -> int:
        return self.world

    def _at(self, rank: int) -> Region | None:
        try:
            return self._cache[rank]
        except KeyError:
            coord = self.sharding.coord(rank)
            region = None if coord is None else local_region(self.shape, self.sharding, coord)
            self._cache[rank] = region
            return region

    def __eq__(self, other) -> bool:
        if isinstance(other, LazyRegions):
            return (self.shape, self.world, self.sharding) == (other.shape, other.world, other.sharding)
        return isinstance(other, (tuple, list)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash((self.shape, self.world, self.sharding))

    def __reduce__(self):
        return LazyRegions, (self.shape, self.sharding, self.world)

    def __repr__(self) -> str:
        return f"LazyRegions({self.shape}, {self.sharding}, world={self.world})"


class UnionRegions(PerRank):
    """Regions of one tensor that ranks hold on several disjoint meshes (replicas of one sharding).

    FSDP over "dp" in a dp x tp job puts a norm weight on one dp submesh per
    tp column: each rank's DTensor names only its own submesh, and together
    they hold the tensor once per column. A rank's region comes from the one
    part whose mesh holds it. Pickled as its parts, so its size is that of
    the meshes, not the world.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[LazyRegions, ...]):
        self.parts = tuple(parts)

    def __len__(self) -> int:
        return self.parts[0].world

    def _at(self, rank: int) -> Region | None:
        for part in self.parts:
            region = part._at(rank)
            if region is not None:
                return region
        return None

    def __eq__(self, other) -> bool:
        return isinstance(other, UnionRegions) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __reduce__(self):
        return UnionRegions, (self.parts,)


@dataclass(frozen=True)
class Summary:
    """What the planner needs to know about a layout over all ranks, computed once per layout."""

    replicated: bool  # every rank holds the whole tensor
    replication: int  # how many ranks hold a typical element
    sliceable: bool  # every piece is one contiguous byte range and no two overlap
    max_rows: int  # most dim-0 indices any rank holds
    max_row_elems: int  # most elements per dim-0 index any rank holds
    min_numel: int  # fewest elements a rank with a non-empty piece holds (0: no such rank)


@dataclass(frozen=True)
class Layout:
    """Where every element of one tensor lives: ``regions[r]`` for group rank ``r``.

    ``None`` means rank ``r`` is outside the tensor's mesh and holds nothing.
    ``regions`` is a tuple, a :class:`LazyRegions` or a :class:`UnionRegions`; properties over all
    ranks are computed once (:attr:`summary`) and in closed form when the
    sharding allows, so they cost O(mesh size) at most, not O(world x tensors).
    """

    shape: tuple[int, ...]
    regions: Sequence[Region | None]

    def __reduce__(self):
        return Layout, (self.shape, self.regions)

    @cached_property
    def holders(self) -> tuple[int, ...]:
        """The ranks on the tensor's mesh (those whose region is not None), sorted."""
        regions = self.regions
        if isinstance(regions, LazyRegions):
            ranks = regions.sharding.ranks
            return ranks if not ranks or ranks[-1] < regions.world else RankTuple(r for r in ranks if r < regions.world)
        if isinstance(regions, UnionRegions):
            return RankTuple(sorted({r for p in regions.parts for r in p.sharding.ranks if r < len(regions)}))
        return RankTuple(r for r, region in enumerate(regions) if region is not None)

    @cached_property
    def summary(self) -> Summary:
        fast = _separable_summary(self)
        return fast if fast is not None else _enumerated_summary(self)

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
        return self.summary.replicated

    @property
    def replication(self) -> int:
        """How many ranks hold a typical element (1 for pure sharding)."""
        return self.summary.replication

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
        return self.summary.sliceable

    def meeting(self, box: Box, replica_of: int | None = None) -> list[tuple[int, Region]]:
        """(any rank) The ranks whose non-empty region meets ``box``, with their regions, sorted by rank.

        ``box`` is one ``[start, end)`` per dim. Costs about one step per rank
        returned, not per rank of the mesh: the walk over mesh dims prunes every
        coordinate whose piece misses the box (:func:`regions_meeting`).

        With ``replica_of``, one rank per distinct region instead of every
        replica: the one sharing ``replica_of``'s coordinates along the mesh's
        replicate dims (the replica 0 when ``replica_of`` is not on the mesh;
        on several disjoint meshes, ``replica_of``'s mesh, else the first).
        So ``replica_of`` itself is chosen for every region it holds.
        """
        regions = self.regions
        if isinstance(regions, LazyRegions):
            return regions_meeting(self.shape, regions.sharding, box, regions.world,
                                   _replica(regions.sharding, replica_of))
        if isinstance(regions, UnionRegions):
            parts = regions.parts if replica_of is None else [_chosen_part(regions, replica_of)]
            out = [hit for p in parts for hit in
                   regions_meeting(self.shape, p.sharding, box, p.world, _replica(p.sharding, replica_of))]
            return sorted(out, key=lambda hit: hit[0])
        hits = [(r, region) for r, region in enumerate(regions) if region is not None and _meets_box(region, box)]
        if replica_of is None:
            return hits
        first: dict = {}  # explicit regions: replica_of where it holds the region, else the lowest holder
        for r, region in hits:
            if region not in first or r == replica_of:
                first[region] = r
        return sorted(((r, region) for region, r in first.items()), key=lambda hit: hit[0])

    def boxes_meeting(self, box: Box, replica_of: int | None = None) -> tuple[list[tuple[int, Box]], bool]:
        """(any rank) Each rank's region clipped to ``box``, as boxes, picked as :meth:`meeting` picks ranks.

        Returns ``(hits, exact)``: ``(rank, sub-box)`` pairs sorted by rank
        (a rank with several intervals along a dim gets one box per
        combination, in row-major order), and whether the boxes are known to
        cover ``box`` exactly once (every separable layout: then callers need
        not count). For a separable layout each rank's box comes from its
        coordinates' pieces clipped once per mesh coordinate, not per rank.
        """
        regions = self.regions
        if isinstance(regions, LazyRegions) and _separable(regions.sharding) and replica_of is not None:
            sh = regions.sharding
            if len(box) != len(self.shape) or any(lo >= hi for lo, hi in box):
                return [], True
            strides = [math.prod(sh.mesh_shape[j + 1:]) for j in range(len(sh.mesh_shape))]
            return _separable_meeting(self.shape, sh, box, regions.world, _replica(sh, replica_of), strides,
                                      clip=True), True
        out: list[tuple[int, Box]] = []
        for rank, region in self.meeting(box, replica_of):
            out.extend((rank, sub) for sub in clipped_boxes(region, box))
        return out, False

    def sends_own(self, rank: int, replica_of: int) -> bool:
        """(any rank) Whether ``meeting(..., replica_of)`` picks ``rank`` for its own region: O(mesh dims)."""
        cache = self.__dict__.setdefault("_sends", {})
        got = cache.get((rank, replica_of))
        if got is None:
            got = cache[(rank, replica_of)] = self._sends_own(rank, replica_of)
        return got

    def _sends_own(self, rank: int, replica_of: int) -> bool:
        regions = self.regions
        if isinstance(regions, UnionRegions):
            part = _chosen_part(regions, replica_of)
            return part._at(rank) is not None and _is_replica(part.sharding, rank, replica_of)
        if isinstance(regions, LazyRegions):
            return regions._at(rank) is not None and _is_replica(regions.sharding, rank, replica_of)
        region = regions[rank]
        if region is None:
            return False
        full = tuple((0, n) for n in self.shape)
        return any(r == rank for r, _ in self.meeting(full, replica_of) if _ == region)


def _enumerated_summary(layout: Layout) -> Summary:
    """The summary by looking at every rank's region (any sharding)."""
    full = tuple(full_ranges(n) for n in layout.shape)
    total = math.prod(layout.shape)
    replicated, held, max_rows, max_row_elems, min_numel = True, 0, 0, 0, 0
    spans: list = []
    for r in range(len(layout.regions)):
        region = layout.regions[r]
        replicated = replicated and region == full
        spans.append(layout.element_range(r))
        if region is None:
            continue
        lengths = [length(x) for x in region]
        n = math.prod(lengths)
        held += n
        if lengths:
            max_rows = max(max_rows, lengths[0])
            max_row_elems = max(max_row_elems, math.prod(lengths[1:]))
        if n and (not min_numel or n < min_numel):
            min_numel = n
    sliceable = all(s is not None for s in spans)
    if sliceable:
        ordered = sorted(s for s in spans if s and s[1] > s[0])  # type: ignore[misc]
        sliceable = all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))
    return Summary(replicated, max(1, -(-held // total)) if total else 1, sliceable, max_rows, max_row_elems,
                   min_numel)


def _separable_summary(layout: Layout) -> Summary | None:
    """The summary in closed form when each tensor dim is split by at most one mesh dim (``Shard``).

    Then a rank's region is a product of independent per-dim pieces, so the
    extremes over ranks are products of per-dim extremes, and looking at one
    mesh dim's ``k`` pieces replaces looking at every rank. None when the
    layout is not of that kind (strided, two mesh dims on one tensor dim,
    scalars, explicit regions): the caller enumerates.
    """
    regions = layout.regions
    if not isinstance(regions, LazyRegions) or not layout.shape:
        return None
    sh, shape = regions.sharding, layout.shape
    split: dict[int, int] = {}  # tensor dim -> mesh size splitting it
    rep = 1
    for pl, k in zip(sh.placements, sh.mesh_shape):
        if pl.kind == "replicate":
            rep *= k
        elif pl.kind == "shard" and pl.dim not in split:
            split[pl.dim] = k
        else:
            return None
    lens = [_piece_lengths(n, split.get(d, 1)) for d, n in enumerate(shape)]
    covers = len(sh.mesh) == regions.world and len(set(sh.mesh)) == regions.world
    replicated = covers and all(ls == {n} for ls, n in zip(lens, shape))
    total = math.prod(shape)
    nonzero = [[x for x in ls if x] for ls in lens]
    min_numel = math.prod(min(nz) for nz in nonzero) if all(nonzero) else 0
    empty = total == 0
    contiguous = all(ls <= {0, n} for ls, n in zip(lens[1:], shape[1:]))
    sliceable = empty or (contiguous and (rep == 1 or min_numel == 0))
    return Summary(replicated, rep if total else 1, sliceable, max(lens[0]),
                   math.prod(max(ls) for ls in lens[1:]), min_numel)


def _piece_lengths(n: int, k: int) -> set[int]:
    """The distinct lengths of the ``k`` pieces ``torch.chunk`` cuts a length-``n`` dim into."""
    size = -(-n // k) if n else 0
    whole = n // size if size else 0
    rest = n - whole * size
    out = {size} if whole else set()
    if rest:
        out.add(rest)
    if whole + (1 if rest else 0) < k:
        out.add(0)
    return out


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
        if pl.kind != "replicate":
            region[pl.dim] = _split(pl, region[pl.dim], sharding.mesh_shape[mdim], coord[mdim])
    return tuple(region)


def _split(pl: Placement, cur: Ranges, k: int, i: int) -> Ranges:
    """Piece ``i`` of ``k`` that placement ``pl`` cuts the ranges ``cur`` (one tensor dim) into."""
    if pl.kind == "shard":
        return take(cur, *chunk_bounds(length(cur), k, i))
    parts: list[Interval] = []  # strided: split into `split` pieces, shard each, keep piece i of every one
    for j in range(pl.split):
        piece = take(cur, *chunk_bounds(length(cur), pl.split, j))
        parts.extend(take(piece, *chunk_bounds(length(piece), k, i)))
    return merge(parts)


def _coords(pl: Placement, cur: Ranges, k: int, lo: int, hi: int) -> range | list[int]:
    """The coordinates along one mesh dim whose piece of ``cur`` can meet ``[lo, hi)``.

    In closed form when ``cur`` is one interval (the usual case: a bisection
    per piece, not a walk over the ``k`` pieces): ``Shard`` cuts it into
    ``k`` pieces, ``_StridedShard`` first into ``split`` parts of ``k``
    pieces each. Every coordinate otherwise.
    """
    if len(cur) != 1 or pl.kind not in ("shard", "strided"):
        return range(k)
    a0, b0 = cur[0]
    if pl.kind == "shard":
        return _coord_range(a0, b0, k, lo, hi)
    got: set[int] = set()
    for j in range(pl.split):
        pa, pb = chunk_bounds(b0 - a0, pl.split, j)
        got.update(_coord_range(a0 + pa, a0 + pb, k, lo, hi))
    return sorted(got)


def _coord_range(a0: int, b0: int, k: int, lo: int, hi: int) -> range:
    """The pieces of ``[a0, b0)`` cut ``k`` ways (as ``torch.chunk``) that can meet ``[lo, hi)``."""
    a, b = max(lo, a0), min(hi, b0)
    if a >= b:
        return range(0)
    size = -(-(b0 - a0) // k)
    return range((a - a0) // size, min(k - 1, (b - 1 - a0) // size) + 1)


def _meets(ranges: Ranges, lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


def _meets_box(region: Region, box: Box) -> bool:
    return all(_meets(r, lo, hi) for r, (lo, hi) in zip(region, box))


def regions_meeting(shape: tuple[int, ...], sharding: Sharding, box: Box, world: int,
                    replica: dict[int, int] | None = None) -> list[tuple[int, Region]]:
    """(any rank) The mesh ranks below ``world`` whose non-empty region meets ``box``, sorted by rank.

    Walks the mesh dims left to right as :func:`local_region` applies them,
    keeping only coordinates whose piece still meets the box, so a row block
    of a ``Shard(0)`` tensor over 16,384 ranks costs a step per rank holding
    rows of it. ``replica`` fixes the coordinate of each replicate mesh dim
    (one replica of every region); None walks them all.
    """
    shape, placements, mesh_shape, mesh = tuple(shape), sharding.placements, sharding.mesh_shape, sharding.mesh
    if len(box) != len(shape) or any(lo >= hi for lo, hi in box):
        return []
    strides = [math.prod(mesh_shape[j + 1:]) for j in range(len(mesh_shape))]
    if _separable(sharding):
        return _separable_meeting(shape, sharding, box, world, replica, strides)
    out: list[tuple[int, Region]] = []
    region = [full_ranges(n) for n in shape]

    def walk(j: int, flat: int) -> None:
        if j == len(placements):
            rank = mesh[flat]
            if rank < world and _meets_box(region, box):  # also drops empty pieces
                out.append((rank, tuple(region)))
            return
        pl, k = placements[j], mesh_shape[j]
        if pl.kind == "replicate":
            for c in (range(k) if replica is None else (replica[j],)):
                walk(j + 1, flat + c * strides[j])
            return
        cur = region[pl.dim]
        lo, hi = box[pl.dim]
        for c in _coords(pl, cur, k, lo, hi):
            piece = _split(pl, cur, k, c)
            if _meets(piece, lo, hi):
                region[pl.dim] = piece
                walk(j + 1, flat + c * strides[j])
        region[pl.dim] = cur

    walk(0, 0)
    out.sort(key=lambda hit: hit[0])
    return out


def clipped_boxes(region: Region, box: Box) -> list[Box]:
    """A region (sorted ranges per dim) clipped to a box, as boxes in row-major order."""
    if all(len(r) == 1 for r in region):  # one interval per dim: one box at most
        out = []
        for ((a, b),), (lo, hi) in zip(region, box):
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                return []
            out.append((a, b))
        return [tuple(out)]
    per_dim = []
    for ranges, (a, b) in zip(region, box):
        got = intersect(ranges, a, b)
        if not got:
            return []
        per_dim.append(got)
    boxes: list[Box] = [()]
    for got in per_dim:
        boxes = [prev + (iv,) for prev in boxes for iv in got]
    return boxes


def _separable(sharding: Sharding) -> bool:
    """Every mesh dim replicates or shards its own tensor dim: a region is one interval per dim, in closed form."""
    got = sharding.__dict__.get("_separable")
    if got is None:
        dims = [pl.dim for pl in sharding.placements if pl.kind != "replicate"]
        got = all(pl.kind in ("shard", "replicate") for pl in sharding.placements) and len(dims) == len(set(dims))
        object.__setattr__(sharding, "_separable", got)
    return got


def _separable_meeting(shape: tuple[int, ...], sharding: Sharding, box: Box, world: int,
                       replica: dict[int, int] | None, strides: list[int], clip: bool = False) -> list:
    """:func:`regions_meeting` for a separable sharding: per mesh dim, the coordinates whose piece meets the
    box, in closed form, then their product (a step per rank returned). With ``clip``, each rank's region
    clipped to the box, as one box (``Box``, not ``Region``)."""
    split = {pl.dim: j for j, pl in enumerate(sharding.placements) if pl.kind == "shard"}
    for d, (n, (lo, hi)) in enumerate(zip(shape, box)):
        if d not in split and not (n > 0 and lo < n and hi > 0):
            return []
    options: list[list[tuple[int, int, Interval | None]]] = []  # per mesh dim: (coordinate, flat step, piece)
    for j, pl in enumerate(sharding.placements):
        k = sharding.mesh_shape[j]
        if pl.kind == "replicate":
            options.append([(c, c * strides[j], None) for c in (range(k) if replica is None else (replica[j],))])
            continue
        n = shape[pl.dim]
        lo, hi = max(box[pl.dim][0], 0), min(box[pl.dim][1], n)
        size = -(-n // k) if n else 0
        if not size or lo >= hi:
            return []
        got = []
        for c in range(lo // size, min(k - 1, (hi - 1) // size) + 1):
            a, b = c * size, min(c * size + size, n)
            if clip:
                a, b = max(a, lo), min(b, hi)
            if a < b:
                got.append((c, c * strides[j], (a, b)))
        options.append(got)
    base: list = list(box) if clip else [full_ranges(n) for n in shape]
    out: list[tuple[int, Region]] = []
    mesh = sharding.mesh
    pieces = [(pl.dim if pl.kind == "shard" else -1) for pl in sharding.placements]
    if len(options) == 1:  # a 1-D mesh, the usual FSDP case: no product to build
        d = pieces[0]
        for _, flat, iv in options[0]:
            rank = mesh[flat]
            if rank < world:
                if d >= 0:
                    base[d] = iv if clip else (iv,)
                out.append((rank, tuple(base)))
    else:
        for combo in itertools.product(*options):
            rank = mesh[sum(step for _, step, _ in combo)]
            if rank < world:
                region = list(base)
                for d, (_, _, iv) in zip(pieces, combo):
                    if d >= 0:
                        region[d] = iv if clip else (iv,)
                out.append((rank, tuple(region)))
    out.sort(key=lambda hit: hit[0])
    return out


def _replica(sharding: Sharding, replica_of: int | None) -> dict[int, int] | None:
    """The replicate mesh dims' coordinates of ``replica_of`` (0 where it is not on the mesh)."""
    if replica_of is None:
        return None
    coord = sharding.coord(replica_of)
    return {j: (coord[j] if coord is not None else 0)
            for j, pl in enumerate(sharding.placements) if pl.kind == "replicate"}


def _is_replica(sharding: Sharding, rank: int, replica_of: int) -> bool:
    coord, want = sharding.coord(rank), _replica(sharding, replica_of)
    return coord is not None and want is not None and all(coord[j] == c for j, c in want.items())


def _chosen_part(regions: UnionRegions, replica_of: int) -> LazyRegions:
    """Of several disjoint meshes each holding the tensor once, ``replica_of``'s, else the first."""
    return next((p for p in regions.parts if p.sharding.coord(replica_of) is not None), regions.parts[0])


def layout_of(shape: tuple[int, ...], sharding: Sharding | Sequence[Sharding], world_size: int) -> Layout:
    """(any rank) Every rank's region of one tensor, each computed when first looked up.

    Several shardings are replicas on disjoint meshes (see :class:`UnionRegions`).
    """
    shape = tuple(shape)
    if isinstance(sharding, Sharding):
        return Layout(shape, LazyRegions(shape, sharding, world_size))
    parts = sorted(set(sharding), key=lambda s: s.ranks)
    if len(parts) == 1:
        return Layout(shape, LazyRegions(shape, parts[0], world_size))
    seen: set[int] = set()
    for s in parts:
        if seen & set(s.ranks):
            raise ValueError(f"rank(s) {sorted(seen & set(s.ranks))} are on two different meshes of one tensor")
        seen |= set(s.ranks)
    return Layout(shape, UnionRegions(tuple(LazyRegions(shape, s, world_size) for s in parts)))
