"""One measured load on one rank: ``torchrun ... -m benchmarks.worker --loader NAME ...``.

(all ranks) Joins the group, builds whatever the loader needs untimed, then
times the load *and* a touch of every local page, so loaders that hand back
mmap views pay for their deferred reads inside the timer. Memory is sampled
on a thread during the load. Rank 0 writes every rank's figures as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import probes
from .loaders import LOADERS, Ctx, HostToDevice, meta_model


def _view(args: argparse.Namespace, rank: int) -> Path:
    """This rank's path to the checkpoint: its node's view on the emulated network filesystem."""
    if args.netfs:
        # Each view is an emulated node: say so, as torchrun's GROUP_RANK would on a cluster, so
        # the plan spreads files over nodes and accepts a different path on each node.
        os.environ["GROUP_RANK"] = str(rank // args.ranks_per_node)
        return Path(args.netfs) / f"node{rank // args.ranks_per_node}"
    return Path(args.ckpt)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = Ctx(rank, world, args.mode, _view(args, rank), device, Path(args.ckpt))
    if args.read_policy:
        ctx.extra["read_policy"] = args.read_policy
    if args.io_threads:
        ctx.extra["io_threads"] = args.io_threads
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        ctx.mesh = init_device_mesh(device.type, (world,))
    loader = LOADERS[args.loader]
    reason = loader.missing()
    if reason is not None:  # a peer this machine lacks: a skipped row, not a failure
        dist.destroy_process_group()
        return {"loader": args.loader, "mode": args.mode, "world": world, "device": str(device),
                "skipped": reason} if rank == 0 else {}
    error = None
    row: dict = {"rank": rank}
    same_state = None
    try:
        # Every loader runs in an equally prepared process, the floor included:
        # on the reference VM, first-touching fresh memory cost up to 3x more
        # in a process that had imported transformers and built a model than in
        # a bare one (see the README's benchmark notes), so a bare floor would
        # be an unfairly cheap reference.
        same_state = meta_model(ctx)
        state = loader.prepare(ctx)
    except Exception as e:
        state, error = None, e
    gc.collect()
    dist.barrier()
    io0 = probes.proc_io()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        with probes.MemorySampler() as mem:
            if error is None:
                try:
                    result = loader.load(ctx, state)
                    tensors = result if isinstance(result, dict) else probes.local_tensors(result)
                    probes.touch(tensors.values())
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                except Exception as e:
                    error = e
        seconds = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
    finally:
        io1 = probes.proc_io()
    row.update(seconds=seconds, cpu_s=cpu_s, **mem.growth(), read_bytes=io1["read_bytes"] - io0["read_bytes"],
               rchar=io1["rchar"] - io0["rchar"])
    if error is None:
        row["local_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        row["mmap_fraction"] = probes.mmap_fraction(tensors.values())
        row["sums"] = probes.checksum(tensors) if args.checksum else None
        row.update(ctx.extra)
    else:
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exception(error)[-6:]
    del same_state
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    if rank != 0:
        return {}
    errors = [r.get("error") for r in rows if r.get("error")]
    out = {
        "loader": args.loader, "mode": args.mode, "world": world, "device": str(device),
        "seconds": max(r["seconds"] for r in rows),
        "peak_anon_growth": max(r["peak_anon_growth"] for r in rows),
        "peak_rss_growth": max(r["peak_rss_growth"] for r in rows),
        "read_bytes": sum(r["read_bytes"] for r in rows),
        "rchar": sum(r["rchar"] for r in rows),
        "cpu_s": sum(r["cpu_s"] for r in rows),
        "error": errors[0] if errors else None,
        "ranks": rows,
    }
    if not errors:
        out["mmap_fraction"] = max(r["mmap_fraction"] for r in rows)
        out["local_bytes"] = max(r["local_bytes"] for r in rows)
        if args.checksum:
            out["checksum"] = probes.combine([r.pop("sums") for r in rows])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--loader", required=True, choices=sorted(LOADERS) + [HostToDevice.name])
    p.add_argument("--mode", default="replicated", choices=["replicated", "fsdp"])
    p.add_argument("--ckpt", required=True, help="the checkpoint directory (config is read here)")
    p.add_argument("--netfs", default="", help="mount point of the emulated network filesystem")
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--read-policy", default="", help="distload read_policy in fsdp mode")
    p.add_argument("--checksum", action="store_true", help="CRC every local tensor after the timer")
    p.add_argument("--io-threads", type=int, default=0, help="distload's io_threads (default: its own)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.loader == HostToDevice.name:
        LOADERS[HostToDevice.name] = HostToDevice()
    out = measure(args)
    if out:
        args.out.write_text(json.dumps(out, indent=1))
    # The measurement is written and the group destroyed; skip interpreter
    # teardown, where one run in about forty aborted ("terminate called without
    # an active exception") after its result was already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
