"""The load plan: which rank reads which file, and the order bytes travel in.

Pure and deterministic: the coordinator (rank 0) decides the plan once and
sends it to every rank, and all ranks then walk the same ``chunks`` in the
same order, which is what keeps their collectives matched. A plan item says
*what* moves (file, owner, byte range, tensors in it), never *how*, so the
broadcast and scatter paths, gloo, NCCL and MPI all share it.

Note on size:
    The plan travels as its inputs only: the validated file headers, the
    file -> rank assignment, which tensors move (a bitmap) and the sharded
    half's inputs (:mod:`distload.plan.shard_plan`), zlib-compressed inside its
    pickle. Each rank derives ``chunks``, ``dtypes`` and ``shapes`` from them
    on first use, with the same code the coordinator would run, so every rank
    gets the same schedule. Of the rank table only the file owners' entries
    travel, so the bytes each rank receives do not grow with the world size
    (about 0.6 MB for DeepSeek-V3's 92k tensors; ``--dry-run --world N``
    measures it).
"""

from __future__ import annotations

import pickle
import zlib
from array import array
from dataclasses import dataclass
from functools import cached_property

from ..errors import DistLoadError
from ..format.header import Checkpoint, ShardFile, TensorEntry
from .items import Chunk, Piece, RankInfo, interleave
from .shard_plan import ShardPlan

DEFAULT_BUCKET_MB = 64
# Tensors this large go straight into their destination. Coalescing them costs
# a second copy into fresh (page-faulting) memory on every rank, which measured
# far more than the extra collectives: 1.9 GB Llama (8 MB attention weights),
# world 2, gloo, 2 cores: 5.70 s median with a quarter bucket (16 MB), 3.32 s with 1 MiB.
DIRECT_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadPlan:
    """Everything every rank needs to take part in one load.

    ``chunks``, ``dtypes`` and ``shapes`` are derived from the fields on
    first use (see the module note).
    """

    root: str
    world_size: int
    files: tuple[ShardFile, ...]
    owners: tuple[int, ...]  # owners[i] reads files[i]
    bucket_bytes: int
    ranks: tuple[RankInfo, ...] = ()  # every rank's on the coordinator; the file owners' after transport
    missing_in_files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    moved: bytes | None = None  # bitmap over the tensors in file order: which ones the broadcast moves; None: all
    sharded: ShardPlan | None = None  # DTensor destinations (distload.plan.shard_plan), if any
    conversions: tuple[str, ...] = ()  # how checkpoint keys map onto the model (distload.plan.keys), for --dry-run
    op_ranks: tuple[int, ...] = ()  # the rank that runs each gathered conversion, in KeyMap order (distload.plan.op_plan)

    def __reduce__(self):
        owners = set(self.owners)
        sp = self.sharded
        sharded = None if sp is None else (sp.read_policy, sp.world_size, sp.bucket_bytes, sp.local_storage,
                                           sp.table, sp.which)
        state = (self.root, self.world_size, _pack_files(self.files), self.owners, self.bucket_bytes,
                 tuple(r for r in self.ranks if r.rank in owners), self.missing_in_files, self.warnings,
                 self.moved, sharded, self.op_ranks)
        return _unpack_plan, (zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 6),)

    @cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        """The global schedule, identical on every rank."""
        wanted = None if self.moved is None else set(_selected(self.files, self.moved))
        streams: dict[int, list[Chunk]] = {}
        for i in sorted(range(len(self.files)), key=lambda i: self.files[i].name):
            streams.setdefault(self.owners[i], []).extend(
                chunk_file(i, self.files[i], self.owners[i], wanted, self.bucket_bytes))
        return interleave(streams)

    @cached_property
    def dtypes(self) -> dict[str, str]:
        """tensor name -> safetensors dtype, for every tensor of the checkpoint."""
        return {t.name: t.dtype for f in self.files for t in f.tensors}

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for f in self.files for t in f.tensors}

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
        lines.extend(f"keys: {line}" for line in self.conversions)
        if self.op_ranks:
            runs: dict[int, int] = {}
            for r in self.op_ranks:
                runs[r] = runs.get(r, 0) + 1
            lines.append(f"gathered conversions: {len(self.op_ranks)}, each run by one rank ("
                         + ", ".join(f"rank {r}: {n}" for r, n in sorted(runs.items())) + ")")
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



def _selected(files: tuple[ShardFile, ...], mask: bytes):
    """The names whose bit is set in ``mask``, over the tensors in file order."""
    k = 0
    for f in files:
        for t in f.tensors:
            if mask[k >> 3] >> (k & 7) & 1:
                yield t.name
            k += 1


def tensor_mask(files: tuple[ShardFile, ...], wanted: set[str] | frozenset[str]) -> bytes:
    """The bitmap of ``wanted`` over the tensors in file order (what ``LoadPlan.moved`` holds)."""
    names = [t.name for f in files for t in f.tensors]
    mask = bytearray((len(names) + 7) // 8)
    for k, name in enumerate(names):
        if name in wanted:
            mask[k >> 3] |= 1 << (k & 7)
    return bytes(mask)


def _pack_files(files: tuple[ShardFile, ...]) -> list[tuple]:
    """Headers as columns, equal dtypes and shapes shared: smaller and faster to unpickle than 92k objects."""
    shared: dict = {}
    out = []
    for f in files:
        ts = f.tensors
        out.append((f.name, f.size, f.data_offset, [t.name for t in ts],
                    [shared.setdefault(t.dtype, t.dtype) for t in ts],
                    [shared.setdefault(t.shape, t.shape) for t in ts],
                    array("q", [t.start for t in ts]), array("q", [t.end for t in ts]), f.version))
    return out


def _unpack_files(packed: list[tuple]) -> tuple[ShardFile, ...]:
    return tuple(ShardFile(name, size, offset, tuple(map(TensorEntry, names, dtypes, shapes, starts, ends)), version)
                 for name, size, offset, names, dtypes, shapes, starts, ends, version in packed)


def _unpack_plan(blob: bytes) -> LoadPlan:
    root, world, packed, owners, bucket, ranks, missing, warnings, moved, sharded, op_ranks = pickle.loads(
        zlib.decompress(blob))
    files = _unpack_files(packed)
    sp = None if sharded is None else ShardPlan(*sharded[:4], files, owners, *sharded[4:])
    return LoadPlan(root, world, files, owners, bucket, ranks, missing, warnings, moved, sp, op_ranks=op_ranks)


def wire_bytes(plan: LoadPlan) -> int:
    """What one rank receives for ``plan``: the size of its pickle, as the broadcast sends it."""
    return len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))


def build_plan(
    ckpt: Checkpoint,
    ranks: list[RankInfo],
    *,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    wanted: set[str] | None = None,
) -> LoadPlan:
    """(coordinator) Assign files to ranks; each rank derives the chunk schedule from the result."""
    if not ranks:
        ranks = [RankInfo(0, "localhost", 0)]
    if not bucket_mb > 0:  # also refuses NaN
        raise DistLoadError(f"bucket_mb must be a positive number of MiB, not {bucket_mb}")
    # A multiple of 64 keeps every segment boundary element-aligned for any dtype.
    bucket_bytes = max(64, int(bucket_mb * (1 << 20)) // 64 * 64)
    return LoadPlan(
        root=ckpt.root,
        world_size=len(ranks),
        files=ckpt.files,
        owners=assign_files(ckpt.files, ranks),
        bucket_bytes=bucket_bytes,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)),
        missing_in_files=ckpt.missing_in_files,
        warnings=ckpt.warnings,
        moved=None if wanted is None else tensor_mask(ckpt.files, wanted),
    )
