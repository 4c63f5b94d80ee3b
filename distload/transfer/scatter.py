"""Cutting a scatter chunk into segments: the owner's side of a scatter, on bytes alone.

(owner, locally) :func:`pack` takes the bytes of one
:class:`~distload.plan.shard_plan.ScatterChunk` (row blocks of one or more
tensors as they sit in the file) and lays every rank's piece of them into
its padded segment of the send buffer. It knows shapes and dtypes from the
plan, nothing of the model or the transport.
"""

from __future__ import annotations

import torch

from ..format.dtypes import torch_dtype
from ..plan.load_plan import LoadPlan
from ..plan.shard import Layout, Ranges
from ..plan.shard_plan import ScatterChunk, ShardPlan


def pack(chunk: ScatterChunk, src: torch.Tensor, send: torch.Tensor, plan: LoadPlan, sp: ShardPlan,
         slot: dict[int, int]) -> None:
    """Write rank ``r``'s pieces of ``src`` (the chunk's bytes) into segment ``slot[r]`` of ``send``."""
    for r, parts in enumerate(chunk.parts):
        if not parts:
            continue
        seg = send[slot[r] * chunk.seg_bytes : (slot[r] + 1) * chunk.seg_bytes]
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
