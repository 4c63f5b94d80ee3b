"""The stream driver: a checkpoint's tensors yielded one by one on every rank, each file read once.

(all ranks) :func:`stream_state_dict` plans as a load does and returns a
:class:`TensorStream`; iterating it walks the same schedule as
:func:`distload.load_checkpoint` (:mod:`distload.transfer.loop`: owners read
ahead, tensors travel in buckets) and yields each tensor as soon as it has
landed, instead of filling a model. This is what inference engines consume:
vLLM's ``model.load_weights`` takes exactly such an iterator
(:mod:`distload.integrations.vllm`).

Note on stopping early:
    Every rank takes part in every collective of the schedule, so a rank
    that stops iterating must still tell the others. Closing the stream (an
    explicit ``close()``, leaving its ``with`` block, or the stream being
    garbage-collected after a ``break``) makes this rank take part as a
    failed one up to the next status exchange, which the walk holds before
    every collective while streaming: the other ranks then raise one
    :class:`DistLoadError` naming this rank, and this rank stops quietly. If
    every rank closed, all stop quietly. A consumer that raises inside a
    ``with`` block sends its exception's one-line description to the others.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import torch

from .errors import DistLoadError
from .format.discover import owner_store
from .format.dtypes import plan_dtypes
from .io.reader import open_verified
from .loader import _check_read_policy, _Load
from .model.sink import StreamSink
from .plan.load_plan import DEFAULT_BUCKET_MB, LoadPlan
from .plan.schedule import pieces_here, schedule
from .plan.stream_plan import Names, Wishes, digest, group_digests, names_in, stream_plan, wanted_mask
from .storage.base import Source
from .storage.mounts import is_local_storage
from .transfer.loop import Transfer
from .transport.bootstrap import make_comm, resolve_device
from .transport.comm import DEFAULT_TIMEOUT_S, Comm, broken_error, describe

_STREAM_SEQ = itertools.count()


class StreamClosed(Exception):
    """(the closing rank) What a rank that stops iterating reports to the others."""


def stream_state_dict(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    names: Names = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    read_policy: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    process_group=None,
    comm: str = "torch",
    io_threads: int | None = None,
    revision: str | None = None,
) -> TensorStream:
    """(all ranks) Every tensor of the checkpoint as ``(name, tensor)``, one at a time, reading each file once per job.

    Call it on every rank. It plans at once (a bad checkpoint raises here, on
    every rank) and returns a :class:`TensorStream` to iterate; every rank
    receives the tensors in the same order (the schedule's), as each lands.

    Args:
        path, device, dtype, bucket_mb, timeout_s, process_group, comm,
        io_threads, revision: as for :func:`distload.load_state_dict`.
        names: what this rank wants: None (everything), a collection of tensor
            names (a name the checkpoint lacks is an error), or a predicate on
            names. It may differ between ranks: each rank receives only what it
            asked for, and each file is still read once.
        read_policy: who reads a tensor that one rank alone wants: its file's
            owner, which sends it (``"scatter"``), that rank itself
            (``"slice"``), or ``"auto"`` (default: the rank itself on local
            disks for tensors of at least 1 MiB). Every byte is read once
            in every policy.

    Memory is bounded by the transfer buckets (``bucket_mb``) and the largest
    tensor, not by the model. **A yielded tensor may be a view into a bucket
    that is reused once the iteration moves on**: copy it (or copy out of
    it) before asking for the next one, as ``model.load_weights`` does.

    Stop early with ``close()``, or use the stream in a ``with`` block: a rank
    that stops ends the stream on every rank (see the module note). Example::

        with distload.stream_state_dict("/ckpt/llama", device="cuda") as tensors:
            for name, tensor in tensors:
                params[name].copy_(tensor)
    """
    _check_read_policy(read_policy)
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    return TensorStream(transport, dev, path, dtype=dtype, names=names, bucket_mb=bucket_mb, read_policy=read_policy,
                        io_threads=io_threads, revision=revision)


class TensorStream:
    """(all ranks) One stream on one rank; made by :func:`stream_state_dict`. Iterating it is collective.

    ``plan`` is the plan the stream follows; ``names`` the tensors this rank
    receives, in file order; ``bytes_read`` the bytes this rank read, once
    iterated. Integrations that bring their own transport
    (:mod:`distload.integrations.vllm`) construct it with a
    :class:`~distload.transport.comm.Comm`.
    """

    def __init__(self, comm: Comm, device: torch.device, path, *, dtype: torch.dtype | None = None,
                 names: Names = None, bucket_mb: float = DEFAULT_BUCKET_MB, read_policy: str = "auto",
                 io_threads: int | None = None, revision: str | None = None):
        _check_read_policy(read_policy)
        # The generator refers to the state, never to this handle, so dropping the handle
        # (a ``break`` out of a for loop) closes the stream at once instead of at a later GC.
        self._state = _Stream(comm, device, path, dtype, names, bucket_mb, read_policy, io_threads, revision)
        self._gen: Iterator[tuple[str, torch.Tensor]] | None = None

    @property
    def plan(self) -> LoadPlan:
        return self._state.plan

    @property
    def names(self) -> list[str]:
        return self._state.names

    @property
    def bytes_read(self) -> int:
        return self._state.bytes_read

    def __iter__(self) -> TensorStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._gen is None:
            if self._state.finished:
                raise StopIteration
            self._gen = self._state.run()
        return next(self._gen)

    def close(self, reason: str | None = None) -> None:
        """(this rank) Stop iterating: every other rank that still iterates raises one :class:`DistLoadError`.

        ``reason`` is shown to the other ranks. Nothing happens if the stream
        already ended. Safe to call more than once.
        """
        self._state.close(self._gen, reason)

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(f"the consumer raised {describe(exc)}" if exc is not None else None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Stream:
    """One rank's stream state; ``__init__`` and ``run`` are collective."""

    def __init__(self, comm: Comm, device: torch.device, path, dtype: torch.dtype | None, names: Names,
                 bucket_mb: float, read_policy: str, io_threads: int | None, revision: str | None):
        self.comm, self.device = comm, device
        self.bytes_read = 0
        self.sources: dict[int, Source] = {}
        self.phase = "plan"
        self.tag = f"stream.{next(_STREAM_SEQ)}"  # the same on every rank: all run the same streams in order
        self.finished = False
        try:
            job = _Load(comm, device, path, True, bucket_mb, False, model=None, dtype=dtype, io_threads=io_threads,
                        revision=revision)
            base = job.make_plan()
            self.path, self.io_threads, self.ranks_here = job.path, job.io_threads, job.ranks_here
            self.phase = "select"
            self.plan, mask = self._select(base, names, read_policy)
            self.names = names_in(base.files, mask)
            self.phase = "open"
            self._open(dtype)
        except DistLoadError:
            self._close_files()
            self.finished = True
            raise
        except Exception as e:  # a collective broke: a peer died, timed out or diverged
            self._close_files()
            self.finished = True
            raise self._broken(e) from e

    # ---- setup (all ranks, collective) ----------------------------------------------

    def _select(self, base: LoadPlan, names: Names, read_policy: str) -> tuple[LoadPlan, bytes | None]:
        """(all ranks) Agree on who wants what, exchanging each distinct wish once; derive the stream's plan.

        Rank 0's view of the storage decides ``auto`` for every rank, so all derive the same plan.
        """
        mask: bytes | None = None

        def mine() -> tuple[str, bool | None]:
            nonlocal mask
            mask = wanted_mask(base.files, names)
            return digest(mask), is_local_storage(base.root) if self.comm.rank == 0 else None

        gathered = self.comm.gather_or_raise("select", mine)
        local = bool(gathered[0][1])
        distinct, which, first = group_digests([g[0] for g in gathered])
        if len(distinct) == 1:
            wishes = Wishes((mask,), which)
        else:
            me = self.comm.rank
            sent = self.comm.gather_or_raise("select", lambda: mask if first[which[me]] == me else None)
            wishes = Wishes(tuple(sent[r] for r in first), which)
        return stream_plan(base, wishes, read_policy, local), mask

    def _open(self, dtype: torch.dtype | None) -> None:
        """(all ranks) Open this rank's files, make the sink; agree that every rank could."""
        error = None
        try:
            rank = self.comm.rank
            self.steps = schedule(self.plan, rank)
            wanted = set(self.names)
            entries = {t.name: t for f in self.plan.files for t in f.tensors if t.name in wanted}
            wants = plan_dtypes({k: t.dtype for k, t in entries.items()}, None, dtype)
            self.sink = StreamSink({k: t.nbytes for k, t in entries.items()}, {k: t.shape for k, t in entries.items()},
                                   {k: t.dtype for k, t in entries.items()}, wants, self.device)
            carried = {p.name for s in self.steps for p in pieces_here(s, rank)}
            self._empty = [k for k in self.names if k not in carried]  # no step moves a tensor of no bytes
            mine = sorted({s.item.file for s in self.steps if s.item.owner == rank})
            store = owner_store(self.path, self.plan.root) if mine else None
            for i in mine:
                self.sources[i] = open_verified(self.plan, i, store)
        except Exception as e:
            error = e
        self.comm.agree("open", error)

    # ---- iteration -------------------------------------------------------------------

    def _transfer(self) -> Transfer:
        return Transfer(self.comm, self.plan, self.sink, self.sources, None, self.io_threads, self.ranks_here)

    def run(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(all ranks) Walk the schedule, yielding what completes after each step; see the module note."""
        self.phase = "transfer"
        rank = self.comm.rank
        transfer = self._transfer()
        walk = transfer.walk(pause=True)
        try:
            for step in walk:
                for item in self.sink.landed(pieces_here(step, rank)):
                    try:
                        yield item
                    except BaseException as e:  # closed, or stopped with a reason (close(reason))
                        self._stop(walk, e)
                        return
            self.phase = "finish"  # every rank agreed the walk: what is left is local
            for name in self._empty:
                try:
                    yield name, self.sink.empty(name)
                except BaseException:
                    return
        except DistLoadError:
            raise
        except Exception as e:
            raise self._broken(e) from e
        finally:
            self.bytes_read = transfer.bytes_read
            self.finished = True
            self._close_files()

    def _stop(self, walk, why: BaseException) -> None:
        """(the closing rank) Take part as a failed rank until every rank has agreed; never raise."""
        reason = str(why) if isinstance(why, StreamClosed) else "the stream was closed"
        try:
            walk.throw(StreamClosed(f"rank {self.comm.rank} stopped reading the stream: {reason}"))
        except DistLoadError:
            pass  # the others raise it; this rank chose to stop
        except StopIteration:
            pass
        except Exception:
            pass  # a broken collective: the others see it as well

    def close(self, gen, reason: str | None) -> None:
        """(the closing rank) Stop: take part as a failed rank until every rank has agreed; see the module note."""
        if self.finished:
            return
        why = StreamClosed(reason or "closed before the end")
        if gen is None:  # never iterated: take part in the walk all the same
            self.finished = True
            transfer = self._transfer()
            try:
                for _ in transfer.walk(pause=True, error=StreamClosed(f"rank {self.comm.rank} stopped reading "
                                                                      f"the stream: {why}")):
                    pass
            except Exception:
                pass  # the others raise it; this rank chose to stop
            finally:
                self._close_files()
            return
        try:
            gen.throw(why)
        except StopIteration:
            pass

    # ---- helpers ------------------------------------------------------------------------

    def _close_files(self) -> None:
        for src in self.sources.values():
            src.close()
        self.sources.clear()

    def _broken(self, e: Exception) -> DistLoadError:
        """(each surviving rank, alone) See :func:`distload.transport.comm.broken_error`."""
        return broken_error(self.comm, "distload", self.phase, self.tag, e)
