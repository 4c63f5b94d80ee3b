"""(every rank, locally) Placing checkpoint keys through a :class:`~distload.keys.KeyMap`.

:func:`keyed_placement` turns the model's :class:`~distload.place.Placement`
(model key -> tensor) into one keyed by checkpoint key: each key's
destination is the view of its model tensor that its bytes fill (a whole
parameter, a DTensor's local shard, or one expert's slice of a fused
tensor, maybe non-contiguous), so the transfer loop places converted keys
with the same ``resolve`` / ``commit`` as any other.

Sources of gathered conversions land in buffers instead; when the last
byte of an op's sources is committed, transformers' op runs on them, the
results go into their targets (this rank's region of them for DTensors),
and the buffers are freed. Extra memory is therefore bounded by the
conversions whose sources are in flight, each about one target.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .dtypes import torch_dtype
from .keys import GatheredOp, KeyMap
from .place import Placement
from .shard import Ranges

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
    """A placement by checkpoint key that also runs gathered conversions.

    ``resolve`` never offers a gathered source's buffer, so every byte of it
    goes through ``commit``, which counts them and runs the op after the last.
    """

    def __init__(self, dests: dict[str, torch.Tensor], dtypes: dict[str, str], restore, *, key_map: KeyMap,
                 model: nn.Module, targets: Mapping[str, torch.Tensor], regions: Mapping[str, Region | None],
                 device: torch.device, shapes: Mapping[str, tuple[int, ...]]):
        ops = {k: g for g in key_map.gathered for k in g.sources}
        buffers = _LazyBuffers(ops, shapes, dtypes, device)
        buffers.update(dests)
        super().__init__(buffers, dtypes, restore)
        self.ops, self.model, self.targets, self.regions = ops, model, targets, regions
        self.remaining = {g.layer: sum(_nbytes(shapes[k], torch_dtype(dtypes[k])) for k in g.sources)
                          for g in key_map.gathered}

    def resolve(self, name: str, offset: int, nbytes: int, device: torch.device) -> torch.Tensor | None:
        if name in self.ops:
            return None
        return super().resolve(name, offset, nbytes, device)

    def commit(self, name: str, offset: int, src: torch.Tensor) -> None:
        super().commit(name, offset, src)
        g = self.ops.get(name)
        if g is not None:
            self.remaining[g.layer] -= src.numel()
            if not self.remaining[g.layer]:
                self._convert(g)

    def _convert(self, g: GatheredOp) -> None:
        made = g.run({k: self.dests[k] for k in g.sources}, self.model)
        for name in g.targets:
            value = made[name]
            if name in self.regions:
                value = take_region(value, self.regions[name])
            self.targets[name].copy_(value)
        for k in g.sources:
            self.dests.pop(k, None)


class _LazyBuffers(dict):
    """Checkpoint key -> tensor; a gathered op's source gets its buffer (as stored) on first use."""

    def __init__(self, lazy: Mapping[str, GatheredOp], shapes, dtypes, device):
        super().__init__()
        self.lazy, self.shapes, self.dtypes, self.device = lazy, shapes, dtypes, device

    def __missing__(self, key: str) -> torch.Tensor:
        if key not in self.lazy:
            raise KeyError(key)
        t = torch.empty(self.shapes[key], dtype=torch_dtype(self.dtypes[key]), device=self.device)
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


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
