"""The one transfer loop: every rank walks one schedule of broadcast, scatter and slice steps.

(all ranks) :func:`transfer` moves every byte the plan lists into this
rank's :class:`~distload.place.Placement`. The schedule (:func:`schedule`)
is pure and the same on every rank; each :class:`Step` has a kind:

- ``broadcast``: the owner reads a plan :class:`~distload.plan.Chunk` and
  every rank receives all of it (replicated tensors);
- ``scatter``: the owner reads a
  :class:`~distload.shard_plan.ScatterChunk`, cuts it into one padded
  segment per rank (:func:`distload.scatter.pack`) and one scatter over the
  chunk's own ranks hands each its segment (DTensor shards);
- ``slice``: a rank reads its own piece of a tensor; no collective.

Per step, owners read (on a reader thread, ahead of the loop) and every
rank finds where the bytes land, all inside one ``try``; then a tiny status
all-reduce lets every rank agree that nothing failed before the data
collective, so no rank is left blocked in a collective another rank
skipped. The loop asks the placement only two things: ``resolve`` (can
these bytes land in the destination's own memory?) and ``commit`` (they
landed in a buffer: put them in place). Casts, DTensor local shards, tied
names and key conversions stay behind those two calls; the transport never
sees the placement and the placement never sees the transport.

Note on memory (every rank, beyond its destination tensors; B = one bucket,
or the largest scatter chunk or segment when bigger):
    - CPU: a pool of 2 B that holds reads (read one ahead of the collective)
      and received chunks and segments; scatter owners add one send buffer
      (``ScatterChunk.send_bytes``: one segment per rank of the tensor's
      mesh, about B); ranks reading their own slices with a cast add 1 B.
    - CUDA: 2 B of pinned host memory for reads (+1 B for slice reads); on
      the GPU one B for receiving and staging, plus the send buffer on
      scatter owners.
    :attr:`Transfer.buffer_bytes` counts what this rank's pools allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Comm
from .errors import add_context
from .place import Placement
from .plan import Chunk, LoadPlan
from .reader import BufferPool, ChunkReader
from .scatter import pack
from .shard_plan import ScatterChunk

BROADCAST, SCATTER, SLICE = "broadcast", "scatter", "slice"


@dataclass(frozen=True)
class Step:
    """One item of the schedule: what moves (``item``) and how (``kind``)."""

    kind: str
    item: Chunk | ScatterChunk


def schedule(plan: LoadPlan) -> tuple[Step, ...]:
    """(pure, every rank alike) Broadcasts, then scatters, then each rank's own slice reads."""
    steps = [Step(BROADCAST, c) for c in plan.chunks if c.nbytes]
    sp = plan.sharded
    if sp is not None:
        steps += [Step(SCATTER, c) for c in sp.scatters if c.seg_bytes]
        steps += [Step(SLICE, c) for c in sp.slices if c.nbytes]
    return tuple(steps)


def transfer(comm: Comm, plan: LoadPlan, placement: Placement, fds: dict[int, int],
             progress=None, io_threads: int | None = None) -> tuple[int, int, int]:
    """(all ranks) Run the schedule. Returns (bytes this rank read, collectives, buffer bytes)."""
    t = Transfer(comm, plan, placement, fds, progress, io_threads)
    return t.run(), t.collectives, t.buffer_bytes


