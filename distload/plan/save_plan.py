"""The save plan: which tensors go into which file, which rank writes each file,
and the chunks the bytes travel in. The load plan, run backwards.

Pure and deterministic (no torch, no processes). The coordinator builds a
:class:`SavePlan` once from the model's metadata and sends it to every rank;
each rank then derives its own part of each chunk from the plan and the
tensors' shardings, so the plan stays the same size whatever the world size.
A rank that holds shards computes only what it sends (:func:`own_parts`,
a few steps per piece); a file's writer computes who sends it what
(:func:`contributions`), walking only the ranks whose shards meet each
piece. No rank looks at every rank's region of every piece.

An output tensor is a *box* of one state-dict tensor (its ``source``): the
whole tensor for a plain parameter, or for example one expert's rows of a
fused MoE tensor. Every chunk is a contiguous byte range of one file, made
of boxes of one or more output tensors; the file's writer assembles it in a
staging buffer from its own memory and from the pieces other ranks send it,
then writes it at its offset.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from functools import cached_property

from ..errors import DistLoadError
from .items import RankInfo, interleave
from .load_plan import assign_files
from .shard import Layout, Sharding, clipped_boxes, layout_of, position

Box = tuple[tuple[int, int], ...]  # [start, end) along every dim of the source tensor
Part = tuple[int, Box]  # (piece index in its chunk, sub-box in source coordinates)

INDEX_NAME = "model.safetensors.index.json"
FILE_PATTERN = "model-{:05d}-of-{:05d}.safetensors"
# Bytes per element of each safetensors dtype a model can hold.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# Tensors this large never share a chunk: their blocks go straight from the
# source into the staging buffer (or from the writer's own memory to disk).
ALONE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the written checkpoint: a box of one state-dict tensor."""

    name: str  # key in the checkpoint
    source: str  # the state-dict key that holds its values
    dtype: str  # safetensors dtype written (after any cast)
    shape: tuple[int, ...]  # shape written
    box: Box  # which elements of ``source``, in its coordinates

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class FileSpec:
    """One safetensors file: its tensors in data order and its precomputed header."""

    name: str
    tensors: tuple[int, ...]  # indices into SavePlan.tensors, in data order
    offsets: tuple[int, ...]  # absolute file offset of each tensor's first byte
    header: bytes  # the 8-byte length, the JSON and its padding
    size: int  # the whole file


@dataclass(frozen=True)
class Piece:
    """A block of one output tensor inside a chunk: ``box`` is in source coordinates."""

    tensor: int  # index into SavePlan.tensors
    box: Box
    offset: int  # byte offset inside the chunk


@dataclass(frozen=True)
class Chunk:
    """One contiguous byte range of one file, assembled by its writer in one buffer.

    ``remote`` chunks hold pieces of sharded tensors: other ranks send their
    parts to the writer. The rest the writer writes from its own memory.
    """

    file: int
    writer: int
    offset: int  # absolute offset in the file
    nbytes: int
    pieces: tuple[Piece, ...]
    remote: bool


