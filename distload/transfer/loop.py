"""The one transfer loop: every rank walks one schedule of broadcast, scatter and slice steps.

(all ranks) :func:`transfer` moves every byte the plan lists into this
rank's :class:`~distload.model.place.Placement`. The schedule (:func:`schedule`)
is pure and the same on every rank; each :class:`Step` has a kind:

- ``broadcast``: the owner reads a plan :class:`~distload.plan.items.Chunk` and
  every rank receives all of it (replicated tensors);
- ``scatter``: the owner reads a
  :class:`~distload.plan.shard_plan.ScatterChunk` and sends each rank holding
  rows of it exactly its pieces, point to point (``Comm.exchange_``): one
  message per holder, straight from the read buffer when it is one run of
  whole rows, else packed (:mod:`distload.transfer.scatter`); ranks holding
  none of it do not take part (DTensor shards);
- ``slice``: a rank reads its own piece of a tensor; no collective.

Per step, owners read (on a reader thread, ahead of the loop) and every
rank finds where the bytes land, all inside one ``try``. A status
all-reduce of one scalar before every :data:`AGREE_EVERY`-th data
collective lets every rank agree that nothing failed, so no rank is left
blocked in a collective another rank skipped: a rank whose step failed
keeps taking part in the collectives up to the exchange that reports it,
with a stand-in buffer reserved up front, and commits nothing; then every
rank raises. On CPU each exchange is read at once (a lockstep round trip,
about a millisecond on gloo). On GPUs it rides the comm stream (an NCCL
all-reduce, :meth:`~distload.transport.comm.TorchComm.post_status`) and is
read a window later (:data:`STATUS_LAG`), so it never stalls the device
pipeline; every host wait there is bounded by ``comm.wait_s``, and on CUDA
a rank's own slices are spread between the collectives
(:func:`spread_slices`) and go through the copy stage. The loop asks the placement only two things: ``resolve`` (can
these bytes land in the destination's own memory?) and ``commit`` (they
landed in a buffer: put them in place). Casts, DTensor local shards, tied
names and key conversions stay behind those two calls; the transport never
sees the placement and the placement never sees the transport.
A stream (:mod:`distload.stream`) walks the same schedule with
:meth:`Transfer.walk` ``(pause=True)``, which stops after each step so a
consumer can take what landed before its buffers are reused.

Note on memory (every rank, beyond its destination tensors; B = one bucket,
or the largest scatter chunk or segment when bigger):
    - CPU: a pool of 2 B that holds reads (read one ahead of the collective)
      and received chunks and messages; scatter owners add one send buffer
      for messages that need packing (``ScatterChunk.send_buffer``: at most
      B, or one message when that is larger; a larger chunk goes out in
      rounds), allocated only if some message needs it; ranks reading their
      own slices with a cast add 1 B. A stand-in of about B is reserved but
      never touched unless this rank's step fails: then it takes part with it.
    - CUDA (:class:`~distload.io.stage.CopyStage`): 3 B of pinned host memory
      for reads and own slices (one being copied, one waiting, one being
      read); on the GPU 2 B taken in turn for staging, receiving and casting
      (one filled while the other is sent), which also serve as the stand-in
      (more only when one message exceeds them), plus the send
      buffer on scatter owners. Copies run on a copy stream and collectives on
      a comm stream, ordered by events, so reading, copying and sending
      overlap without a host sync per step.
    None of this grows with ``io_threads``: the threads share each chunk's buffer.
    :attr:`Transfer.buffer_bytes` counts what this rank's pools allocated.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

import torch

from ..errors import add_context
from ..io.reader import BufferPool, ChunkReader, read_threads
from ..io.stage import CopyStage
from ..model.place import Placement
from ..plan.items import Chunk
from ..plan.load_plan import LoadPlan
from ..plan.schedule import AGREE_EVERY, BROADCAST, SCATTER, SLICE, Step, schedule
from ..plan.shard_plan import Part, ScatterChunk
from ..storage.base import Source
from ..transport.comm import Comm, Status
from .scatter import message_span, pack

# Status exchanges posted before the oldest is read: 0 reads each at once (CPU: a
# host round trip); on CUDA each is read a window later, when the GPU has long
# finished it, so agreeing never stalls the device pipeline.
STATUS_LAG = {"cpu": 0, "cuda": 1}


def transfer(comm: Comm, plan: LoadPlan, placement: Placement, sources: dict[int, Source],
             progress=None, io_threads: int | None = None, ranks_here: int = 1) -> tuple[int, int, int]:
    """(all ranks) Run the schedule. Returns (bytes this rank read, collectives, buffer bytes).

    ``io_threads`` None picks per reader: a rank's own slice reads are the
    whole job while they run, and take one thread per core (at most 8);
    reads that feed a collective only need to stay ahead of it, and take the
    node's cores shared by its ``ranks_here`` ranks, so the transport keeps
    its share. (World 2 on 2 cores: replicated 2.90 s with 1 thread per rank
    against 3.17 s with 2; slice-read FSDP2 1.19 s with 2 against 1.33 s.)
    """
    t = Transfer(comm, plan, placement, sources, progress, io_threads, ranks_here)
    return t.run(), t.collectives, t.buffer_bytes


def spread_slices(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """(one rank) Its own slice steps spread evenly between the collectives, which keep their order.

    Slices need no collective, so where they sit is this rank's choice; on
    CUDA, spread out, their copies and casts overlap the collectives instead
    of following them all.
    """
    coll = [s for s in steps if s.kind != SLICE]
    own = [s for s in steps if s.kind == SLICE]
    if not coll or not own:
        return steps
    out: list[Step] = []
    taken = 0
    for i, step in enumerate(coll):
        out.append(step)
        upto = (i + 1) * len(own) // len(coll)
        out += own[taken:upto]
        taken = upto
    return tuple(out)


class _Progress:
    """Bytes for rank 0's bar, job-wide, in whole numbers that sum to the plan's total.

    Collectives count as they complete. Other ranks' slice reads are not
    visible here, so this rank's own slice reads stand for all of them,
    scaled up to every sliced tensor's bytes; a rank with none counts them
    all at the end.
    """

    def __init__(self, plan: LoadPlan, steps: tuple[Step, ...]):
        self.sliced = plan.sharded.sliced_bytes if plan.sharded is not None else 0
        self.own = sum(s.item.nbytes for s in steps if s.kind == SLICE)
        self.done = self.counted = 0

    def step(self, step: Step) -> int:
        if step.kind != SLICE:
            return step.item.nbytes
        self.done += step.item.nbytes
        now = self.sliced * self.done // self.own
        out, self.counted = now - self.counted, now
        return out

    def rest(self) -> int:
        """The sliced bytes not yet counted (all of them if this rank read none)."""
        out, self.counted = self.sliced - self.counted, self.sliced
        return out


class Transfer:
    """One rank's walk through the schedule. ``run`` is collective."""

    def __init__(self, comm: Comm, plan: LoadPlan, placement: Placement, sources: dict[int, Source], progress=None,
                 io_threads: int | None = None, ranks_here: int = 1):
        self.comm, self.plan, self.placement, self.sources, self.progress = comm, plan, placement, sources, progress
        self.feed_threads = io_threads or read_threads(sources, ranks_here)  # see transfer()
        self.slice_threads = io_threads or read_threads(sources)
        self.stage: CopyStage | None = None
        self.read = self.land = self.send = self.slice = None  # BufferPools, made by _pools
        self.reader = self.slicer = None  # ChunkReaders, made once the pools exist
        self.steps = schedule(plan, comm.rank)
        on_gpu = comm.device.type == "cuda"
        if on_gpu:  # own slices ride the copy stream while the collectives run (a per-rank order)
            self.steps = spread_slices(self.steps)
        # This rank's parts of every scatter it receives from (one lookup per slab), by chunk.
        self._parts: dict[int, tuple[Part, ...]] = {}
        for s in self.steps:
            if s.kind == SCATTER and s.item.owner != comm.rank:
                parts = s.item.parts_of(comm.rank)
                if parts:
                    self._parts[id(s.item)] = parts
        # The data steps this rank takes part in: every broadcast, the scatters it sends or receives.
        self.collectives = sum(1 for s in self.steps if s.kind == BROADCAST or (
            s.kind == SCATTER and (s.item.owner == comm.rank or id(s.item) in self._parts)))
        self.buffer_bytes = 0
        self.agree_every = AGREE_EVERY
        self.status_lag = STATUS_LAG.get(comm.device.type, 0)
        self._statuses: collections.deque[Status] = collections.deque()  # posted, not yet read
        self._seen = 0  # data collectives reached, the same count on every rank
        self._spare: torch.Tensor | None = None  # stand-in bytes (CPU) for a rank whose step failed
        # On CUDA every host wait (a read, a copy, a status) is bounded: past it the load is broken.
        self.wait_s = comm.wait_s if on_gpu else None
        self._held: list[tuple[BufferPool, torch.Tensor]] = []  # pooled buffers of the step being run
        self.bytes_read = 0  # this rank's, once the walk ended

    # ---- setup ----------------------------------------------------------------

    def _pools(self) -> None:
        """Buffer pools sized from the schedule, so no request is ever larger than a pool's buffers."""
        rank, device, bucket = self.comm.rank, self.comm.device, self.plan.bucket_bytes
        host = torch.device("cpu")
        on_host = device.type == "cpu"
        mine = [s for s in self.steps if s.item.owner == rank]
        reads = [s.item.nbytes for s in mine if s.kind != SLICE]
        receives = [sum(p.nbytes for p in parts) for parts in self._parts.values()]
        sends = [s.item.send_buffer for s in mine if s.kind == SCATTER]
        slices = [s.item.nbytes for s in mine if s.kind == SLICE]
        read_bytes = max([bucket, *reads])
        # What a rank whose step failed takes part with, until the next status exchange. One stand-in
        # serves every message of a step: a failed owner sends it to each holder.
        need = max([0, *(s.item.nbytes for s in self.steps if s.kind == BROADCAST), *receives,
                    *(s.item.recv_bound for s in mine if s.kind == SCATTER)])
        if on_host:  # reads and receives share one pool
            self.read = self.land = BufferPool(2, max([read_bytes, *receives]), host)
            self.slice = BufferPool(1, max([0, *slices]), host)
            # Reserved, not touched: no resident memory unless a failed step writes into it, and
            # an allocation that cannot fail later, when a failed rank must still take part.
            self._spare = torch.empty(need, dtype=torch.uint8, device=host)
        else:  # reads and own slices stage through pinned buckets onto the device (distload.io.stage)
            read_bytes = max([read_bytes, *slices])
            self.stage = CopyStage(device, read_bytes, max([read_bytes, *receives]), stand_in_bytes=need,
                                   wait_s=self.wait_s)
            self.read, self.land = self.stage.pinned, None
        self.send = BufferPool(1, max([0, *sends]), device)  # allocated only if a message needs packing

    # ---- the loop -------------------------------------------------------------

    def run(self) -> int:
        """(all ranks) Walk every step; returns the bytes this rank read."""
        for _ in self.walk():
            pass
        return self.bytes_read

    def walk(self, pause: bool = False, error: BaseException | None = None) -> Iterator[Step]:
        """(all ranks) Walk every step; with ``pause``, yield each step whose bytes landed here.

        Without ``pause`` this is the load: nothing is yielded. With it, the
        walk stops after each step that this rank ran without error, with the
        step's buffers still held (and, on CUDA, the caller's stream ordered
        after the step's collective and the next one after the caller's work),
        so a consumer can read what landed in place until it resumes the walk.
        Pausing agrees before every collective and reads each status at once
        (``agree_every`` 1, ``status_lag`` 0): a paused consumer only ever sees
        bytes whose sender read them without error.

        A consumer stops by throwing an exception in at the pause
        (``walk.throw(e)``; closing counts too): this rank then takes part as
        a failed rank, and the next status exchange raises the same
        :class:`~distload.errors.DistLoadError` on every rank. ``error`` starts
        the walk as failed already (a consumer that stopped before the first step).
        """
        comm, rank = self.comm, self.comm.rank
        if pause:
            self.agree_every, self.status_lag = 1, 0
        try:
            self._pools()
        except Exception as e:  # agreed before the first collective
            error = error or e
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

        mine = [s for s in self.steps if s.item.owner == rank] if error is None else []
        counter = _Progress(self.plan, self.steps)
        try:
            if error is None:
                try:  # a thread that cannot start (a pids limit) is agreed before the first collective
                    if self.stage is not None:
                        # One reader, in the loop's order, for the chunks this rank sends and its own
                        # slices: they share the pinned buckets and the copy stream.
                        threads = self.slice_threads if any(s.kind == SLICE for s in mine) else self.feed_threads
                        self.reader = self.slicer = ChunkReader(
                            self.plan, self.sources, [s.item for s in mine], self.read, lambda c: None,
                            io_threads=threads, ahead=self.stage.read_ahead, device=comm.device)
                    else:
                        self.reader = ChunkReader(self.plan, self.sources, [s.item for s in mine if s.kind != SLICE],
                                                  self.read, read_target, io_threads=self.feed_threads)
                        self.slicer = ChunkReader(self.plan, self.sources, [s.item for s in mine if s.kind == SLICE],
                                                  self.slice, slice_target, io_threads=self.slice_threads)
                except Exception as e:
                    error = add_context(e, "starting this rank's read threads")
            for step in self.steps:
                self._release()  # the previous step's buffers: its consumer, if any, has moved on
                if step.kind == SLICE:
                    if step.item.owner == rank and error is None:
                        try:
                            self._slice(step.item)
                        except Exception as e:
                            error = e
                else:
                    move = self._broadcast if step.kind == BROADCAST else self._scatter
                    error = move(step.item, error)
                    if pause and step.kind == SCATTER:
                        # An owner packs and places after the status exchange before the step: agree
                        # again, so a consumer never reads stand-in bytes that a failed owner sent.
                        self._agree_before(error)
                if self.progress is not None:
                    self.progress.update(counter.step(step))
                if pause and error is None:
                    if self.stage is not None:
                        self.stage.hand_over()
                    try:
                        yield step
                    except (Exception, GeneratorExit) as e:  # the consumer stopped: fail at the next exchange
                        error = e
                    finally:
                        if self.stage is not None:
                            self.stage.take_back()
            self._release()
            if self.progress is not None:
                self.progress.update(counter.rest())
            comm.agree("transfer", error)
        finally:
            self._release()
            if self.stage is not None:  # the caller's stream waits for every queued copy and collective
                self.stage.close()
            readers = list({id(r): r for r in (self.slicer, self.reader) if r is not None}.values())
            for r in readers:
                r.close()
            pools = [p for p in (self.read, self.land, self.send, self.slice) if p is not None]
            if self.stage is not None and self.stage.pinned in pools:
                pools.remove(self.stage.pinned)
            self.buffer_bytes = sum(p.allocated_bytes for p in {id(p): p for p in pools}.values()) + (
                self.stage.allocated_bytes if self.stage is not None else 0)
            self.bytes_read = sum(r.bytes_read for r in readers)

    def _release(self) -> None:
        """Return the pooled buffers the last step held (kept while a paused consumer reads them)."""
        for pool, b in self._held:
            pool.release(b)
        self._held = []

    def _on_device_queue(self):
        """The collective and unpacking of one step: on CUDA on the stage's comm stream, after its copy."""
        return self.stage.collective() if self.stage is not None else contextlib.nullcontext()

    def _done(self, buf: torch.Tensor | None) -> None:
        if self.stage is not None and buf is not None:
            self.stage.done(buf)

    def _agree_before(self, error: BaseException | None) -> None:
        """(all ranks) Before every ``agree_every``-th data collective: raise everywhere if any rank failed.

        Every rank counts the same collectives, so all post the same status
        exchanges (one scalar each); each is read ``status_lag`` exchanges
        later, and all ranks raise at the same one. The first is read at once:
        it also covers the pools' setup, before which no stand-in exists.
        On CUDA the status rides the comm stream, behind the collectives
        already queued, and reading it waits at most ``wait_s`` after it was
        posted, inside NCCL's own timeout: a peer that died makes this a
        ``TimeoutError`` (a broken load), never a hang.
        """
        due = self._seen % self.agree_every == 0
        first = self._seen == 0
        self._seen += 1
        if not due:
            return
        with self._on_device_queue():
            self._statuses.append(self.comm.post_status(error is not None))
        while len(self._statuses) > (0 if first else self.status_lag):
            status = self._statuses.popleft()
            wait = None if self.wait_s is None else max(0.0, status.posted_at + self.wait_s - time.monotonic())
            if status.failed(wait):
                self.comm.raise_agreed("transfer", error)

    def _stand_in(self, nbytes: int) -> torch.Tensor:
        """(a rank whose step failed) Bytes to take part in a collective with; nobody keeps them."""
        if self.stage is not None:
            return self.stage.stand_in(nbytes)
        assert self._spare is not None and nbytes <= self._spare.numel(), "the stand-in was sized from the schedule"
        return self._spare[:nbytes]

    def _filler(self, nbytes: int, src: torch.Tensor | None) -> torch.Tensor:
        """(a scatter owner whose step failed) Bytes of a holder's message size to send it: the stand-in
        (reserved on CPU, the copy stage's on CUDA), so a failed owner allocates nothing."""
        return self._stand_in(nbytes)  # sized from the schedule, this rank's scatters' recv_bound included

    # ---- broadcast ---------------------------------------------------------------

    def _broadcast(self, chunk: Chunk, error: BaseException | None) -> BaseException | None:
        buf, landed, held = None, False, []
        if error is None:
            try:
                buf, landed = self._broadcast_source(chunk, held)
            except Exception as e:
                error = e
        self._agree_before(error)
        if error is not None:  # take part all the same, until the next status exchange
            buf, landed = self._stand_in(chunk.nbytes), True
        try:
            with self._on_device_queue():
                self.comm.broadcast_(buf, chunk.owner)
                if not landed:
                    try:
                        self._commit(chunk, chunk.pieces, buf)
                    except Exception as e:
                        error = e
            self._done(buf)
        finally:
            self._held += held  # released by the walk when it moves on
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
            if self.stage is None:
                if pooled:
                    held.append((self.read, buf))
                return buf, not pooled
            return self._upload(buf, pooled, target), target is not None
        if target is not None:
            return target, True
        if self.stage is not None:
            return self.stage.landing(chunk.nbytes), False
        buf = self.land.acquire(chunk.nbytes)
        held.append((self.land, buf))
        return buf, False

    # ---- scatter -------------------------------------------------------------------

    def _scatter(self, chunk: ScatterChunk, error: BaseException | None) -> BaseException | None:
        """(every rank) One scatter chunk: the owner sends each holder its message; holders receive it.

        Ranks holding none of the chunk only join the status exchange, which
        every rank counts alike.
        """
        owner = chunk.owner == self.comm.rank
        parts = self._parts.get(id(chunk), ())
        if not owner and not parts:
            self._agree_before(error)
            return error
        src, recv, landed, held = None, None, False, []
        if error is None:
            try:
                if owner:
                    src = self._read_scatter(chunk, held)
                else:
                    recv, landed = self._landing(parts, held)
            except Exception as e:
                error = e
        self._agree_before(error)
        try:
            with self._on_device_queue():
                if owner:
                    error = self._send(chunk, src, held, error)
                else:
                    if error is not None:  # take part all the same, until the next status exchange
                        recv, landed = self._stand_in(sum(p.nbytes for p in parts)), True
                    assert recv is not None
                    self.comm.exchange_([], [(recv, chunk.owner)])
                    if not landed:
                        try:
                            self._commit(chunk, [p.piece for p in parts], recv)
                        except Exception as e:
                            error = e
            if not landed:
                self._done(recv)
            self._done(src)
        finally:
            self._held += held  # released by the walk when it moves on
        return error

    def _read_scatter(self, chunk: ScatterChunk, held: list) -> torch.Tensor:
        """(owner) The chunk's bytes from the reader; on GPUs uploaded, so pieces are cut on the device."""
        buf, pooled = self._next(self.reader, chunk)
        if self.stage is None:
            if pooled:
                held.append((self.read, buf))
            return buf
        return self._upload(buf, pooled, None)  # its pinned bucket returns once the copy ran

    def _send(self, chunk: ScatterChunk, src: torch.Tensor | None, held: list,
              error: BaseException | None) -> BaseException | None:
        """(owner) Send every holder its message and place the owner's own parts; returns the error, if any.

        A message that is one run of the chunk's bytes goes straight from
        ``src``; others are packed into the send buffer, and when it is full
        the messages so far go out (a round) before it is reused. After a
        failure here or earlier the remaining holders get stand-in bytes of
        their message's size (:meth:`_filler`), so none is left waiting.
        """
        rank, sp = self.comm.rank, self.plan.sharded
        assert sp is not None
        cap = chunk.send_buffer
        sends: list[tuple[torch.Tensor, int]] = []
        buf: torch.Tensor | None = None
        used = 0
        for r, parts in chunk.parts_by_rank().items():
            n = sum(p.nbytes for p in parts)
            if error is None:
                try:
                    assert src is not None
                    span = message_span(chunk, parts, sp)
                    if span is not None:
                        msg = src[span[0] : span[0] + span[1]]
                    else:
                        if used + n > cap:  # a round: send what is packed, then reuse the buffer
                            self.comm.exchange_(sends, [])
                            sends, used = [], 0
                        if buf is None:
                            buf = self.send.acquire(cap)
                            held.append((self.send, buf))
                        msg = buf[used : used + n]
                        pack(chunk, r, parts, src, msg, self.plan, sp)
                        used += n
                    if r == rank:
                        self._commit(chunk, [p.piece for p in parts], msg)
                    else:
                        sends.append((msg, r))
                    continue
                except Exception as e:
                    error = e
            if r != rank:
                sends.append((self._filler(n, src), r))
        self.comm.exchange_(sends, [])
        return error

    def _landing(self, parts: tuple[Part, ...], held: list) -> tuple[torch.Tensor, bool]:
        """(a holder) Where this rank's message lands, and whether that is its destination.

        The destination itself when the message is one piece needing no cast
        (the common FSDP case: a full ``Shard(0)`` row block).
        """
        n = sum(p.nbytes for p in parts)
        if len(parts) == 1:
            p = parts[0]
            target = self.placement.resolve(p.name, p.local_offset, p.nbytes, self.comm.device)
            if target is not None:
                return target, True
        if self.stage is not None:
            return self.stage.landing(n), False
        buf = self.land.acquire(n)
        held.append((self.land, buf))
        return buf, False

    # ---- slice ---------------------------------------------------------------------

    def _slice(self, chunk: Chunk) -> None:
        """(the reading rank) Take its own slice from the slice reader; place it unless it was read in place.

        On CUDA the slice goes up on the copy stream like a broadcast chunk,
        into its destination when no cast is needed, else into a ring bucket
        and cast into place on the device, beside the collectives.
        """
        buf, pooled = self._next(self.slicer, chunk)
        if self.stage is not None:
            p = chunk.pieces[0]
            target = self.placement.resolve(p.name, p.tensor_offset, p.nbytes, self.comm.device)
            staged = self._upload(buf, pooled, target)
            if target is None:
                try:
                    with self.stage.on_copy_stream():
                        self._commit(chunk, chunk.pieces, staged)
                finally:  # the bucket is reused only after whatever the cast queued
                    self.stage.done_copy(staged)
            return
        if pooled:
            self._held.append((self.slice, buf))  # released by the walk when it moves on
            self._commit(chunk, chunk.pieces, buf)

    # ---- shared ----------------------------------------------------------------------

    def _upload(self, buf: torch.Tensor, pooled: bool, into: torch.Tensor | None) -> torch.Tensor:
        """(owner, CUDA) Queue the chunk's copy onto the device; its pinned bucket returns after the copy."""
        assert self.stage is not None
        try:
            return self.stage.upload(buf, pooled=pooled, into=into)
        except BaseException:
            if pooled:
                self.read.release(buf)
            raise

    def _next(self, reader: ChunkReader, chunk) -> tuple[torch.Tensor, bool]:
        got, buf, pooled, err = reader.next(self.wait_s)
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