class Transfer:
    """One rank's walk through the schedule. ``run`` is collective."""

    def __init__(self, comm: Comm, plan: LoadPlan, placement: Placement, fds: dict[int, int], progress=None,
                 io_threads: int | None = None):
        self.comm, self.plan, self.placement, self.fds, self.progress = comm, plan, placement, fds, progress
        self.io_threads = io_threads
        self.steps = schedule(plan)
        self.collectives = sum(1 for s in self.steps if s.kind != SLICE)
        self.buffer_bytes = 0

    # ---- setup ----------------------------------------------------------------

    def _groups(self) -> dict[tuple[int, ...], Comm | None]:
        """(all ranks, in schedule order) The transport of each scatter's ranks (None where not a member)."""
        out: dict[tuple[int, ...], Comm | None] = {}
        if self.comm.has_subgroups:
            for s in self.steps:
                if s.kind == SCATTER and s.item.ranks not in out:
                    out[s.item.ranks] = self.comm.subgroup(s.item.ranks)
        return out

    def _pools(self) -> None:
        rank, device, bucket = self.comm.rank, self.comm.device, self.plan.bucket_bytes
        host = torch.device("cpu")
        on_host = device.type == "cpu"
        mine = [s for s in self.steps if s.item.owner == rank]
        reads = [s.item.nbytes for s in mine if s.kind != SLICE]
        segs = [s.item.seg_bytes for s in self.steps if s.kind == SCATTER]
        sends = [s.item.seg_bytes * self._segments(s.item) for s in mine if s.kind == SCATTER]
        slices = [s.item.nbytes for s in mine if s.kind == SLICE]
        read_bytes = max([bucket, *reads])
        land_bytes = max([bucket, *segs] + ([] if on_host else reads))
        self.read = BufferPool(2, max(read_bytes, land_bytes) if on_host else read_bytes, host, pin=not on_host)
        # On CPU reads and receives share one pool; on GPU chunks land in (and
        # owners stage through) one device buffer.
        self.land = self.read if on_host else BufferPool(1, land_bytes, device)
        self.send = BufferPool(1, max([0, *sends]), device)
        self.slice = BufferPool(1, max([0, *slices]), host, pin=not on_host)

    def _segments(self, chunk: ScatterChunk) -> int:
        return len(chunk.ranks) if self.comm.has_subgroups else self.comm.world_size

    # ---- the loop -------------------------------------------------------------

    def run(self) -> int:
        comm, rank = self.comm, self.comm.rank
        self.groups = self._groups()
        self._pools()
        host = torch.device("cpu")
        on_host = comm.device.type == "cpu"

        def read_target(chunk) -> torch.Tensor | None:
            if isinstance(chunk, Chunk) and chunk.direct and on_host:
                p = chunk.pieces[0]
                return self.placement.resolve(p.name, p.tensor_offset, p.nbytes, host)
            return None

        def slice_target(chunk: Chunk) -> torch.Tensor | None:
            p = chunk.pieces[0]
            return self.placement.resolve(p.name, p.tensor_offset, p.nbytes, host)

        mine = [s for s in self.steps if s.item.owner == rank]
        self.reader = ChunkReader(self.plan, self.fds, [s.item for s in mine if s.kind != SLICE], self.read,
                                  read_target, io_threads=self.io_threads)
        self.slicer = ChunkReader(self.plan, self.fds, [s.item for s in mine if s.kind == SLICE], self.slice,
                                  slice_target, io_threads=self.io_threads)
        error: BaseException | None = None
        try:
            for step in self.steps:
                if step.kind == SLICE:
                    if step.item.owner == rank and error is None:
                        try:
                            self._slice(step.item)
                        except Exception as e:
                            error = e
                    continue
                move = self._broadcast if step.kind == BROADCAST else self._scatter
                error = move(step.item, error)
                if self.progress is not None:
                    self.progress.update(step.item.nbytes)
            comm.agree("transfer", error)
        finally:
            self.slicer.close()
            self.reader.close()
            self.buffer_bytes = sum(p.allocated_bytes for p in {id(p): p for p in (
                self.read, self.land, self.send, self.slice)}.values())
        return self.reader.bytes_read + self.slicer.bytes_read

    def _agree_before(self, error: BaseException | None) -> None:
        """(all ranks) The status exchange before a data collective: raise everywhere if any rank failed."""
        if self.comm.failed_ranks(error is not None):
            self.comm.raise_agreed("transfer", error)

    # ---- broadcast ---------------------------------------------------------------

    def _broadcast(self, chunk: Chunk, error: BaseException | None) -> BaseException | None:
        buf, landed, held = None, False, []
        if error is None:
            try:
                buf, landed = self._broadcast_source(chunk, held)
            except Exception as e:
                error = e
        self._agree_before(error)
        try:
            self.comm.broadcast_(buf, chunk.owner)
            if not landed:
                try:
                    self._commit(chunk, chunk.pieces, buf)
                except Exception as e:
                    error = e
        finally:
            for pool, b in held:
                pool.release(b)
        return error

    def _broadcast_source(self, chunk: Chunk, held: list) -> tuple[torch.Tensor, bool]:
        """(every rank) The buffer passed to the broadcast, and whether it is the destination itself.

        Owners get the chunk from the reader (moving it to the device on
        GPUs); receivers take the destination's own memory when they can.
        """
        device = self.comm.device
        target = None
        if chunk.direct:
            p = chunk.pieces[0]
            target = self.placement.resolve(p.name, p.tensor_offset, p.nbytes, device)
        if chunk.owner == self.comm.rank:
            buf, pooled = self._next(self.reader, chunk)
            if device.type == "cpu":
                if pooled:
                    held.append((self.read, buf))
                return buf, not pooled
            try:
                dev = target
                if dev is None:
                    dev = self.land.acquire(chunk.nbytes)
                    held.append((self.land, dev))
                dev.copy_(buf)  # synchronous: the pinned buffer can be reused at once
            finally:
                if pooled:
                    self.read.release(buf)
            return dev, target is not None
        if target is not None:
            return target, True
        buf = self.land.acquire(chunk.nbytes)
        held.append((self.land, buf))
        return buf, False

    # ---- scatter -------------------------------------------------------------------

    def _scatter(self, chunk: ScatterChunk, error: BaseException | None) -> BaseException | None:
        rank = self.comm.rank
        if self.comm.has_subgroups:
            slot = {r: i for i, r in enumerate(chunk.ranks)}
            sub = self.groups.get(chunk.ranks)
        else:  # the transport scatters over the whole group: ranks outside get padding
            slot = {r: r for r in range(self.comm.world_size)}
            sub = self.comm
        send, recv, landed, held = None, None, False, []
        if error is None:
            try:
                if chunk.owner == rank:
                    send = self._pack(chunk, slot, held)
                if rank in slot:
                    recv, landed = self._landing(chunk, held)
            except Exception as e:
                error = e
        self._agree_before(error)
        try:
            if rank in slot:
                assert sub is not None, "a scatter group was not made"
                sub.scatter_(recv, slot[chunk.owner], send)
                if not landed:
                    try:
                        self._commit(chunk, [p.piece for p in chunk.parts[rank]], recv)
                    except Exception as e:
                        error = e
        finally:
            for pool, b in held:
                pool.release(b)
        return error

    def _pack(self, chunk: ScatterChunk, slot: dict[int, int], held: list) -> torch.Tensor:
        """(owner) Read the chunk and lay every rank's piece into its segment of one send buffer."""
        buf, pooled = self._next(self.reader, chunk)
        stage = None
        try:
            src = buf
            if self.comm.device.type != "cpu":  # cut pieces on the device: one host-to-device copy per chunk
                stage = src = self.land.acquire(chunk.nbytes)
                src.copy_(buf)
            send = self.send.acquire(chunk.seg_bytes * len(slot))
            held.append((self.send, send))
            assert self.plan.sharded is not None
            pack(chunk, src, send, self.plan, self.plan.sharded, slot)
            return send
        finally:
            if stage is not None:
                self.land.release(stage)
            if pooled:
                self.read.release(buf)

    def _landing(self, chunk: ScatterChunk, held: list) -> tuple[torch.Tensor, bool]:
        """(every rank in the scatter) Where this rank's segment lands, and whether that is its destination.

        The destination itself when the whole segment is one piece needing no
        cast (the common FSDP case: a full ``Shard(0)`` row block).
        """
        parts = chunk.parts[self.comm.rank]
        if len(parts) == 1 and parts[0].nbytes == chunk.seg_bytes:
            p = parts[0]
            target = self.placement.resolve(p.name, p.local_offset, p.nbytes, self.comm.device)
            if target is not None:
                return target, True
        buf = self.land.acquire(chunk.seg_bytes)
        held.append((self.land, buf))
        return buf, False

    # ---- slice ---------------------------------------------------------------------

    def _slice(self, chunk: Chunk) -> None:
        """(the reading rank) Take its own slice from the slice reader; place it unless it was read in place."""
        buf, pooled = self._next(self.slicer, chunk)
        if pooled:
            try:
                self._commit(chunk, chunk.pieces, buf)
            finally:
                self.slice.release(buf)

    # ---- shared ----------------------------------------------------------------------

    @staticmethod
    def _next(reader: ChunkReader, chunk) -> tuple[torch.Tensor, bool]:
        got, buf, pooled, err = reader.next()
        if err is not None:
            raise err
        assert got is chunk, "reader and schedule disagree"
        return buf, pooled

    def _commit(self, item, pieces, buf: torch.Tensor) -> None:
        """Place each piece's bytes from ``buf`` (at ``chunk_offset``) into its tensor (at ``tensor_offset``)."""
        for p in pieces:
            try:
                self.placement.commit(p.name, p.tensor_offset, buf[p.chunk_offset : p.chunk_offset + p.nbytes])
            except Exception as e:
                raise add_context(e, f"placing {p.name!r} from {self.plan.files[item.file].name}")