@dataclass(frozen=True)
class SavePlan:
    """Everything every rank needs to take part in one save."""

    world_size: int
    tensors: tuple[OutTensor, ...]
    files: tuple[FileSpec, ...]
    writers: tuple[int, ...]  # writers[i] writes files[i]
    chunks: tuple[Chunk, ...]  # the global schedule, the same on every rank
    shardings: dict[str, Sharding]  # DTensor sources; sources not here are plain, held whole by every rank
    shapes: dict[str, tuple[int, ...]]  # every source's global shape
    bucket_bytes: int
    stage: str  # the hidden directory the files are written in, beside the target
    ranks: tuple[RankInfo, ...] = ()  # every rank's place, on the coordinator only: it does not travel

    def __reduce__(self):
        return SavePlan, (self.world_size, self.tensors, self.files, self.writers, self.chunks, self.shardings,
                          self.shapes, self.bucket_bytes, self.stage)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def files_of(self, rank: int) -> list[int]:
        return [i for i, w in enumerate(self.writers) if w == rank]

    def bytes_of(self, rank: int) -> int:
        return sum(self.files[i].size for i in self.files_of(rank))

    def weight_map(self) -> dict[str, str]:
        return {self.tensors[t].name: f.name for f in self.files for t in f.tensors}

    def index_json(self) -> str:
        """The index, written last: what makes the directory a checkpoint."""
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map().items()))}
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @cached_property
    def _layouts(self) -> dict:
        return {}

    def layout(self, source: str) -> Layout | None:
        """(any rank) Every rank's region of a DTensor source; None when plain.

        One Layout per distinct (shape, sharding), made on first use: thousands
        of sources share a few, and each computes its summary once.
        """
        sh = self.shardings.get(source)
        if sh is None:
            return None
        cache = self._layouts
        got = cache.get(source)
        if got is None:
            key = (self.shapes[source], sh)
            got = cache.get(key)
            if got is None:
                got = cache[key] = layout_of(self.shapes[source], sh, self.world_size)
            cache[source] = got
        return got

    def own_region(self, tensor: int, rank: int):
        """(any rank) ``rank``'s region of output tensor ``tensor``'s source when it may send shards of it:
        None for plain and fully replicated sources (the writer has those) and where it holds nothing."""
        cache = self.__dict__.setdefault("_own", {})
        key = (tensor, rank)
        if key not in cache:
            layout = self.layout(self.tensors[tensor].source)
            cache[key] = None if layout is None or layout.replicated else layout.regions[rank]
        return cache[key]

    def describe(self) -> str:
        lines = [f"save plan: {len(self.tensors)} tensor(s), {self.total_bytes / 1e9:.3f} GB in {len(self.files)} "
                 f"file(s), {len(self.chunks)} chunk(s) of <= {self.bucket_bytes >> 20} MiB "
                 f"({sum(c.remote for c in self.chunks)} gathered from shards), world {self.world_size}"]
        for f, w in zip(self.files, self.writers):
            lines.append(f"  {f.name:<40} {f.size / 1e6:>10.1f} MB <- rank {w}")
        return "\n".join(lines)


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20, as transformers reads ``max_shard_size``."""
    if isinstance(size, int):
        if size <= 0:
            raise DistLoadError(f"max_shard_size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise DistLoadError(f"max_shard_size must be bytes or a size like '5GB' or '500MiB', not {size!r}")
    unit = m.group(2)
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return max(1, int(float(m.group(1)) * base**power))


def split_files(tensors: list[OutTensor], max_shard_size: int) -> list[list[int]]:
    """The file split ``save_pretrained`` makes (huggingface_hub's rule): tensors in order, a new file
    when the next would pass ``max_shard_size``; a tensor larger than that gets a file of its own."""
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        if t.nbytes > max_shard_size:
            shards.append([i])
            continue
        if current and size + t.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def file_spec(name: str, tensors: tuple[OutTensor, ...], members: list[int]) -> FileSpec:
    """A file's header and offsets. Data is ordered as safetensors orders it (wider dtypes first, then by
    name), which keeps every tensor aligned to its element size."""
    order = sorted(members, key=lambda i: (-ITEMSIZE[tensors[i].dtype], tensors[i].name))
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    rel = []
    for i in order:
        t = tensors[i]
        meta[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        rel.append(pos)
        pos += t.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    header = struct.pack("<Q", len(raw)) + raw
    return FileSpec(name, tuple(order), tuple(len(header) + r for r in rel), header, len(header) + pos)


def row_blocks(t: OutTensor, bucket_bytes: int) -> list[tuple[Box, int]]:
    """Cut one tensor's box into blocks of whole rows of its first non-trivial dim, each at most
    ``bucket_bytes`` (at least one row). Returns (block box, byte offset inside the tensor)."""
    dims = [d for d, (a, b) in enumerate(t.box) if b - a > 1]
    if not dims or t.nbytes <= bucket_bytes:
        return [(t.box, 0)]
    d = dims[0]
    inner = math.prod(b - a for a, b in t.box[d + 1:]) * ITEMSIZE[t.dtype]
    rows = max(1, bucket_bytes // max(inner, 1))
    a0, b0 = t.box[d]
    out = []
    for a in range(a0, b0, rows):
        box = t.box[:d] + ((a, min(a + rows, b0)),) + t.box[d + 1:]
        out.append((box, (a - a0) * inner))
    return out


def chunk_file(file_idx: int, spec: FileSpec, writer: int, tensors: tuple[OutTensor, ...],
               sharded: set[str], bucket_bytes: int) -> list[Chunk]:
    """One file's chunks in file order: small tensors coalesced up to a bucket, large ones cut into
    row blocks of at most a bucket (or one row)."""
    alone = max(min(bucket_bytes // 4, ALONE_MIN_BYTES), 1)
    out: list[Chunk] = []
    open_pieces: list[Piece] = []
    open_start = open_end = 0

    def close() -> None:
        nonlocal open_pieces
        if open_pieces:
            remote = any(tensors[p.tensor].source in sharded for p in open_pieces)
            out.append(Chunk(file_idx, writer, open_start, open_end - open_start, tuple(open_pieces), remote))
        open_pieces = []

    for i, off in zip(spec.tensors, spec.offsets):
        t = tensors[i]
        if t.nbytes == 0:
            continue
        if t.nbytes >= alone:
            close()
            for box, rel in row_blocks(t, bucket_bytes):
                n = math.prod(b - a for a, b in box) * ITEMSIZE[t.dtype]
                out.append(Chunk(file_idx, writer, off + rel, n, (Piece(i, box, 0),), t.source in sharded))
            continue
        if open_pieces and off + t.nbytes - open_start > bucket_bytes:
            close()
        if not open_pieces:
            open_start = off
        open_pieces.append(Piece(i, t.box, off - open_start))
        open_end = off + t.nbytes
    close()
    return out


def build_plan(tensors: list[OutTensor], shardings: dict[str, Sharding], shapes: dict[str, tuple[int, ...]],
               ranks: list[RankInfo], *, max_shard_size: int, bucket_bytes: int, stage: str) -> SavePlan:
    """(coordinator) Files of at most ``max_shard_size``, writers balanced by bytes over nodes, chunks."""
    if bucket_bytes <= 0:
        raise DistLoadError(f"bucket_mb must be a positive number of MiB, not {bucket_bytes / 2**20}")
    bucket_bytes = max(64, bucket_bytes // 64 * 64)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DistLoadError(f"two tensors would be saved under the same name: {', '.join(dup[:8])}")
    for t in tensors:
        if t.dtype not in ITEMSIZE:
            raise DistLoadError(f"{t.name}: dtype {t.dtype} cannot be written to safetensors by distload")
    split = split_files(tensors, max_shard_size)
    frozen = tuple(tensors)
    files = tuple(file_spec(FILE_PATTERN.format(k + 1, len(split)), frozen, members)
                  for k, members in enumerate(split))
    world = max(len(ranks), 1)
    ranks = ranks or [RankInfo(0, "localhost", 0)]
    writers = assign_files(files, ranks)  # type: ignore[arg-type]  # duck-typed: name and size
    # One Sharding object per distinct value, so the pickled plan shares them.
    interned: dict[Sharding, Sharding] = {}
    shardings = {k: interned.setdefault(v, v) for k, v in shardings.items()}
    sharded = set(shardings)
    streams: dict[int, list[Chunk]] = {}
    for i, (spec, w) in enumerate(zip(files, writers)):
        streams.setdefault(w, []).extend(chunk_file(i, spec, w, frozen, sharded, bucket_bytes))
    return SavePlan(world, frozen, files, writers, interleave(streams), shardings, dict(shapes), bucket_bytes,
                    stage, tuple(sorted(ranks, key=lambda r: r.rank)))


# ---- who sends what (every rank derives this from the plan) ---------------------------------------


def sub_boxes(region: tuple, box: Box) -> list[Box]:
    """The intersection of a rank's region (sorted ranges per dim) with a box, as boxes in row-major order."""
    return clipped_boxes(region, box)


