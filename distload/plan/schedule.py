"""The load schedule: the one sequence of broadcast, scatter and slice steps that every rank walks.

Pure and the same on every rank: derived from the plan alone, so the
collectives of all ranks match. The transfer loop
(:mod:`distload.transfer.loop`) runs it; the dry run measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .items import Chunk, Piece
from .load_plan import LoadPlan
from .shard_plan import ScatterChunk

BROADCAST, SCATTER, SLICE = "broadcast", "scatter", "slice"
# On CPU, data steps per status exchange: every rank exchanges status before every AGREE_EVERY-th
# broadcast or scatter step (whether it takes part in the step or not), so a failure is agreed at
# most this many steps late, which bounds the extra work, never a wait.
AGREE_EVERY = 16


def status_exchanges(steps: tuple[Step, ...], every: int = AGREE_EVERY) -> int:
    """How many status exchanges the transfer loop runs on ``steps`` (the same on every rank), its last included."""
    data = sum(1 for s in steps if s.kind != SLICE)
    return -(-data // every) + 1


@dataclass(frozen=True)
class Step:
    """One item of the schedule: what moves (``item``) and how (``kind``)."""

    kind: str
    item: Chunk | ScatterChunk


def schedule(plan: LoadPlan, rank: int | None = None) -> tuple[Step, ...]:
    """(pure, every rank alike) Broadcasts, then scatters, then the slice reads of ``rank`` (None: every rank's)."""
    steps = [Step(BROADCAST, c) for c in plan.chunks if c.nbytes]
    sp = plan.sharded
    if sp is not None:
        steps += [Step(SCATTER, c) for c in sp.scatters if c.send_bytes]
        steps += [Step(SLICE, c) for c in (sp.slices if rank is None else sp.slices_of(rank)) if c.nbytes]
    return tuple(steps)


def pieces_here(step: Step, rank: int) -> tuple[Piece, ...]:
    """(pure) What ``rank`` holds after ``step``: each piece's ``tensor_offset`` in the tensor it fills on that rank."""
    if step.kind == SCATTER:
        assert isinstance(step.item, ScatterChunk)
        return tuple(p.piece for p in step.item.parts_of(rank))
    if step.kind == SLICE and step.item.owner != rank:
        return ()
    return step.item.pieces  # type: ignore[union-attr]
