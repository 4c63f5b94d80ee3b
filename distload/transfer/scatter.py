"""A rank's message of a scatter chunk: the owner's side of a scatter, on bytes alone.

(owner, locally) Each rank that holds rows of a
:class:`~distload.plan.shard_plan.ScatterChunk` gets one message: its
:class:`~distload.plan.shard_plan.Part` s back to back, nothing else.
:func:`message_span` finds a message that already sits in the chunk's bytes
as one run (whole rows of one slab: every ``Shard(0)`` row block), which is
sent straight from the read buffer; :func:`pack` lays any other message
(several slabs, or a piece of each row) into a send buffer. Both know
shapes and dtypes from the plan, nothing of the model or the transport.
"""

from __future__ import annotations

import math

import torch

from ..format.dtypes import torch_dtype
from ..plan.load_plan import LoadPlan
from ..plan.shard import Ranges, length
from ..plan.shard_plan import Part, ScatterChunk, ShardPlan


def message_span(chunk: ScatterChunk, parts: tuple[Part, ...], sp: ShardPlan) -> tuple[int, int] | None:
    """``(offset, nbytes)`` of a message that is one contiguous run of the chunk's bytes, else None."""
    if len(parts) != 1 or len(parts[0].rows) != 1:
        return None
    p = parts[0]
    slab = chunk.slabs[p.slab]
    row = _row_bytes(sp, p.name)
    a, b = p.rows[0]
    if p.nbytes != (b - a) * row:  # a piece of each row (a column split): not contiguous
        return None
    return slab.chunk_offset + (a - slab.rows[0]) * row, p.nbytes


def pack(chunk: ScatterChunk, rank: int, parts: tuple[Part, ...], src: torch.Tensor, out: torch.Tensor,
         plan: LoadPlan, sp: ShardPlan) -> None:
    """Write ``rank``'s ``parts`` of ``src`` (the chunk's bytes) back to back into ``out``."""
    for part in parts:
        slab = chunk.slabs[part.slab]
        row = _row_bytes(sp, part.name)
        dest = out[part.seg_offset : part.seg_offset + part.nbytes]
        if part.nbytes == length(part.rows) * row:  # whole rows: byte copies, no dtype needed
            at = 0
            for a, b in part.rows:
                start = slab.chunk_offset + (a - slab.rows[0]) * row
                dest[at : at + (b - a) * row].copy_(src[start : start + (b - a) * row])
                at += (b - a) * row
            continue
        layout = sp.layouts[part.name]
        dtype = torch_dtype(plan.dtypes[part.name])
        rows = slab.rows[1] - slab.rows[0]
        raw = src[slab.chunk_offset : slab.chunk_offset + rows * row]
        if raw.storage_offset() % dtype.itemsize:
            raw = raw.clone()  # reinterpreting needs element alignment
        block = raw.view(dtype).view(rows, *layout.shape[1:])
        piece = _select(block, part.rows, slab.rows[0], layout.regions[rank])  # type: ignore[arg-type]
        if dest.storage_offset() % dtype.itemsize == 0:
            dest.view(dtype).view(piece.shape).copy_(piece)
        else:  # messages carry no padding: an odd offset takes the bytes of a contiguous copy
            dest.copy_(piece.contiguous().reshape(-1).view(torch.uint8))


def _row_bytes(sp: ShardPlan, name: str) -> int:
    return sp.itemsizes[name] * math.prod(sp.layouts[name].shape[1:])


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
