"""Sockets each rank holds for a gloo side group, connected eagerly (full mesh) or lazily: a count, not a timing.

    python -m benchmarks.gloo_sockets --world 16

Starts ``--world`` processes on one machine (a FileStore, no ports), makes the
default group, then a gloo side group as distload makes it for control
messages on NCCL (:func:`distload.transport.comm.control_group`), once with
``TORCH_GLOO_LAZY_INIT`` unset (gloo's full mesh) and once under
:func:`distload.transport.netif.gloo_group_env` (lazy pair connects). After
each step it counts this process's sockets in ``/proc/self/fd``: made (the
group exists), then after the exchanges a load runs on it (an all-reduce of
one int, an all-gather of objects, an object broadcast from rank 0). Prints
one row per mode: the most sockets any rank added, and rank 0's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile


def sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def _rank(rank: int, world: int, store: str, lazy: bool, out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    from distload.transport.netif import LAZY_INIT, gloo_group_env

    os.environ.pop(LAZY_INIT, None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    base = sockets()
    if lazy:
        with gloo_group_env():
            side = dist.new_group(backend="gloo")
    else:
        side = dist.new_group(backend="gloo")
    made = sockets() - base
    flag = torch.zeros(1, dtype=torch.int32)
    dist.all_reduce(flag, group=side)
    objs: list = [None] * world
    dist.all_gather_object(objs, {"rank": rank}, group=side)
    box = [rank]
    dist.broadcast_object_list(box, src=0, group=side)
    used = sockets() - base
    dist.barrier()
    out.put((rank, made, used))
    dist.destroy_process_group()


def count(world: int, lazy: bool) -> list[tuple[int, int, int]]:
    """(rank, sockets after making the group, sockets after one load's exchanges) for every rank."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), lazy, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = sorted(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(60)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=16)
    args = p.parse_args(argv)
    print(f"| gloo side group, world {args.world} | sockets per rank once made (max / rank 0) "
          "| after one load's exchanges (max / rank 0) |")
    print("|---|---|---|")
    for lazy in (False, True):
        rows = count(args.world, lazy)
        name = "lazy (TORCH_GLOO_LAZY_INIT=1, as distload makes it)" if lazy else "eager full mesh (gloo's default)"
        print(f"| {name} | {max(r[1] for r in rows)} / {rows[0][1]} | {max(r[2] for r in rows)} / {rows[0][2]} |")


if __name__ == "__main__":
    main()
