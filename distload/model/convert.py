"""(every rank, locally) Placing checkpoint keys through a :class:`~distload.plan.keys.KeyMap`.

:func:`keyed_placement` turns the model's :class:`~distload.model.place.Placement`
(model key -> tensor) into one keyed by checkpoint key: each key's
destination is the view of its model tensor that its bytes fill (a whole
parameter, a DTensor's local shard, or one expert's slice of a fused
tensor, maybe non-contiguous), so the transfer loop places converted keys
with the same ``resolve`` / ``commit`` as any other.

Sources of gathered conversions land in buffers instead, as stored, made
when their first bytes arrive: only on the op's rank, which takes them
(:meth:`KeyedPlacement.take_sources`) to run the op (:mod:`distload.transfer.results`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..format.dtypes import torch_dtype
from ..plan.keys import GatheredOp, KeyMap
from ..plan.shard import Ranges
from .place import Placement

Region = tuple[Ranges, ...]


def local_destinations(key_map: KeyMap, targets: Mapping[str, torch.Tensor],
                       regions: Mapping[str, Region | None] | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint key -> the view of this rank's model tensor that its bytes land in.

    ``targets`` maps model keys to this rank's tensors: whole tensors, or the
    local shard of a DTensor, whose global region is ``regions[key]``. A
    boxed source then lands in the part of its box the shard holds (empty
    when the shard misses the box). Sources of gathered ops are not included.
    """
    regions = regions or {}
    out = {}
    for ckey, route in key_map.routes.items():
        t = targets[route.target]
        if route.box is None:
            out[ckey] = t
        elif route.target in regions:
            out[ckey] = route.box.local_view(t, regions[route.target])
        else:
            out[ckey] = route.box.view(t)
    return out


def take_region(full: torch.Tensor, region: Region | None) -> torch.Tensor:
    """The elements of ``full`` in ``region`` (a rank's DTensor shard), in local order."""
    if region is None:
        return full.new_empty((0,) * full.dim())
    out = full
    for d, ranges in enumerate(region):
        if ranges == ((0, full.shape[d]),):
            continue
        if len(ranges) == 1:
            out = out.narrow(d, ranges[0][0], ranges[0][1] - ranges[0][0])
        else:
            index = [i for a, b in ranges for i in range(a, b)]
            out = out.index_select(d, torch.tensor(index, dtype=torch.long, device=full.device))
    return out


class KeyedPlacement(Placement):
    """A placement by checkpoint key that also holds the sources of gathered conversions.

    ``targets`` (model key -> this rank's tensor) and ``regions`` (this rank's
    global region of each DTensor) are where the ops' results go.
    """

    def __init__(self, dests: dict[str, torch.Tensor], dtypes: dict[str, str], restore, *, key_map: KeyMap,
                 model: nn.Module, targets: Mapping[str, torch.Tensor], regions: Mapping[str, Region | None],
                 device: torch.device, shapes: Mapping[str, tuple[int, ...]]):
        ops = {k: g for g in key_map.gathered for k in g.sources}
        buffers = _LazyBuffers(ops, shapes, dtypes, device)
        buffers.update(dests)
        super().__init__(buffers, dtypes, restore)
        self.buffers, self.model, self.targets, self.regions = buffers, model, targets, regions

    def take_sources(self, g: GatheredOp) -> dict[str, torch.Tensor]:
        """(the op's rank) Its sources' buffers, handed over: the placement keeps no reference."""
        out = {k: self.dests[k] for k in g.sources}  # a source with no bytes (empty) gets its buffer here
        for k in g.sources:
            del self.dests[k]
        return out

    @property
    def source_bytes(self) -> int:
        """Bytes of gathered-op sources that landed on this rank (buffers made so far)."""
        return self.buffers.made_bytes


class _LazyBuffers(dict):
    """Checkpoint key -> tensor; a gathered op's source gets its buffer (as stored) on first use."""

    def __init__(self, lazy: Mapping[str, GatheredOp], shapes, dtypes, device):
        super().__init__()
        self.lazy, self.shapes, self.dtypes, self.device = lazy, shapes, dtypes, device
        self.made_bytes = 0

    def __missing__(self, key: str) -> torch.Tensor:
        if key not in self.lazy:
            raise KeyError(key)
        t = torch.empty(self.shapes[key], dtype=torch_dtype(self.dtypes[key]), device=self.device)
        self.made_bytes += t.numel() * t.element_size()
        self[key] = t
        return t


def keyed_placement(placement: Placement, key_map: KeyMap, model: nn.Module, device: torch.device,
                    shapes: Mapping[str, tuple[int, ...]], regions: Mapping[str, Region | None]) -> Placement:
    """The model's placement (by model key) as one by checkpoint key (see the module docstring).

    ``regions`` holds this rank's global region of every DTensor, by model key.
    """
    targets = placement.dests
    dests = local_destinations(key_map, targets, regions)
    if not key_map.gathered:
        return Placement(dests, placement.dtypes, placement.restore)
    return KeyedPlacement(dests, placement.dtypes, placement.restore, key_map=key_map, model=model,
                          targets=targets, regions=regions, device=device, shapes=shapes)
