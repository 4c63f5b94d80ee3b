"""The README's scale table: the dry run at worlds 8 to 16,384 on header-only checkpoints, beside today's code.

    python -m benchmarks.scale_table                      # Llama-70B- and DeepSeek-V3-shaped, worlds 8..16384
    python -m benchmarks.scale_table --worlds 8,128 --presets llama-70b --today d53e139

(parent, one process) Writes each header-only checkpoint (``benchmarks.fake_checkpoint``), checks out
``--today`` (default: main when this work branched) into a temporary git worktree, and for every
checkpoint, world and mode runs:

- this tree's ``python -m distload.load CKPT --model none --dry-run --world N --json --read-policy scatter``;
- today's dry run (its text lines: plan bytes, planning CPU seconds, the padded send buffer), and, from
  today's planner objects, the bytes its padded scatters put on the wire (each segment of each scatter
  to every other rank of the scatter) and its control bytes per rank, modelled from the sizes of
  today's messages (the plan, the all-gathered plan inputs and reports, a world-long status vector per
  exchange): today's dry run has no such figures, nor receive buffers or save planning.

Sharded mode is FSDP2's ``Shard(0)`` over every rank with read_policy scatter (what ``auto`` picks on
network filesystems). Seconds are CPU seconds of one process (what a busy machine inflates least);
rerun on a quiet machine for the README. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TODAY = "d53e139"

# Run with PYTHONPATH=today: the padded scatter's wire bytes and today's control messages, from its own objects.
TODAY_FIGURES = r'''
import json, pickle, sys
from distload.format.header import read_checkpoint
from distload.plan.dryrun import emulated_ranks, fsdp_layouts
from distload.plan.load_plan import LoadPlan, build_plan
from distload.plan.shard_plan import build_shard_plan
from distload.plan.items import RankInfo
from distload.report import LoadReport
path, world, sharded = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ckpt = read_checkpoint(path)
plan = build_plan(ckpt, emulated_ranks(world), wanted=set() if sharded else None)
wire = sum(c.nbytes for c in plan.chunks) * (world - 1)
exchanges = len(plan.chunks)
if sharded:
    sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                          bucket_bytes=plan.bucket_bytes, read_policy="scatter", local_storage=False)
    wire += sum(c.seg_bytes * (len(c.ranks) - 1) for c in sp.scatters)
    exchanges = len(sp.scatters)
    policies = dict(sp.policies)
else:
    policies = {}
# Every rank all-gathers every rank's plan inputs and report, and agrees with a world-long int32 vector.
mine = (RankInfo(world - 1, "node%d" % (world // 8), 7, "node%d" % (world // 8)), "0" * 64,
        ("/ckpt", "None", "True", "'scatter'", "64", "False"), None)
report = LoadReport(rank=world - 1, world_size=world, host="node%d" % (world // 8), local_rank=7, device="cpu",
                    files=[], bytes_read=0, total_bytes=0, seconds=1.0, read_policy=policies).to_dict()
each = len(pickle.dumps(mine)) + len(pickle.dumps(report))
status = (-(-exchanges // 16) + 3) * world * 4 * 2
print(json.dumps({"wire": wire, "control": world * each + status}))
'''


def _today_line(today: Path, ckpt: Path, world: int, scratch: Path) -> list[dict]:
    """Today's dry run, parsed: per mode, plan bytes, rank 0's planning CPU seconds, the padded send buffer."""
    env = {**os.environ, "PYTHONPATH": str(today)}
    proc = subprocess.run([sys.executable, "-m", "distload.load", str(ckpt), "--model", "none", "--dry-run",
                           "--world", str(world), "--read-policy", "scatter"], cwd=scratch, env=env,
                          capture_output=True, text=True, check=True)
    out = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(replicated|sharded)\s+plan\s+([\d.]+) MB per rank; .*?\(cpu ([\d.]+) s", line)
        if not m:
            continue
        buf = re.search(r"largest padded send buffer ([\d.]+) GB", line)
        sharded = m.group(1) == "sharded"
        extra = subprocess.run([sys.executable, "-c", TODAY_FIGURES, str(ckpt), str(world), "1" if sharded else "0"],
                               cwd=scratch, env=env, capture_output=True, text=True, check=True)
        figures = json.loads(extra.stdout)
        figures["control"] += float(m.group(2)) * 1e6  # every rank receives the plan, as in this tree's count
        out.append({"mode": m.group(1), "plan_mb": float(m.group(2)), "cpu_s": float(m.group(3)),
                    "send_gb": float(buf.group(1)) if buf else None, **figures})
    return out


def _new(ckpt: Path, world: int) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "distload.load", str(ckpt), "--model", "none", "--dry-run",
                           "--world", str(world), "--json", "--read-policy", "scatter"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="8,128,1024,16384")
    p.add_argument("--presets", default="llama-70b,deepseek-v3")
    p.add_argument("--today", default=DEFAULT_TODAY)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.fake_checkpoint import write_fake_checkpoint

    with tempfile.TemporaryDirectory(prefix="distload-table-") as tmp:
        scratch = Path(tmp)
        today = scratch / "today"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(today), args.today],
                       check=True, capture_output=True)
        try:
            print("| checkpoint | world | mode | wire ÷ ideal (today → new) | largest send buffer (today → new) | "
                  "receive buffer (new) | control per rank (today* → new) | plan per rank (today → new) | "
                  "planning CPU s (today → new) | save planning CPU s (new) |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for preset in args.presets.split(","):
                ckpt = write_fake_checkpoint(scratch / preset, preset=preset)
                for world in (int(w) for w in args.worlds.split(",")):
                    old = {r["mode"]: r for r in _today_line(today, ckpt, world, scratch)}
                    for new in _new(ckpt, world):
                        o = old[new["mode"]]
                        ideal = new["ideal_wire_bytes"] or 1
                        send_old = _gb(o["send_gb"] * 1e9) if o["send_gb"] is not None else _gb(new["send_buffer_bytes"])
                        print(f"| {preset} | {world:,} | {new['mode']} | {o['wire'] / ideal:.2f} → "
                              f"{new['wire_bytes'] / ideal:.2f} | {send_old} → {_gb(new['send_buffer_bytes'])} | "
                              f"{_gb(new['receive_buffer_bytes'])} | {_gb(o['control'])} → "
                              f"{_gb(new['control_bytes_per_rank'])} | {_gb(o['plan_mb'] * 1e6)} → "
                              f"{_gb(new['plan_bytes_per_rank'])} | {o['cpu_s']:.2f} → "
                              f"{new['planning_seconds']:.2f} | {new['save_planning_seconds']:.2f} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(today)], capture_output=True)


if __name__ == "__main__":
    main()
