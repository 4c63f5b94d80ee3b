"""Which primitive should carry a scatter of variable-size pieces? Bytes, write calls and seconds on gloo.

    torchrun --standalone --nproc_per_node 4 -m benchmarks.scatter_candidates CKPT [--bucket-mb 0.25] [--repeat 3]

(every rank) Plans CKPT as an FSDP2 load (``Shard(0)`` over every rank, read_policy scatter) with this
tree's planner, then moves every scatter chunk's bytes three ways, each rank reading ``/proc/self/io``
around each (``wchar``: bytes written, which on gloo are socket writes; ``syscw``: write calls):

- ``padded scatter``: what today's code did (``dist.scatter`` over the whole group, every segment padded
  to the largest piece of the chunk, every rank receiving one);
- ``all_to_all_single``: exact split sizes, but a collective of the whole group for every chunk (every
  rank calls it, with world-long split lists);
- ``batched isend/irecv``: the owner sends each holder exactly its piece, the others do nothing (what
  distload now does, through ``Comm.exchange_``).

Rank 0 prints one row per candidate: bytes written (all ranks) against the ideal, write calls, and
seconds (median over ``--repeat``, slowest rank). Bytes and calls do not depend on the machine's load;
seconds do: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def _io() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        got = {k: int(v) for k, v in (line.split(":") for line in f)}
    return got["wchar"], got["syscw"]


def _schedule(ckpt: str, world: int, bucket_mb: float):
    """Every scatter chunk as (owner, {rank: message bytes}), from this tree's planner."""
    from distload.format.header import read_checkpoint
    from distload.plan.dryrun import emulated_ranks, fsdp_layouts
    from distload.plan.load_plan import build_plan
    from distload.plan.shard_plan import build_shard_plan

    plan = build_plan(read_checkpoint(ckpt), emulated_ranks(world, per_node=world), bucket_mb=bucket_mb, wanted=set())
    sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                          bucket_bytes=plan.bucket_bytes, read_policy="scatter")
    return [(c.owner, {r: sum(p.nbytes for p in parts) for r, parts in c.parts_by_rank().items()})
            for c in sp.scatters]


def padded(rank: int, world: int, chunks) -> None:
    for owner, sizes in chunks:
        seg = max(sizes.values())
        out = torch.empty(seg, dtype=torch.uint8)
        send = list(torch.empty(seg * world, dtype=torch.uint8).split(seg)) if rank == owner else None
        dist.scatter(out, send, src=owner)


def alltoallv(rank: int, world: int, chunks) -> None:
    for owner, sizes in chunks:
        ins = [sizes.get(r, 0) if rank == owner else 0 for r in range(world)]
        outs = [sizes.get(rank, 0) if r == owner else 0 for r in range(world)]
        dist.all_to_all_single(torch.empty(sum(outs), dtype=torch.uint8), torch.empty(sum(ins), dtype=torch.uint8),
                               output_split_sizes=outs, input_split_sizes=ins)


def p2p(rank: int, world: int, chunks) -> None:
    for owner, sizes in chunks:
        if rank == owner:
            ops = [dist.P2POp(dist.isend, torch.empty(n, dtype=torch.uint8), r) for r, n in sizes.items()
                   if r != owner and n]
        elif sizes.get(rank):
            ops = [dist.P2POp(dist.irecv, torch.empty(sizes[rank], dtype=torch.uint8), owner)]
        else:
            continue
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


CANDIDATES = {"padded scatter": padded, "all_to_all_single": alltoallv, "batched isend/irecv": p2p}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--bucket-mb", type=float, default=0.25)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = _schedule(args.ckpt, world, args.bucket_mb)
    ideal = sum(n for owner, sizes in chunks for r, n in sizes.items() if r != owner)
    rows = []
    for name, move in CANDIDATES.items():
        seconds, wrote, calls = [], [], []
        for _ in range(args.repeat):
            dist.barrier()
            w0, c0 = _io()
            t0 = time.perf_counter()
            move(rank, world, chunks)
            dist.barrier()
            t = time.perf_counter() - t0
            w1, c1 = _io()
            got = [None] * world
            dist.all_gather_object(got, (t, w1 - w0, c1 - c0))
            seconds.append(max(g[0] for g in got))
            wrote.append(sum(g[1] for g in got))
            calls.append(sum(g[2] for g in got))
        rows.append((name, statistics.median(seconds), statistics.median(wrote), statistics.median(calls)))
    if rank == 0:
        print(f"world {world}, {len(chunks)} scatter chunks, ideal {ideal / 1e6:.2f} MB "
              "(bytes and calls include each step's closing barrier)")
        print("| candidate | seconds (median) | bytes written, all ranks | x ideal | write calls |")
        print("|---|---|---|---|---|")
        for name, secs, wrote, calls in rows:
            print(f"| {name} | {secs:.3f} | {wrote / 1e6:.2f} MB | {wrote / ideal:.2f} | {calls:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
