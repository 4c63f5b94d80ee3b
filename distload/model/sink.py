"""A placement with no model: whole tensors handed to a consumer as they land.

(every rank, locally) :class:`StreamSink` is what the transfer loop writes
through when a stream (:mod:`distload.stream`) yields tensors instead of
filling a model. It answers the loop's two questions:

- ``resolve``: a tensor larger than one step (split into bucket-sized
  segments) is assembled in its own memory, allocated when its first
  segment is placed, and its segments land straight there; anything that
  arrives whole in one step lands in the step's buffer;
- ``commit``: bytes landed in a buffer. A whole tensor is kept as a view of
  that buffer (no copy): the loop holds the buffer until the consumer moves
  on, and reuses it after. Segments are copied into the assembly.

After each step, :meth:`StreamSink.landed` is told which pieces arrived and
returns the tensors that are now complete, viewed in their dtype and shape
(cast when ``dtype=`` asks for it). Memory beyond the loop's buckets: the
tensor being assembled, if one is larger than a bucket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import torch

from ..format.dtypes import torch_dtype
from ..plan.items import Piece
from .place import Placement


class StreamSink(Placement):
    """(every rank, locally) Where a stream's bytes land, and the tensors they complete."""

    def __init__(self, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str],
                 wants: Mapping[str, torch.dtype], device: torch.device):
        super().__init__({}, dict(dtypes))
        self.sizes, self.shapes, self.wants, self.device = sizes, shapes, wants, device
        self._whole: dict[str, torch.Tensor] = {}  # name -> its bytes, in a step's buffer
        self._built: dict[str, torch.Tensor] = {}  # name -> memory it is assembled in
        self._got: dict[str, int] = {}  # name -> bytes landed so far
        self._lock = threading.Lock()  # owners resolve on the reader thread too

    def _assembly(self, name: str) -> torch.Tensor:
        with self._lock:
            buf = self._built.get(name)
            if buf is None:
                buf = self._built[name] = torch.empty(self.sizes[name], dtype=torch.uint8, device=self.device)
            return buf

    def resolve(self, name: str, offset: int, nbytes: int, device: torch.device) -> torch.Tensor | None:
        if nbytes == self.sizes[name] or device != self.device:
            return None  # arrives whole: keep it where it lands
        return self._assembly(name)[offset : offset + nbytes]

    def commit(self, name: str, offset: int, src: torch.Tensor) -> None:
        if offset == 0 and src.numel() == self.sizes[name]:
            self._whole[name] = src
            return
        self._assembly(name)[offset : offset + src.numel()].copy_(src)

    def landed(self, pieces: Iterable[Piece]) -> list[tuple[str, torch.Tensor]]:
        """(after each step) Record what arrived; the tensors now complete, in piece order."""
        done = []
        for p in pieces:
            got = self._got.get(p.name, 0) + p.nbytes
            if got < self.sizes[p.name]:
                self._got[p.name] = got
                continue
            self._got.pop(p.name, None)
            raw = self._whole.pop(p.name, None)
            if raw is None:
                with self._lock:
                    raw = self._built.pop(p.name)
            done.append((p.name, self.tensor(p.name, raw)))
        return done

    def empty(self, name: str) -> torch.Tensor:
        """A tensor with no bytes (no step carries it)."""
        return self.tensor(name, torch.empty(0, dtype=torch.uint8, device=self.device))

    def tensor(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` bytes as ``name``'s dtype and shape, cast if asked."""
        st = torch_dtype(self.dtypes[name], name)
        if raw.storage_offset() % st.itemsize:
            raw = raw.clone()  # reinterpreting needs element alignment; rare in real files
        out = raw.view(st).view(self.shapes[name])
        want = self.wants[name]
        return out if want == st else out.to(want)