def local_box(region: tuple, box: Box) -> Box:
    """A global sub-box (inside one rank's region) in that rank's local tensor coordinates."""
    out = []
    for ranges, (a, b) in zip(region, box):
        start = position(ranges, a)
        out.append((start, start + b - a))
    return tuple(out)


def contributions(plan: SavePlan, chunk: Chunk) -> dict[int, list[Part]]:
    """(the chunk's writer) Which rank sends which sub-boxes of each piece, in the order they travel.

    A plain source is served whole by the writer. For a DTensor, each distinct
    region that meets the piece is sent by one of the ranks holding it: the
    writer when it is one of them (no traffic), else the replica sharing the
    writer's coordinates on the mesh's replicate dims (so a replicated mesh
    dim spreads the sending over its replicas as the writers spread). Only
    the ranks whose region meets the piece are looked at
    (:meth:`~distload.plan.shard.Layout.meeting`). A rank's parts travel as
    one message, concatenated in this order, which :func:`own_parts` gives
    each sender alike.
    """
    out: dict[int, list[Part]] = {}
    for k, piece in enumerate(chunk.pieces):
        t = plan.tensors[piece.tensor]
        layout = plan.layout(t.source)
        if layout is None or layout.replicated:
            out.setdefault(chunk.writer, []).append((k, piece.box))
            continue
        hits, exact = layout.boxes_meeting(piece.box, replica_of=chunk.writer)
        for src, sub in hits:
            got = out.get(src)
            if got is None:
                got = out[src] = []
            got.append((k, sub))
        if not exact and sum(math.prod(b - a for a, b in sub) for _, sub in hits) != \
                math.prod(b - a for a, b in piece.box):
            raise DistLoadError(f"{t.source}: its shards do not cover each element exactly once "
                                f"(placements {plan.shardings[t.source].placements}); cannot save it")
    return {r: out[r] for r in sorted(out)}


def own_parts(plan: SavePlan, chunk: Chunk, rank: int) -> list[Part]:
    """(a rank other than the chunk's writer) What it sends the writer: its own region's sub-boxes of each
    piece it is chosen to send (see :func:`contributions`), from its own region alone."""
    mine: list[Part] = []
    for k, piece in enumerate(chunk.pieces):
        region = plan.own_region(piece.tensor, rank)
        if region is not None and plan.layout(plan.tensors[piece.tensor].source).sends_own(rank, chunk.writer):
            mine.extend((k, sub) for sub in sub_boxes(region, piece.box))
    return mine
