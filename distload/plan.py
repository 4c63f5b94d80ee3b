"""The load plan: which rank reads which file, and the order bytes travel in.

Pure and deterministic: the coordinator (rank 0) builds the plan once and
sends it to every rank, and all ranks then walk the same ``chunks`` in the
same order, which is what keeps their collectives matched. A plan item says
*what* moves (file, owner, byte range, tensors in it), never *how*, so the
broadcast and scatter paths, gloo, NCCL and MPI all share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import DistLoadError
from .index import Checkpoint, ShardFile

if TYPE_CHECKING:
    from .shard_plan import ShardPlan

DEFAULT_BUCKET_MB = 64
# Tensors this large go straight into their destination. Coalescing them costs
# a second copy into fresh (page-faulting) memory on every rank, which measured
# far more than the extra collectives: 1.9 GB Llama (8 MB attention weights),
# world 2, gloo, 2 cores: 5.70 s median with a quarter bucket (16 MB), 3.32 s with 1 MiB.
DIRECT_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs; exchanged once so the plan can spread files over nodes."""

    rank: int
    host: str
    local_rank: int
    node: str = ""  # what tells nodes apart (hostname, plus the launcher's node rank); default host

    @property
    def node_key(self) -> str:
        return self.node or self.host


@dataclass(frozen=True)
class Piece:
    """A byte range of one tensor carried inside a chunk."""

    name: str
    chunk_offset: int  # where the bytes sit inside the chunk
    tensor_offset: int  # where they go inside the tensor's flat bytes
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One collective's worth of bytes: a contiguous byte range of one file.

    Either several whole small tensors coalesced into a bucket, or one
    bucket-sized segment of a large tensor (``direct``), which receivers can
    take straight into the destination's memory.
    """

    file: int  # index into LoadPlan.files
    owner: int  # the rank that reads these bytes
    start: int  # absolute offset in the file
    nbytes: int
    pieces: tuple[Piece, ...]

    @property
    def direct(self) -> bool:
        return len(self.pieces) == 1


@dataclass(frozen=True)
class LoadPlan:
    """Everything every rank needs to take part in one load."""

    root: str
    world_size: int
    files: tuple[ShardFile, ...]
    owners: tuple[int, ...]  # owners[i] reads files[i]
    chunks: tuple[Chunk, ...]  # the global schedule, identical on every rank
    bucket_bytes: int
    ranks: tuple[RankInfo, ...] = ()
    missing_in_files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> safetensors dtype
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sharded: ShardPlan | None = None  # DTensor destinations (distload.shard_plan), if any

    def files_of(self, rank: int) -> list[ShardFile]:
        return [f for f, o in zip(self.files, self.owners) if o == rank]

    def bytes_of(self, rank: int) -> int:
        return sum(c.nbytes for c in self.chunks if c.owner == rank)

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def describe(self) -> str:
        """A human-readable table of file -> rank and bytes per rank."""
        sh = self.sharded
        n = len(self.chunks)
        moved = f"{self.total_bytes / 1e9:.3f} GB to move in {n} chunk{'' if n == 1 else 's'}"
        if sh is not None:  # the broadcast plan holds only plain tensors; the shards travel as below
            moved = (f"{(self.total_bytes + sh.total_bytes) / 1e9:.3f} GB to move: {sh.total_bytes / 1e9:.3f} GB "
                     f"as shards, {self.total_bytes / 1e9:.3f} GB broadcast in {n} chunk{'' if n == 1 else 's'}")
        lines = [f"plan: {len(self.files)} file(s), {moved} of <= {self.bucket_bytes >> 20} MiB, "
                 f"world {self.world_size}"]
        nodes = {r.rank: f" on {r.node_key}" for r in self.ranks}
        for f, o in zip(self.files, self.owners):
            lines.append(f"  {f.name:<40} {f.size / 1e6:>10.1f} MB -> rank {o}{nodes.get(o, '')}")
        if sh is not None:
            counts = {p: sum(1 for v in sh.policies.values() if v == p) for p in ("scatter", "slice")}
            lines.append(f"sharded: {len(sh.policies)} DTensor(s), read_policy {sh.read_policy} "
                         f"({counts['scatter']} scattered, {counts['slice']} read as slices), "
                         f"{sh.total_bytes / 1e9:.3f} GB in {len(sh.scatters)} scatter(s) "
                         f"and {len(sh.slices)} slice read(s)")
        where = {r.rank: f" (node {r.node_key}, local rank {r.local_rank})" for r in self.ranks}
        for r in range(self.world_size):
            host = where.get(r, "")
            shards = f", {sh.bytes_of(r) / 1e9:.3f} GB of shards" if sh is not None else ""
            lines.append(f"  rank {r}{host}: {len(self.files_of(r))} file(s), {self.bytes_of(r) / 1e9:.3f} GB"
                         f"{shards}")
        return "\n".join(lines)


def assign_files(files: tuple[ShardFile, ...], ranks: list[RankInfo]) -> tuple[int, ...]:
    """Largest file first onto the least-loaded node, then its least-loaded rank.

    Spreading over nodes first uses every node's storage bandwidth; on one node
    this is plain longest-processing-time-first balancing. Ties go to the lowest
    node/rank, so the result depends only on the inputs.
    """
    nodes: dict[str, list[int]] = {}
    for info in sorted(ranks, key=lambda r: r.rank):
        nodes.setdefault(info.node_key, []).append(info.rank)
    node_list = list(nodes.values())
    node_load = [0] * len(node_list)
    rank_load = {r.rank: 0 for r in ranks}
    owners = [0] * len(files)
    order = sorted(range(len(files)), key=lambda i: (-files[i].size, files[i].name))
    for i in order:
        n = min(range(len(node_list)), key=lambda k: (node_load[k], k))
        r = min(node_list[n], key=lambda x: (rank_load[x], x))
        owners[i] = r
        node_load[n] += files[i].size
        rank_load[r] += files[i].size
    return tuple(owners)


def chunk_file(file_idx: int, shard: ShardFile, owner: int, wanted: set[str] | None, bucket_bytes: int) -> list[Chunk]:
    """Cut one file's wanted tensors into bucket-sized chunks, in file order.

    Tensors of at least ``DIRECT_MIN_BYTES`` (or a quarter bucket, if less)
    travel on their own (split into bucket-sized segments) so receivers can
    take them in place; smaller ones are coalesced. Unwanted tensors are
    skipped, never read.
    """
    direct_min = max(min(bucket_bytes // 4, DIRECT_MIN_BYTES), 1)
    out: list[Chunk] = []
    open_start, open_pieces, open_end = 0, [], 0

    def close() -> None:
        nonlocal open_pieces
        if open_pieces:
            out.append(Chunk(file_idx, owner, open_start, open_end - open_start, tuple(open_pieces)))
        open_pieces = []

    for t in shard.tensors:
        if wanted is not None and t.name not in wanted:
            close()
            continue
        begin = shard.data_offset + t.start
        if t.nbytes >= direct_min:
            close()
            for off in range(0, t.nbytes, bucket_bytes):
                n = min(bucket_bytes, t.nbytes - off)
                out.append(Chunk(file_idx, owner, begin + off, n, (Piece(t.name, 0, off, n),)))
            continue
        if open_pieces and (begin != open_end or begin + t.nbytes - open_start > bucket_bytes):
            close()
        if not open_pieces:
            open_start = open_end = begin
        open_pieces.append(Piece(t.name, begin - open_start, 0, t.nbytes))
        open_end = begin + t.nbytes
    close()
    return out


def interleave(streams: dict[int, list[Chunk]]) -> tuple[Chunk, ...]:
    """Merge per-owner chunk lists so every owner's reads stay in flight.

    Always emits next from the owner that has sent the fewest bytes so far,
    so while one owner's chunk is on the wire the others are reading theirs.
    """
    sent = {r: 0 for r in streams}
    pos = {r: 0 for r in streams}
    out: list[Chunk] = []
    live = [r for r in sorted(streams) if streams[r]]
    while live:
        r = min(live, key=lambda x: (sent[x], x))
        c = streams[r][pos[r]]
        out.append(c)
        sent[r] += c.nbytes
        pos[r] += 1
        if pos[r] == len(streams[r]):
            live.remove(r)
    return tuple(out)


def build_plan(
    ckpt: Checkpoint,
    ranks: list[RankInfo],
    *,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    wanted: set[str] | None = None,
) -> LoadPlan:
    """(coordinator) Assign files to ranks and lay out the chunk schedule."""
    if not ranks:
        ranks = [RankInfo(0, "localhost", 0)]
    if not bucket_mb > 0:  # also refuses NaN
        raise DistLoadError(f"bucket_mb must be a positive number of MiB, not {bucket_mb}")
    # A multiple of 64 keeps every segment boundary element-aligned for any dtype.
    bucket_bytes = max(64, int(bucket_mb * (1 << 20)) // 64 * 64)
    owners = assign_files(ckpt.files, ranks)
    streams: dict[int, list[Chunk]] = {}
    for i in sorted(range(len(ckpt.files)), key=lambda i: ckpt.files[i].name):
        streams.setdefault(owners[i], []).extend(chunk_file(i, ckpt.files[i], owners[i], wanted, bucket_bytes))
    dtypes = {t.name: t.dtype for f in ckpt.files for t in f.tensors}
    shapes = {t.name: t.shape for f in ckpt.files for t in f.tensors}
    return LoadPlan(
        root=ckpt.root,
        world_size=len(ranks),
        files=ckpt.files,
        owners=owners,
        chunks=interleave(streams),
        bucket_bytes=bucket_bytes,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)),
        missing_in_files=ckpt.missing_in_files,
        warnings=ckpt.warnings,
        dtypes=dtypes,
        shapes=shapes,
    )
