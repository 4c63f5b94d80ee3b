"""(all ranks) Gathered conversions: one rank runs each op, and its results travel as ordinary tensors.

Runs after the main transfer, inside the load's failure handling, one batch
of ops at a time (:func:`distload.plan.op_plan.op_batches`: consecutive ops, about
one bucket of source bytes, at least one op):

1. (all ranks) the batch's sources move to their op ranks only, through the
   ordinary transfer loop (:func:`distload.transfer.loop.transfer`) on the batch's
   own small plan;
2. (each op rank) runs transformers' op on its sources (``GatheredOp.run``)
   and frees them; then every rank agrees, so an op that fails raises the
   same :class:`DistLoadError` everywhere, naming the op and its keys;
3. (all ranks) each result goes to its target: a broadcast from the op rank
   into a replicated target; for a DTensor target the op rank sends each
   holder exactly its own region, point to point (ranks holding none of it
   do not take part). A status exchange precedes every transfer, as in the
   transfer loop, so no rank waits on a message a failed rank skips.

Memory: an op rank holds one batch's sources and results, plus one send
buffer (about one target); other ranks hold only their own regions, plus
one landing segment when a region cannot land in place.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import DistLoadError, clip_names
from ..format.dtypes import is_castable
from ..model.convert import KeyedPlacement, take_region
from ..model.place import byte_view
from ..plan.keys import GatheredOp
from ..plan.load_plan import LoadPlan
from ..plan.op_plan import op_batches
from ..plan.shard import Layout
from ..storage.base import Source
from ..transport.comm import Comm
from .loop import transfer

PHASE = "convert"


def run_gathered(comm: Comm, plan: LoadPlan, ops: tuple[GatheredOp, ...], placement: KeyedPlacement,
                 sources: dict[int, Source], layouts: Mapping[str, Layout],
                 io_threads: int | None = None, ranks_here: int = 1,
                 progress=None) -> tuple[int, int, int, list[str]]:
    """(all ranks) Run every gathered op on its rank and place the results (see the module doc).

    ``layouts`` holds every rank's region of each DTensor target (by model
    key); other targets are whole on every rank. ``progress`` (rank 0's
    bar, or None) advances by the sources' bytes. Returns (bytes this rank
    read, collectives, most transfer-buffer bytes of one batch, the ops this
    rank ran by first target key).
    """
    rank = comm.rank
    read = collectives = buffers = 0
    ran: list[str] = []
    for batch in op_batches(plan, ops):
        sources_of = {k: sources[i] for k, i in enumerate(batch.files) if i in sources}
        got, n, buf = transfer(comm, batch.plan, placement, sources_of, progress, io_threads=io_threads,
                               ranks_here=ranks_here)
        read, collectives, buffers = read + got, collectives + n, max(buffers, buf)
        made: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        for i in batch.ops:
            if plan.op_ranks[i] == rank and error is None:
                try:
                    made.update(_run(ops[i], placement))
                    ran.append(ops[i].layer)
                except Exception as e:
                    error = e
        comm.agree(PHASE, error)
        for i in batch.ops:
            for name in ops[i].targets:
                error = _send(comm, name, made.pop(name, None), plan.op_ranks[i], placement.targets[name],
                              layouts.get(name), error)
                collectives += 1
        comm.agree(PHASE, error)
    return read, collectives, buffers, ran


def _run(g: GatheredOp, placement: KeyedPlacement) -> dict[str, torch.Tensor]:
    """(the op's rank) The op's results by model key; its sources are freed."""
    sources = placement.take_sources(g)
    try:
        made = g.run(sources, placement.model)
    except DistLoadError:
        raise
    except Exception as e:
        raise DistLoadError(f"conversion {g.op} failed for checkpoint key(s) {clip_names(g.sources)} -> "
                            f"{clip_names(g.targets)}: {type(e).__name__}: {e}") from e
    finally:
        del sources
    out = {name: made[name] for name in g.targets}
    for name, value in out.items():  # the plan checked the sources' dtypes; an op must not change them either
        want = placement.targets[name].dtype
        if value.dtype != want and not (is_castable(value.dtype) and is_castable(want)):
            raise DistLoadError(f"conversion {g.op} made {name} {value.dtype} from checkpoint key(s) "
                                f"{clip_names(g.sources)}, but the model holds {want}; distload casts only "
                                "between float16, bfloat16, float32 and float64")
    return out


def _agree_before(comm: Comm, error: BaseException | None) -> None:
    """(all ranks) The status exchange before a data collective: raise everywhere if any rank failed."""
    if comm.any_failed(error is not None):
        comm.raise_agreed(PHASE, error)


def _send(comm: Comm, name: str, value: torch.Tensor | None, src: int, target: torch.Tensor,
          layout: Layout | None, error: BaseException | None) -> BaseException | None:
    """(all ranks) Move one result from ``src`` (which holds ``value``) into every rank's ``target``."""
    if layout is None or layout.replicated:
        return _broadcast(comm, value, src, target, error)
    return _scatter(comm, name, value, src, target, layout, error)


def _broadcast(comm: Comm, value: torch.Tensor | None, src: int, target: torch.Tensor,
               error: BaseException | None) -> BaseException | None:
    """A replicated target: the op rank fills its own, then broadcasts its bytes into everyone's."""
    buf, in_place = None, False
    if error is None:
        try:
            if comm.rank == src:
                assert value is not None
                target.copy_(value)  # casts to the model's dtype, as every rank would
            in_place = target.is_contiguous() and target.device == comm.device
            if in_place:
                buf = byte_view(target)
            else:  # e.g. a CUDA model over MPI, whose collectives move host memory
                buf = torch.empty(target.numel() * target.element_size(), dtype=torch.uint8, device=comm.device)
                if comm.rank == src:
                    buf.copy_(byte_view(target.contiguous()))
        except Exception as e:
            error = e
    _agree_before(comm, error)
    assert buf is not None
    comm.broadcast_(buf, src)
    if comm.rank != src and not in_place:
        try:
            target.copy_(buf.view(target.dtype).view(target.shape))
        except Exception as e:
            error = e
    return error


def _scatter(comm: Comm, name: str, value: torch.Tensor | None, src: int, target: torch.Tensor,
             layout: Layout, error: BaseException | None) -> BaseException | None:
    """A DTensor target: the op rank sends each holder its own region, nothing else, point to point."""
    rank = comm.rank
    item = target.element_size()
    mine = target.numel() * item
    if rank != src and not mine:  # holds none of it: only the status exchange
        _agree_before(comm, error)
        return error
    sends: list[tuple[torch.Tensor, int]] = []
    recv, in_place = None, False
    if error is None:
        try:
            if rank == src:
                assert value is not None
                for r in layout.holders:
                    piece = take_region(value, layout.regions[r]).to(target.dtype).contiguous()
                    if not piece.numel():
                        continue
                    if r == rank:
                        target.copy_(piece.view(target.shape))
                    else:
                        sends.append((byte_view(piece).to(comm.device), r))
            else:
                in_place = target.is_contiguous() and target.device == comm.device
                recv = byte_view(target) if in_place else torch.empty(mine, dtype=torch.uint8, device=comm.device)
        except Exception as e:
            error = e
    _agree_before(comm, error)
    if error is not None:  # take part all the same with stand-in bytes of the right sizes
        if rank == src:
            sizes = [(layout.local_numel(r) * item, r) for r in layout.holders if r != rank]
            spare = torch.empty(max([0, *(n for n, _ in sizes)]), dtype=torch.uint8, device=comm.device)
            sends = [(spare[:n], r) for n, r in sizes if n]
        else:
            recv, in_place = torch.empty(mine, dtype=torch.uint8, device=comm.device), True
    if rank == src:
        comm.exchange_(sends, [])
        return error
    assert recv is not None
    comm.exchange_([], [(recv, src)])
    if not in_place:
        try:
            target.copy_(recv.view(target.dtype).view(target.shape))
        except Exception as e:
            error = e
    return error
