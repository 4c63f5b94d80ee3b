"""The plan of a stream whose ranks may each want different tensors.

Pure and deterministic. A stream (:mod:`distload.stream`) starts from the
ordinary load plan of the whole checkpoint; each rank then says which tensors
it wants as a bitmap over the plan's tensors in file order
(:func:`wanted_mask`), and the ranks exchange only the distinct bitmaps
(ranks with equal wishes share one; :class:`Wishes`). From those, every
rank derives the same plan (:func:`stream_plan`):

- a tensor every rank wants is broadcast, as in a load (``LoadPlan.moved``);
- a tensor only some ranks want is laid out as replicated over exactly those
  ranks (:func:`held_by`), so the transfer loop scatters one whole copy to
  each of them and none to the others; a tensor one rank alone wants is read
  by that rank itself when it owns the file or ``read_policy`` says so (a
  slice read, no collective);
- a tensor nobody wants is never read.

Each file is still read once, by its owner. When the ranks want different
tensors, each file goes to a rank that wants most of its bytes (least
loaded first), so a pipeline stage reads its own layers' files and a tensor
crosses the network only when its file also holds another stage's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ..errors import DistLoadError
from ..format.header import ShardFile
from .load_plan import LoadPlan, tensor_mask
from .shard import Layout, Placement, Sharding, layout_of
from .shard_plan import build_shard_plan

#: What a rank may ask for: every tensor (None), a collection of names, or a predicate on names.
Names = Collection[str] | Callable[[str], bool] | None


def wanted_mask(files: Sequence[ShardFile], names: Names) -> bytes | None:
    """(each rank, locally) The bitmap of the tensors this rank wants, in file order; None for all of them.

    A collection naming a tensor the checkpoint lacks is an error that
    names it; a predicate that raises fails the same way (the caller
    agrees on it with the other ranks).
    """
    if names is None:
        return None
    if callable(names):
        keep = {t.name for f in files for t in f.tensors if names(t.name)}
    else:
        if isinstance(names, str):
            raise DistLoadError(f"names= takes a collection of tensor names or a predicate, not the string {names!r}")
        keep = set(names)
        have = {t.name for f in files for t in f.tensors}
        unknown = sorted(keep - have)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise DistLoadError(f"names= lists {len(unknown)} tensor(s) the checkpoint does not hold: {shown}")
    return tensor_mask(tuple(files), keep)


def names_in(files: Sequence[ShardFile], mask: bytes | None) -> list[str]:
    """The names a bitmap selects, in file order (None: every tensor)."""
    names = [t.name for f in files for t in f.tensors]
    return names if mask is None else [n for k, n in enumerate(names) if mask[k >> 3] >> (k & 7) & 1]


def digest(mask: bytes | None) -> str:
    """A short fingerprint of one rank's wishes, exchanged instead of the bitmap itself."""
    return "all" if mask is None else hashlib.sha256(mask).hexdigest()


@dataclass(frozen=True)
class Wishes:
    """Every rank's wishes, with each distinct bitmap once: ``masks[which[rank]]``.

    What travels is one fingerprint per rank and each distinct bitmap once,
    so a job whose ranks fall into a few groups (pipeline stages) exchanges
    a few bitmaps, whatever the world size.
    """

    masks: tuple[bytes | None, ...]
    which: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        return len(self.masks) == 1


def group_digests(digests: Sequence[str]) -> tuple[list[str], tuple[int, ...], list[int]]:
    """(every rank alike) Distinct fingerprints in rank order, each rank's index into them, and each one's first rank."""
    order: dict[str, int] = {}
    first: list[int] = []
    which = []
    for r, d in enumerate(digests):
        if d not in order:
            order[d] = len(order)
            first.append(r)
        which.append(order[d])
    return list(order), tuple(which), first


