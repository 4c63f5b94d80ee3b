"""Moving DTensor pieces: owners read and scatter row blocks; ranks read their own slices.

(all ranks) :func:`transfer_sharded` walks the shared :class:`ShardPlan`
after the broadcast schedule. Per scatter chunk, the owner reads the chunk's
bytes (read ahead on the reader thread), cuts every rank's piece out of them
into one padded send buffer, and one ``Comm.scatter_`` hands each rank its
segment, which it writes into its local shard (casting if needed). Slice reads
run on their own reader thread meanwhile, straight into local shards when no
cast is needed.

Memory per rank beyond its local shards: two read buckets and one send
buffer on owners (each about one bucket), plus one receive segment.
"""

from __future__ import annotations

import torch

from .comm import Comm
from .place import byte_view, can_take_direct, torch_dtype, write_piece
from .plan import Chunk, LoadPlan
from .reader import BufferPool, ChunkReader
from .shard import Layout, Ranges
from .shard_plan import ScatterChunk, ShardPlan


def transfer_sharded(comm: Comm, plan: LoadPlan, sp: ShardPlan, dests: dict[str, torch.Tensor],
                     fds: dict[int, int]) -> tuple[int, int]:
    """(all ranks) Fill every rank's local shards. Returns (bytes this rank read, scatters)."""
    rank, device = comm.rank, comm.device
    host = torch.device("cpu")
    on_host = device.type == "cpu"
    mine_slices = [c for c in sp.slices if c.owner == rank and c.nbytes]
    scatters = [c for c in sp.scatters if c.seg_bytes]
    mine = [c for c in scatters if c.owner == rank]

    def direct(chunk: Chunk) -> torch.Tensor | None:
        p = chunk.pieces[0]
        dest = dests[p.name]
        if not can_take_direct(dest, plan.dtypes[p.name], host):
            return None
        return byte_view(dest)[p.tensor_offset : p.tensor_offset + p.nbytes]

    slice_pool = BufferPool(2, plan.bucket_bytes, host, pin=not on_host)
    read_pool = BufferPool(2, plan.bucket_bytes, host, pin=not on_host)
    slicer = ChunkReader(plan, fds, mine_slices, slice_pool, direct)
    reader = ChunkReader(plan, fds, mine, read_pool, lambda c: None)  # type: ignore[arg-type]
    send_pool = BufferPool(1, sp.send_bytes, device)
    recv_pool = BufferPool(1, max((c.seg_bytes for c in scatters), default=0), device)
    stage = None if on_host else BufferPool(1, plan.bucket_bytes, device)
    error: BaseException | None = None
    try:
        for chunk in scatters:
            send = None
            if error is None and chunk.owner == rank:
                try:
                    send = _pack(chunk, reader, read_pool, stage, send_pool, plan, sp, world=comm.world_size)
                except Exception as e:
                    error = e
            if comm.failed_ranks(error is not None):
                comm.raise_agreed("transfer", error)
            target = _landing(chunk, rank, dests, plan, device)
            recv = target if target is not None else recv_pool.acquire(chunk.seg_bytes)
            try:
                comm.scatter_(recv, chunk.owner, send)
                if target is None:
                    for part in chunk.parts[rank]:
                        write_piece(dests[part.name], part.piece, recv, plan.dtypes[part.name])
            except Exception as e:
                error = e
            finally:
                if target is None:
                    recv_pool.release(recv)
                if send is not None:
                    send_pool.release(send)
        if error is None:
            for _ in mine_slices:
                got, buf, pooled, err = slicer.next()
                if err is not None:
                    error = err
                    break
                if pooled:
                    try:
                        write_piece(dests[got.pieces[0].name], got.pieces[0], buf, plan.dtypes[got.pieces[0].name])
                    finally:
                        slice_pool.release(buf)
        comm.agree("transfer", error)
    finally:
        slicer.close()
        reader.close()
    return reader.bytes_read + slicer.bytes_read, len(scatters)


def _landing(chunk: ScatterChunk, rank: int, dests: dict[str, torch.Tensor], plan: LoadPlan,
             device: torch.device) -> torch.Tensor | None:
    """The local shard's own memory when this rank's whole segment is one piece needing no cast.

    That is the common FSDP case (a full-size ``Shard(0)`` row block), and it
    saves receivers a copy.
    """
    parts = chunk.parts[rank]
    if len(parts) != 1 or parts[0].nbytes != chunk.seg_bytes:
        return None
    p = parts[0]
    dest = dests[p.name]
    if not can_take_direct(dest, plan.dtypes[p.name], device):
        return None
    return byte_view(dest)[p.local_offset : p.local_offset + p.nbytes]


def _pack(chunk: ScatterChunk, reader: ChunkReader, read_pool: BufferPool, stage: BufferPool | None,
          send_pool: BufferPool, plan: LoadPlan, sp: ShardPlan, *, world: int) -> torch.Tensor:
    """(owner) Read the chunk and lay every rank's piece into one padded send buffer."""
    got, buf, pooled, err = reader.next()
    if err is not None:
        raise err
    assert got is chunk, "reader and schedule disagree"
    try:
        src = buf
        if stage is not None:  # GPUs: cut pieces on the device, one host-to-device copy per chunk
            src = stage.acquire(chunk.nbytes)
            src.copy_(buf)
        send = send_pool.acquire(chunk.seg_bytes * world)
        try:
            for r, parts in enumerate(chunk.parts):
                seg = send[r * chunk.seg_bytes : (r + 1) * chunk.seg_bytes]
                for part in parts:
                    slab = chunk.slabs[part.slab]
                    layout = sp.layouts[part.name]
                    dtype = torch_dtype(plan.dtypes[part.name])
                    rows = slab.rows[1] - slab.rows[0]
                    raw = src[slab.chunk_offset : slab.chunk_offset + rows * _row_bytes(layout, dtype)]
                    if raw.storage_offset() % dtype.itemsize:
                        raw = raw.clone()  # reinterpreting needs element alignment
                    block = raw.view(dtype).view(rows, *layout.shape[1:])
                    piece = _select(block, part.rows, slab.rows[0], layout.regions[r])  # type: ignore[arg-type]
                    out = seg[part.seg_offset : part.seg_offset + part.nbytes].view(dtype).view(piece.shape)
                    out.copy_(piece)
        except BaseException:
            send_pool.release(send)
            raise
        finally:
            if stage is not None:
                stage.release(src)
        return send
    finally:
        if pooled:
            read_pool.release(buf)


def _row_bytes(layout: Layout, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in layout.shape[1:]:
        n *= d
    return n


def _select(block: torch.Tensor, rows: Ranges, first_row: int, region: tuple[Ranges, ...]) -> torch.Tensor:
    """The rank's piece of a row block: its rows, then its ranges along every other dim."""
    out = _pick(block, 0, tuple((a - first_row, b - first_row) for a, b in rows))
    for d, ranges in enumerate(region[1:], start=1):
        if ranges != ((0, block.shape[d]),):
            out = _pick(out, d, ranges)
    return out


def _pick(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    if len(ranges) == 1:
        a, b = ranges[0]
        return t.narrow(dim, a, b - a)  # a view: the copy into the send buffer does the gather
    index = torch.cat([torch.arange(a, b, device=t.device) for a, b in ranges])
    return t.index_select(dim, index)
