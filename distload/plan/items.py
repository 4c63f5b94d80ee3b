"""Plan items every stage shares: where a rank runs, and the byte ranges that move in one step.

Pure frozen dataclasses. :class:`Chunk` and :class:`Piece` say *what*
moves (file, owner, byte range, the tensors in it), never *how*: the
broadcast, scatter and slice steps and every transport share them.
:func:`interleave` merges per-owner streams into one schedule.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol, TypeVar


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


_Sized = TypeVar("_Sized", bound="_HasBytes")


class _HasBytes(Protocol):
    nbytes: int


def interleave(streams: dict[int, list[_Sized]]) -> tuple[_Sized, ...]:
    """Merge per-owner chunk lists so every owner's reads (or a save's writes) stay in flight.

    Always emits next from the owner that has sent the fewest bytes so far
    (ties to the lowest rank), so while one owner's chunk is on the wire the
    others are reading theirs. Any chunk type with ``nbytes`` (load and save chunks).
    """
    heap = [(0, r, 0) for r in sorted(streams) if streams[r]]  # (bytes sent, owner, next position)
    out: list[_Sized] = []
    while heap:
        sent, r, pos = heapq.heappop(heap)
        c = streams[r][pos]
        out.append(c)
        if pos + 1 < len(streams[r]):
            heapq.heappush(heap, (sent + c.nbytes, r, pos + 1))
    return tuple(out)
