"""Bytes the sockets carry and seconds, FSDP2 with read_policy="scatter", today's code beside this tree's.

    python -m benchmarks.scale_wire                          # worlds 4 and 8, today's code = main at d53e139
    python -m benchmarks.scale_wire --today REV --worlds 4,8 --repeat 3 --bucket-mb 0.25 --preset demo

(parent) Writes the checkpoint once (``benchmarks.make_checkpoint``, a transformers Llama), checks out
``REV`` into a temporary git worktree (removed at the end), then for each world runs one ``torchrun``
job per code and repeat, alternating today / new. Each job builds the model on the meta device,
wraps every decoder block and the root in ``fully_shard`` (1-D mesh over every rank), and loads
with buckets smaller than the largest tensors. Every rank reads ``/proc/self/io`` around the load:
``wchar`` counts every byte written by ``write``-family calls, which on gloo are the socket writes
(no file is written during a load), and ``syscw`` the calls. The ideal is computed from the
planner of this tree: every byte a rank needs and does not read itself (the same for both codes:
the file assignment is the same).

Prints one row per world and code: median seconds (min-max), bytes written summed over ranks,
their ratio to the ideal, write calls. The jobs import ``distload`` from their tree alone
(``PYTHONPATH``, run from a scratch directory), so the two codes never mix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEFAULT_TODAY = "d53e139"  # main when the scale work branched


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def worker(args: argparse.Namespace) -> None:
    """(every rank, inside torchrun) One load; rank 0 writes every rank's figures to ``args.out``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import distload

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with distload.empty_init():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.ckpt))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dist.barrier()
    before = _io()
    t0 = time.perf_counter()
    distload.load_checkpoint(model, args.ckpt, bucket_mb=args.bucket_mb, read_policy="scatter")
    seconds = time.perf_counter() - t0
    after = _io()
    row = {"rank": rank, "seconds": seconds, "wchar": after["wchar"] - before["wchar"],
           "syscw": after["syscw"] - before["syscw"]}
    rows = [None] * world
    dist.all_gather_object(rows, row)  # after the measurement: not counted
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def ideal_bytes(ckpt: Path, world: int, bucket_mb: float) -> int:
    """(parent) The ideal for FSDP2 Shard(0) over ``world`` ranks on one node, from this tree's planner."""
    from distload.format.header import read_checkpoint
    from distload.plan.dryrun import emulated_ranks, fsdp_layouts, wire_bytes
    from distload.plan.load_plan import LoadPlan, build_plan
    from distload.plan.shard_plan import build_shard_plan

    plan = build_plan(read_checkpoint(ckpt), emulated_ranks(world, per_node=world), bucket_mb=bucket_mb, wanted=set())
    sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                          bucket_bytes=plan.bucket_bytes, read_policy="scatter")
    plan = LoadPlan(plan.root, world, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                    plan.missing_in_files, plan.warnings, plan.moved, sp)
    return wire_bytes(plan)[1]


def _run(code: Path, world: int, ckpt: Path, bucket_mb: float, scratch: Path) -> list[dict]:
    out = scratch / f"rows-{code.name}-{world}.json"
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(world), str(HERE), "--worker",
           "--ckpt", str(ckpt), "--bucket-mb", str(bucket_mb), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        causes = [line for line in proc.stderr.splitlines()
                  if any(w in line for w in ("terminate", "what()", "Error", "error:", "Abort"))][:20]
        raise SystemExit(f"{code}: world {world} failed:\n" + "\n".join(causes)
                         + f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help="a transformers Llama checkpoint (default: the preset, written once)")
    p.add_argument("--today", default=DEFAULT_TODAY, help="the git revision of today's code (default %(default)s)")
    p.add_argument("--worlds", default="4,8")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=0.25, help="smaller than the largest tensors (default 0.25)")
    p.add_argument("--preset", default="demo", help="benchmarks.make_checkpoint preset (default demo, ~20 MB)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.make_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="distload-scale-") as tmp:
        scratch = Path(tmp)
        ckpt = args.ckpt or make_checkpoint(scratch / "ckpt", args.preset)
        today = scratch / "today"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(today), args.today],
                       check=True, capture_output=True)
        try:
            print(f"checkpoint {ckpt} ({sum(f.stat().st_size for f in Path(ckpt).glob('*.safetensors')) / 1e6:.1f} MB), "
                  f"bucket {args.bucket_mb} MiB, today = {args.today}, new = {ROOT}")
            print("| world | code | seconds, median (min-max) | socket bytes written, all ranks | x ideal | write calls |")
            print("|---|---|---|---|---|---|")
            for world in (int(w) for w in args.worlds.split(",")):
                ideal = ideal_bytes(Path(ckpt), world, args.bucket_mb)
                got: dict[str, list[list[dict]]] = {"today": [], "new": []}
                for _ in range(args.repeat):
                    for name, code in (("today", today), ("new", ROOT)):
                        got[name].append(_run(code, world, Path(ckpt), args.bucket_mb, scratch))
                for name, runs in got.items():
                    secs = [max(r["seconds"] for r in rows) for rows in runs]
                    wrote = statistics.median(sum(r["wchar"] for r in rows) for rows in runs)
                    calls = statistics.median(sum(r["syscw"] for r in rows) for rows in runs)
                    print(f"| {world} | {name} | {statistics.median(secs):.3f} ({min(secs):.3f}-{max(secs):.3f}) | "
                          f"{wrote / 1e6:.2f} MB | {wrote / ideal:.2f} | {calls:.0f} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(today)], capture_output=True)


if __name__ == "__main__":
    main()