def held_by(shape: tuple[int, ...], ranks: tuple[int, ...], world_size: int) -> Layout:
    """The whole tensor on each of ``ranks`` and nothing elsewhere (a scalar as one element)."""
    mesh = Sharding(tuple(ranks), (len(ranks),), (Placement("replicate"),))
    return layout_of(tuple(shape) or (1,), mesh, world_size)


def stream_plan(plan: LoadPlan, wishes: Wishes, read_policy: str = "scatter",
                local_storage: bool = False) -> LoadPlan:
    """(every rank alike) The plan that moves each tensor to exactly the ranks that want it.

    ``plan`` is the load plan of the whole checkpoint. See the module doc.
    ``read_policy`` (with ``local_storage``, which must be the same on every
    rank) decides who reads a tensor that one rank alone wants: its file's
    owner, which sends it over (``scatter``), or that rank itself (``slice``;
    ``auto``: on local storage, for tensors of at least 1 MiB). A tensor
    several ranks want is always read once and scattered.
    """
    world = plan.world_size
    if wishes.uniform:  # every rank wants the same: a load of those tensors, files placed as planned
        mask = wishes.masks[0]
        return plan if mask is None else _replace_moved(plan, mask)
    members: list[list[int]] = [[] for _ in wishes.masks]
    for r, g in enumerate(wishes.which):
        members[g].append(r)
    everyone = frozenset(range(len(wishes.masks)))
    groups_of: list[frozenset[int]] = []  # per tensor in file order: the groups that want it
    k = 0
    for f in plan.files:
        for _ in f.tensors:
            groups_of.append(frozenset(g for g, m in enumerate(wishes.masks)
                                       if m is None or m[k >> 3] >> (k & 7) & 1))
            k += 1
    holders: dict[frozenset[int], tuple[int, ...]] = {}
    for gs in set(groups_of):
        holders[gs] = tuple(sorted(r for g in gs for r in members[g]))
    owners = _assign(plan.files, groups_of, holders, world)
    broadcast: set[str] = set()
    layouts: dict[str, Layout] = {}
    k = 0
    for f in plan.files:
        for t in f.tensors:
            gs = groups_of[k]
            k += 1
            if gs == everyone:
                broadcast.add(t.name)
            elif gs:
                layouts[t.name] = held_by(t.shape, holders[gs], world)
    sharded = build_shard_plan(plan.files, owners, layouts, world_size=world, bucket_bytes=plan.bucket_bytes,
                               read_policy=read_policy, local_storage=local_storage) if layouts else None
    return LoadPlan(plan.root, world, plan.files, owners, plan.bucket_bytes, plan.ranks, plan.missing_in_files,
                    plan.warnings, moved=tensor_mask(plan.files, broadcast), sharded=sharded)


def _replace_moved(plan: LoadPlan, mask: bytes) -> LoadPlan:
    return LoadPlan(plan.root, plan.world_size, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                    plan.missing_in_files, plan.warnings, moved=mask)


def _assign(files: Sequence[ShardFile], groups_of: list[frozenset[int]],
            holders: dict[frozenset[int], tuple[int, ...]], world: int) -> tuple[int, ...]:
    """Each file to the least-loaded rank among those that want the largest share of its bytes.

    Files by wanted bytes, largest first (ties by name); load counts wanted
    bytes. A file nobody wants goes to rank 0 and is never opened.
    """
    per_file: list[dict[frozenset[int], int]] = []
    k = 0
    for f in files:
        by: dict[frozenset[int], int] = {}
        for t in f.tensors:
            gs = groups_of[k]
            k += 1
            if gs:
                by[gs] = by.get(gs, 0) + t.nbytes
        per_file.append(by)
    load = [0] * world
    owners = [0] * len(files)
    order = sorted(range(len(files)), key=lambda i: (-sum(per_file[i].values()), files[i].name))
    for i in order:
        by = per_file[i]
        if not by:
            continue
        top = min(by, key=lambda gs: (-by[gs], holders[gs]))
        owners[i] = min(holders[top], key=lambda r: (load[r], r))
        load[owners[i]] += sum(by.values())
    return tuple(owners)
