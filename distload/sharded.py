"""The loader's two hooks for models holding DTensors (FSDP2, tensor parallel, 2-D meshes).

- (coordinator) :func:`attach_sharded` splits the wanted tensors into those
  every rank holds whole (the broadcast plan) and sharded ones (a
  :class:`~distload.shard_plan.ShardPlan` attached to the plan).
- (every rank) :func:`sharded_destinations` materializes DTensors in place and
  returns each state-dict name's destination: the local shard for DTensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .comm import Comm, TorchComm
from .dtensor import has_dtensors, materialize_dtensors, shardings
from .index import Checkpoint
from .place import Destinations
from .plan import LoadPlan, RankInfo, build_plan
from .shard import layout_of
from .shard_plan import build_shard_plan
from .storage import is_local_storage


def attach_sharded(model: nn.Module, ckpt: Checkpoint, comm: Comm, ranks: list[RankInfo], wanted: set[str] | None,
                   *, bucket_mb: float, read_policy: str) -> LoadPlan | None:
    """(coordinator) The plan for a model with DTensors, or None when it has none."""
    if not has_dtensors(model):
        return None
    group = comm.group if isinstance(comm, TorchComm) else None
    shapes = {t.name: tuple(t.shape) for f in ckpt.files for t in f.tensors}
    layouts = {}
    for name, sharding in shardings(model, group).items():
        if name in shapes and (wanted is None or name in wanted):
            layout = layout_of(shapes[name], sharding, comm.world_size)
            if not layout.replicated:  # Replicate() everywhere: the broadcast path fills it
                layouts[name] = layout
    rest = (set(shapes) if wanted is None else set(wanted)) - set(layouts)
    plan = build_plan(ckpt, ranks, bucket_mb=bucket_mb, wanted=rest)
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=comm.world_size,
                          bucket_bytes=plan.bucket_bytes, read_policy=read_policy,
                          local_storage=is_local_storage(ckpt.root))
    return dataclasses.replace(plan, sharded=sp)


def sharded_destinations(model: nn.Module, device: torch.device, dtype: torch.dtype | None, plan: LoadPlan,
                         materialize: Callable[..., Destinations], rank: int) -> Destinations:
    """(every rank) Destinations for every state-dict name; DTensors map to their local shard.

    Checks each local shard's shape against the plan's layout, so a sharding
    rank 0 computed differently from DTensor fails loudly before data moves.
    """
    local = materialize_dtensors(model, device, dtype, plan.dtypes) if has_dtensors(model) else None
    try:
        dests = materialize(model, device, dtype, plan.dtypes)
    except BaseException:
        if local is not None:
            local.restore()
        raise
    if local is None:
        return dests
    dests.tensors.update(local.tensors)
    if plan.sharded is not None:
        for name, layout in plan.sharded.layouts.items():
            t = local.tensors.get(name)
            if t is not None and tuple(t.shape) != layout.local_shape(rank):
                raise ValueError(f"{name}: local shard is {list(t.shape)} but the plan expects "
                                 f"{list(layout.local_shape(rank))}")
    inner = dests.restore

    def restore() -> None:
        inner()
        local.restore()

    return Destinations(dests.tensors, dests.aliases, restore)


def local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of this rank's destinations, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in tensors.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total

