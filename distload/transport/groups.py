"""Checks that a load's ranks were handed a usable group and the same arguments.

Pure helpers with no collectives of their own: :func:`check_group_device`
runs on each rank before the first collective, and :func:`argument_mismatch`
on every rank after the plan phase's first all-gather, which carries each
rank's :func:`load_arguments`. Every rank sees the same gathered list, so
every rank raises the same error and none is left waiting in a later
collective.
"""

from __future__ import annotations

import os

import torch

from ..errors import DistLoadError

# The arguments every rank must agree on: they decide the plan and its collectives. The device's
# type decides the agreement schedule (every step on CUDA, every 16th on CPU) and the buffers' kind.
LOAD_ARGUMENTS = ("path", "dtype", "strict", "read_policy", "bucket_mb", "subset", "device")


def load_arguments(path, dtype, strict, read_policy, bucket_mb, subset=False,
                   device: torch.device | str = "cpu") -> tuple[str, ...]:
    """This rank's arguments, in :data:`LOAD_ARGUMENTS` order, as comparable text.

    ``key_map`` is left out: a callable has no value to compare across ranks.
    Of ``device`` only the type counts (``cuda:3`` on one rank and ``cuda:0``
    on another is the normal case).
    """
    return (os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path), str(dtype), repr(strict),
            repr(read_policy), repr(bucket_mb), repr(bool(subset)), torch.device(device).type)


def argument_mismatch(gathered: list[tuple[str, ...] | None],
                      nodes: list[str] | None = None) -> DistLoadError | None:
    """(every rank) The error naming each argument and the ranks whose value differs, if any.

    Every argument is compared with rank 0's, except ``path``: with node-local
    storage each node may see the checkpoint under its own path (the open
    phase then checks every file against rank 0's headers), so ``path`` is
    compared with the first rank of the same node (``nodes[r]``, the plan's
    node keys). Without ``nodes`` every rank counts as one node.
    """
    if not gathered or gathered[0] is None:
        return None
    base = gathered[0]
    first_on_node: dict[str, int] = {}
    failures: dict[int, str] = {}
    for r, args in enumerate(gathered):
        node = nodes[r] if nodes is not None else ""
        peer = first_on_node.setdefault(node, r)
        if args is None:
            continue
        diffs = []
        for i, name in enumerate(LOAD_ARGUMENTS):
            ref, who = (gathered[peer], peer) if name == "path" else (base, 0)
            if ref is not None and args[i] != ref[i]:
                diffs.append(f"{name} is {args[i]} here but {ref[i]} on rank {who}")
        if diffs:
            failures[r] = ("load arguments differ between ranks: " + "; ".join(diffs)
                           + f" (every rank must pass the same {', '.join(LOAD_ARGUMENTS)}; "
                           "only ranks on different nodes may name the checkpoint by different paths)")
    return DistLoadError.from_failures("plan", failures) if failures else None


def check_group_device(group, device: torch.device, backend: str) -> None:
    """(each rank, before any collective) Refuse a group that cannot move memory of ``device``'s type.

    An NCCL-only group moves only CUDA memory: with ``device="cpu"`` it would
    fail at the first collective with an opaque backend error.
    """
    types = getattr(group, "_device_types", None) if group is not None else None
    if types is not None:
        serves = {t.type for t in types}
    else:  # an older torch: judge by the backend's name
        serves = {"cuda"} if str(backend) == "nccl" else {"cpu", "cuda"}
    if device.type == "cpu" and "cpu" not in serves:
        raise DistLoadError(
            f"device='cpu' needs a process group that moves host memory (gloo), but the group's backend "
            f"{backend} serves only {', '.join(sorted(serves))} tensors; pass a gloo group "
            "(dist.new_group(backend='gloo')) as process_group, or load with device='cuda'")
