"""DTensor destinations: finding them, describing their sharding, materializing their local shards.

Runs on every rank, locally (no collectives).

Note on FSDP2:
    ``fully_shard`` keeps its own references (``FSDPParam``) to the sharded
    parameters, so replacing ``module._parameters`` entries afterwards would
    detach the model from FSDP. Instead the model goes through
    ``nn.Module._apply`` — what ``model.to_empty()`` does — which swaps each
    DTensor's contents in place (DTensor is a wrapper subclass, so the
    ``Parameter`` objects keep their identity) and which FSDP2 overrides to
    re-register its sharded parameters (``reset_sharded_param``). The loader
    then fills each DTensor's local tensor in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import DistLoadError
from ..format.dtypes import param_dtypes
from ..plan.shard import Layout, Placement, Sharding, layout_of


def is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def has_dtensors(model: nn.Module) -> bool:
    return any(is_dtensor(v) for v in model.state_dict(keep_vars=True).values())


def sharding_of(t, group_rank: Callable[[int], int], meshes: dict | None = None) -> Sharding:
    """A DTensor's mesh and placements as plain data; ``group_rank`` maps global ranks.

    ``meshes`` caches each mesh's group ranks and shape across calls:
    thousands of tensors share a few meshes, each as large as the job, and
    ``DeviceMesh.mesh`` rebuilds its rank tensor on every access.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = t.device_mesh
    places = []
    for p in t.placements:
        if isinstance(p, _StridedShard):
            places.append(Placement("strided", p.dim % t.ndim, int(p.split_factor)))
        elif isinstance(p, Shard):
            places.append(Placement("shard", p.dim % t.ndim))
        elif isinstance(p, Replicate):
            places.append(Placement("replicate"))
        else:
            raise DistLoadError(f"cannot load into a DTensor with placement {p}: only Shard and Replicate "
                                "hold checkpoint values")
    known = meshes.get(id(mesh)) if meshes is not None else None
    if known is None:
        grid = mesh.mesh
        known = tuple(group_rank(int(r)) for r in grid.flatten().tolist()), tuple(grid.shape)
        if meshes is not None:
            meshes[id(mesh)] = known
    return Sharding(*known, tuple(places))


def shardings(model: nn.Module, group=None) -> dict[str, Sharding]:
    """(coordinator) Every DTensor parameter or buffer of ``model``, by state-dict name."""
    import torch.distributed as dist

    def group_rank(g: int) -> int:
        if group is None or not dist.is_initialized():
            return g
        r = dist.get_group_rank(group, g)
        if r < 0:
            raise DistLoadError(f"a DTensor's mesh holds global rank {g}, which is not in the load's process group")
        return r

    meshes: dict = {}  # id(mesh) -> (group ranks, shape); the model keeps every mesh alive meanwhile
    return {k: sharding_of(v, group_rank, meshes) for k, v in model.state_dict(keep_vars=True).items()
            if is_dtensor(v)}


SubmeshView = tuple[tuple[Sharding, ...], tuple[tuple[int, int], ...]]


def submesh_view(model: nn.Module, group, world_size: int) -> SubmeshView | None:
    """(every rank, locally) This rank's DTensors whose mesh is not the whole group, compactly.

    Rank 0 cannot see these from its own model: with FSDP over "dp" in a
    dp x tp job, a norm weight lives on one dp submesh per tp column, and
    each rank's DTensor names only its own. Each rank sends its view with
    the plan inputs: its distinct meshes and, per such tensor, its position
    in ``state_dict`` order (equal on every rank, which the model digest
    checks) with the index of its sharding. None when every mesh is whole.
    """
    if not has_dtensors(model):
        return None
    distinct: dict[Sharding, int] = {}
    items = []
    by_name = shardings(model, group)
    for pos, name in enumerate(model.state_dict(keep_vars=True)):
        sharding = by_name.get(name)
        if sharding is not None and len(sharding.ranks) < world_size:
            items.append((pos, distinct.setdefault(sharding, len(distinct))))
    return (tuple(distinct), tuple(items)) if items else None


def other_submeshes(model: nn.Module, views: list[SubmeshView | None]) -> dict[str, list[Sharding]]:
    """(coordinator) Name -> every rank's sharding, for tensors some rank holds on a partial mesh."""
    names = list(model.state_dict(keep_vars=True))
    out: dict[str, list[Sharding]] = {}
    for view in views:
        if view is None:
            continue
        meshes, items = view
        for pos, idx in items:
            if pos >= len(names):
                raise DistLoadError("ranks report DTensors at positions their model does not have; "
                                    "every rank must build the same model")
            out.setdefault(names[pos], []).append(meshes[idx])
    return out


def sharded_layouts(model: nn.Module, shapes: dict[str, tuple[int, ...]], wanted: set[str], group,
                    world_size: int, submeshes: Mapping[str, list[Sharding]] | None = None) -> dict[str, Layout]:
    """(coordinator) The layout of every wanted DTensor that is not replicated on every rank.

    DTensors replicated everywhere are left to the broadcast path.
    ``submeshes`` adds the other ranks' meshes of tensors held on partial
    meshes (:func:`other_submeshes`): together they make one layout.
    """
    submeshes = submeshes or {}
    out = {}
    for name, sharding in shardings(model, group).items():
        if name in shapes and name in wanted:
            try:
                layout = layout_of(shapes[name], [sharding, *submeshes.get(name, ())], world_size)
            except ValueError as e:
                raise DistLoadError(f"{name}: {e}; every rank must shard the model the same way") from None
            if not layout.replicated:
                out[name] = layout
    return out


def materialize_dtensors(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                         stored: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """(every rank) Give meta DTensors real local memory on ``device``, keeping their identity.

    Returns this rank's local tensor for every DTensor state-dict name (tied
    names share one). ``dtype`` and ``stored`` pick each DTensor parameter's
    dtype, like the replicated path (:func:`distload.format.dtypes.param_dtypes`).
    Plain tensors are left to
    :func:`distload.model.place.materialize`; :func:`restore_dtensors` undoes this,
    also after a failure part-way.
    """
    params = {id(p) for p in model.parameters()}
    want_of = param_dtypes(model.named_parameters(remove_duplicate=False), dtype, stored)

    def empty(t: torch.Tensor) -> torch.Tensor:
        if not (is_dtensor(t) and t.is_meta):
            return t
        want = want_of(t) if id(t) in params else t.dtype
        return torch.empty_like(t, device=device, dtype=want)

    with torch.no_grad():
        model._apply(empty)
    tensors = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if is_dtensor(v):
            local = v._local_tensor
            if not local.is_contiguous() or local.device != device:
                raise DistLoadError(f"{k}: the local shard is not a contiguous tensor on {device} "
                                    f"(device {local.device}); build the mesh on the load's device type")
            tensors[k] = local
    return tensors


def restore_dtensors(model: nn.Module) -> None:
    """(every rank) Put every DTensor of ``model`` back on the meta device."""
    with torch.no_grad():
        model._apply(lambda t: torch.empty_like(t, device="meta") if is_dtensor(t) else t)
