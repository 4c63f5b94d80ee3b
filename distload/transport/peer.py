"""A transport over part of a group's ranks that makes no process group: point-to-point sends.

(the member ranks only) :class:`PeerGroup` is what
:meth:`TorchComm.subgroup <distload.transport.comm.TorchComm.subgroup>`
returns when it may not create groups (``make_groups=False``: an inference
engine's workers, which run over the engine's own groups). Each collective
is a set of sends and receives over the parent group between the members
only, which is also how gloo and NCCL carry out a scatter internally: the
root sends each member its segment. Ranks outside the set take no part.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from .comm import Comm, TorchComm


class PeerGroup(Comm):
    """(member ranks) ``ranks`` of ``parent`` (sorted); member ``i`` is ``parent`` rank ``ranks[i]``."""

    has_subgroups = False

    def __init__(self, parent: TorchComm, ranks: tuple[int, ...]):
        self.parent, self.ranks = parent, tuple(ranks)
        self.rank, self.world_size, self.device = self.ranks.index(parent.rank), len(self.ranks), parent.device

    def exchange_(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        self.parent.exchange_([(b, self.ranks[d]) for b, d in sends], [(b, self.ranks[s]) for b, s in recvs])

    def broadcast_(self, buf: torch.Tensor, src: int) -> None:
        if self.rank == src:
            self.exchange_([(buf, i) for i in range(self.world_size) if i != src], [])
        else:
            self.exchange_([], [(buf, src)])

    def scatter_(self, buf: torch.Tensor, src: int, send: torch.Tensor | None = None) -> None:
        n = buf.numel()
        if n == 0:
            return
        if self.rank == src:
            assert send is not None
            buf.copy_(send[src * n : (src + 1) * n])
            self.exchange_([(send[i * n : (i + 1) * n], i) for i in range(self.world_size) if i != src], [])
        else:
            self.exchange_([], [(buf, src)])

    # ---- small messages: gathered on the first member, which answers everyone -------------

    def any_failed(self, failed: bool) -> bool:
        got = self._at_first(bytes([int(failed)]))
        return bool(self._from_first(bytes([max(g[0] for g in got)]) if got is not None else None)[0])

    def all_gather_object(self, obj: Any) -> list[Any]:
        got = self._at_first(pickle.dumps(obj))
        return pickle.loads(self._from_first(pickle.dumps([pickle.loads(g) for g in got]) if got is not None else None))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.rank == src:
            data = self._tensor(pickle.dumps(obj))
            size[0] = data.numel()
            self.broadcast_(size, src)
            self.broadcast_(data, src)
            return obj
        self.broadcast_(size, src)
        data = torch.empty(int(size[0]), dtype=torch.uint8, device=self.device)
        self.broadcast_(data, src)
        return pickle.loads(data.cpu().numpy().tobytes())

    def _tensor(self, data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if data else \
            torch.empty(0, dtype=torch.uint8, device=self.device)

    def _at_first(self, data: bytes) -> list[bytes] | None:
        """Every member's ``data`` on member 0 (None elsewhere)."""
        if self.rank != 0:
            size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            self.exchange_([(size, 0)], [])
            self.exchange_([(self._tensor(data), 0)], [])
            return None
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        self.exchange_([], [(sizes[i], i) for i in range(1, self.world_size)])
        bufs = [torch.empty(int(sizes[i][0]), dtype=torch.uint8, device=self.device) for i in range(self.world_size)]
        self.exchange_([], [(bufs[i], i) for i in range(1, self.world_size)])
        return [data] + [b.cpu().numpy().tobytes() for b in bufs[1:]]

    def _from_first(self, data: bytes | None) -> bytes:
        """Member 0's ``data`` on every member."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            assert data is not None
            size[0] = len(data)
        self.broadcast_(size, 0)
        if self.rank == 0:
            self.broadcast_(self._tensor(data), 0)
            return data
        buf = torch.empty(int(size[0]), dtype=torch.uint8, device=self.device)
        self.broadcast_(buf, 0)
        return buf.cpu().numpy().tobytes()
