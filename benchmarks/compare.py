"""distload against its peers, side by side, in one run: a table, a JSON file and a plot.

    python -m benchmarks.compare --size 1.7GB --world 2 --mode replicated,fsdp --cache hot,cold
    python -m benchmarks.compare --fs fuse --world 2,4 --rate-mb 300      # the storage-bound case
    python -m benchmarks.compare --quick                                    # small checkpoint, one round

Each measurement is one ``torchrun --standalone`` job on gloo (see
``benchmarks/worker.py``); loaders rotate (A B C, B C A, ...) so drift on a
shared machine hits them all alike, and each is repeated ``--repeat`` times
(median, min and max reported). ``--cache cold`` evicts the checkpoint from
the page cache before every run; ``--fs fuse`` reads through the emulated
shared network filesystem (``benchmarks/netfs.py``), rank r through its node's
own view, under one bandwidth cap.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import netfs, probes
from .loaders import FLOORS, loaders_for
from .make_checkpoint import PRESETS, make_checkpoint

REPO = Path(__file__).resolve().parent.parent
PEERS_OWNED = ("dcp", "fastsafetensors")  # the peers that return owned memory (issue targets)
# On one GPU: distload, its peers, the read floors into pinned memory and the pinned -> GPU floor.
CUDA_LOADERS = ("distload", "transformers", "safetensors", "fastsafetensors", "read1", "read4", "read8", "h2d_copy")
# At world 1 on CPU, load_state_dict beside the 1- and 2-thread read floors into fresh memory.
WORLD1_EXTRAS = ("distload_sd", "read1", "read2")
READ_FLOORS = ("read8", "read4", "read2", "read1")  # the most threads measured is the IO bound


@dataclass(frozen=True)
class Config:
    """One cell group of the table: every loader runs under the same config."""

    fs: str  # "local" | "fuse"
    world: int
    mode: str
    cache: str  # "hot" | "cold"; "net" on the emulated filesystem
    device: str = "cpu"

    @property
    def label(self) -> str:
        dev = "" if self.device == "cpu" else f" {self.device}"
        return f"{self.fs} w{self.world} {self.mode} {self.cache}{dev}"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def warm(files: list[Path]) -> None:
    """Read every file once so the page cache holds it (the hot case)."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def run_one(cfg: Config, loader: str, ckpt: Path, files: list[Path], out: Path, logs: Path, *,
            checksum: bool, fs: netfs.NetFS | None, rpn: int, timeout_s: float, read_policy: str,
            io_threads: int = 0) -> dict:
    """One torchrun job measuring one loader; returns rank 0's JSON plus what the harness saw."""
    if cfg.cache == "cold":
        probes.evict(files)
    elif cfg.cache == "hot" or fs is not None:
        warm(files)  # on the emulation, the backing store is hot: the cap is the only limit
    if fs is not None:
        for k in range(fs.views):
            probes.evict(sorted(fs.view(k).glob("*.safetensors")))
    result = out / "run.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.world),
           "-m", "benchmarks.worker", "--loader", loader, "--mode", cfg.mode, "--ckpt", str(ckpt),
           "--device", cfg.device, "--out", str(result)]
    if checksum:
        cmd.append("--checksum")
    if fs is not None:
        cmd += ["--netfs", str(fs.mnt), "--ranks-per-node", str(rpn)]
    if read_policy and loader == "distload":
        cmd += ["--read-policy", read_policy]
    if io_threads:
        cmd += ["--io-threads", str(io_threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TOKENIZERS_PARALLELISM="false")
    served0 = fs.served() if fs is not None else 0
    log = logs / f"{cfg.label.replace(' ', '_')}_{loader}.log"
    t0 = time.perf_counter()
    with open(log, "a") as lf:
        lf.write(f"\n$ {' '.join(cmd)}\n")
        lf.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=lf, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:  # on a timeout, Ctrl-C or SIGTERM: torchrun stops its workers, which frees the mount
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    wall = time.perf_counter() - t0
    row: dict
    if result.is_file():
        row = json.loads(result.read_text())
    else:
        row = {"loader": loader, "error": f"torchrun exited with {rc}; see {log}"}
    if rc != 0 and not row.get("error"):
        row["error"] = f"torchrun exited with {rc}; see {log}"
    row.update(config=cfg.__dict__, job_wall=wall, log=str(log))
    if fs is not None:
        row["storage_bytes"] = fs.served() - served0
    return row


def summarize(runs: list[dict], ckpt_bytes: int, rate: float) -> list[dict]:
    """Median/min/max per (config, loader), with ratios to the floor and to distload."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (tuple(sorted(r["config"].items())), r["loader"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (cfg_items, loader), rs in groups.items():
        cfg = dict(cfg_items)
        ok = [r for r in rs if not r.get("error") and not r.get("skipped")]
        row = {**cfg, "loader": loader, "runs": len(rs), "ok": len(ok),
               "error": next((r["error"] for r in rs if r.get("error")), None),
               "skipped": next((r["skipped"] for r in rs if r.get("skipped")), None)}
        if ok:
            secs = [r["seconds"] for r in ok]
            med = statistics.median(secs)
            row.update(
                seconds=med, min=min(secs), max=max(secs), gbps=ckpt_bytes / med / 1e9,
                peak_anon_growth=statistics.median(r["peak_anon_growth"] for r in ok),
                peak_rss_growth=statistics.median(r["peak_rss_growth"] for r in ok),
                local_bytes=ok[0].get("local_bytes"),
                rchar_x=statistics.median(r["rchar"] for r in ok) / ckpt_bytes,
                disk_x=statistics.median(r["read_bytes"] for r in ok) / ckpt_bytes,
                cpu_s=statistics.median(r.get("cpu_s", 0.0) for r in ok),
                mmap=ok[0].get("mmap_fraction", 0.0) > 0.5,
                checksum=next((r["checksum"] for r in ok if r.get("checksum")), None),
            )
            if "storage_bytes" in ok[0]:
                row["storage_x"] = statistics.median(r["storage_bytes"] for r in ok) / ckpt_bytes
                if rate > 0:
                    row["limit_x"] = med / (ckpt_bytes / rate)
            if "policy_counts" in ok[0]["ranks"][0]:
                row["policy_counts"] = ok[0]["ranks"][0]["policy_counts"]
        rows.append(row)
    by_cfg: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_cfg.setdefault((row["fs"], row["world"], row["mode"], row["cache"], row["device"]), {})[row["loader"]] = row
    for group in by_cfg.values():
        floor, dl = group.get("floor", {}).get("seconds"), group.get("distload", {}).get("seconds")
        sums = {r["checksum"] for n, r in group.items() if n not in FLOORS and r.get("checksum")}
        # The IO bound: the read floor with the most threads, or the pinned -> GPU copy if slower.
        reads = [group[n]["seconds"] for n in READ_FLOORS if "seconds" in group.get(n, {})][:1]
        bound = max(reads + ([group["h2d_copy"]["seconds"]] if "seconds" in group.get("h2d_copy", {}) else []),
                    default=None)
        for name, row in group.items():
            if "seconds" in row:
                row["x_floor"] = row["seconds"] / floor if floor else None
                row["x_distload"] = row["seconds"] / dl if dl else None
                row["x_bound"] = row["seconds"] / bound if bound else None
            if name not in FLOORS and row.get("checksum"):
                row["checksum_agrees"] = len(sums) == 1
    order = ["distload", "distload_sd", "floor", "dcp", "fastsafetensors", "transformers", "safetensors", "accelerate",
             "rank0_bcast", "read1", "read2", "read4", "read8", "h2d_copy"]
    rows.sort(key=lambda r: (r["fs"], r["device"], r["world"], r["mode"], r["cache"],
                             order.index(r["loader"]) if r["loader"] in order else 99))
    return rows


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


LABELS = {"transformers": "transformers from_pretrained", "accelerate": "accelerate load_checkpoint_in_model",
          "dcp": "torch DCP + HF reader", "floor": "floor (read + raw broadcast/scatter)",
          "rank0_bcast": "rank 0 loads + broadcast + distribute_tensor", "h2d_copy": "pinned host→device copy",
          "fastsafetensors": "fastsafetensors", "distload_sd": "distload load_state_dict",
          "safetensors": "safetensors load_file", **{f"read{n}": f"read floor, {n} thread{'s' * (n > 1)}" for n in (1, 2, 4, 8)}}


def markdown(rows: list[dict], machine: dict, ckpt_bytes: int, rate: float) -> str:
    """The README table."""
    fuse = any(r["fs"] == "fuse" for r in rows)
    bound = any(r.get("x_bound") for r in rows)
    head = ["fs", "world", "mode", "cache", "loader", "memory", "seconds (min–max)", "GB/s", "× floor",
            "× distload", "CPU s (all ranks)", "peak anon growth / rank", "read() ×ckpt", "disk ×ckpt"]
    if fuse:
        head += ["storage pulled ×ckpt", "× storage limit"]
    if bound:
        head.append("× IO bound")
    head.append("checksum")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = LABELS.get(r["loader"], r["loader"])
        if r["mode"] == "fsdp" and r["loader"] == "transformers":
            name = "from_pretrained on every rank, then fully_shard"
        if "seconds" not in r:
            why = f"skipped: {r['skipped'][:80]}" if r.get("skipped") else f"failed: {(r['error'] or '?')[:80]}"
            cells = [r["fs"], str(r["world"]), r["mode"], r["cache"], name, "", why]
            cells += [""] * (len(head) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        over = " (oversubscribed)" if r["world"] > (machine.get("cores") or 1) else ""
        cells = [r["fs"], f"{r['world']}{over}", r["mode"], r["cache"] + ("" if r["device"] == "cpu" else f" {r['device']}"),
                 f"**{name}**" if r["loader"] == "distload" else name,
                 "mmap views of page cache" if r["mmap"] else "owned",
                 f"{r['seconds']:.2f} ({r['min']:.2f}–{r['max']:.2f})", f"{r['gbps']:.2f}",
                 _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("x_distload"), ".2f"), f"{r['cpu_s']:.1f}",
                 f"{r['peak_anon_growth'] / 1e9:.2f} GB", f"{r['rchar_x']:.2f}", f"{r['disk_x']:.2f}"]
        if fuse:
            cells += [_fmt(r.get("storage_x"), ".2f"), _fmt(r.get("limit_x"), ".2f")]
        if bound:
            cells.append(_fmt(r.get("x_bound"), ".2f"))
        agrees = r.get("checksum_agrees")
        cells.append("ok" if agrees else ("MISMATCH" if agrees is False else "–"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Checkpoint: {ckpt_bytes / 1e9:.2f} GB of bf16 safetensors. Machine: {machine['cores']} cores "
        f"({machine['cpu']}), {machine['mem_gib']} GiB RAM, {machine['gpu']}, torch {machine['torch']}, "
        f"THP {machine['thp']}.",
        "Seconds: the slowest rank, from the start of the load until every local byte of every parameter "
        "is resident (each tensor's pages are touched inside the timer). Median of the runs, min–max in brackets.",
        "Peak anon growth: the largest rank's peak anonymous RSS minus its pre-load baseline (mmap views of the "
        "page cache are file-backed, so they do not show here). read() ×ckpt: bytes through read syscalls "
        "(/proc/self/io rchar) summed over ranks; disk ×ckpt: bytes fetched from the block device (read_bytes).",
        "CPU s: user + system CPU seconds of the timed region, summed over ranks (not counting the FUSE server); "
        "where ranks outnumber cores this, not IO, bounds the seconds.",
    ]
    if bound:
        notes.append("× IO bound: seconds ÷ the read floor with the most threads measured (on CUDA into pinned "
                     "memory, or the pinned → GPU copy when that is slower); on CPU the read floors read into "
                     "fresh memory inside the timer.")
    if fuse:
        notes.append(f"Storage pulled: bytes the emulated network filesystem served, summed over its views; "
                     f"× storage limit: seconds ÷ (checkpoint bytes ÷ {rate / 1e6:.0f} MB/s).")
    if any(r["world"] > (machine.get("cores") or 1) for r in rows):
        notes.append(f"Oversubscribed: more ranks than the {machine['cores']} cores, so ranks share CPUs and the "
                     "seconds include time-slicing, not just IO and transport.")
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict], machine: dict, path: Path) -> None:
    """Bar chart per config: seconds (with min–max whiskers) and peak anon growth per loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "seconds" in r:
            cfg = Config(r["fs"], r["world"], r["mode"], r["cache"], r["device"])
            groups.setdefault(cfg.label, []).append(r)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 2.2 + 1.9 * len(groups) + 0.25 * max(len(g) for g in groups.values())),
                             squeeze=False)
    for (label, rs), (ax_t, ax_m) in zip(groups.items(), axes):
        names = [r["loader"] + (" (mmap)" if r["mmap"] else "") for r in rs]
        colors = ["tab:red" if r["loader"] == "distload" else ("tab:gray" if r["loader"] == "floor" else "tab:blue")
                  for r in rs]
        y = range(len(rs))
        secs = [r["seconds"] for r in rs]
        err = [[r["seconds"] - r["min"] for r in rs], [r["max"] - r["seconds"] for r in rs]]
        ax_t.barh(list(y), secs, xerr=err, color=colors, capsize=3)
        ax_t.set_yticks(list(y), names)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("seconds (median, min–max)")
        ax_t.set_title(label, loc="left", fontsize=10)
        for i, r in enumerate(rs):
            extra = f"  {r['seconds']:.2f}s"
            if r.get("storage_x") is not None:
                extra += f"  pulled {r['storage_x']:.2f}×"
            ax_t.text(r["max"], i, extra, va="center", fontsize=8)
        mem = [r["peak_anon_growth"] / 1e9 for r in rs]
        ax_m.barh(list(y), mem, color=colors)
        ax_m.set_yticks(list(y), [""] * len(rs))
        ax_m.invert_yaxis()
        ax_m.set_xlabel("peak anonymous RSS growth per rank (GB)")
        for i, v in enumerate(mem):
            ax_m.text(v, i, f"  {v:.2f}", va="center", fontsize=8)
        for ax in (ax_t, ax_m):
            ax.margins(x=0.25)
    fig.suptitle(f"distload vs peers — {machine['cores']} cores, {machine['mem_gib']} GiB RAM, {machine['gpu']}, "
                 f"torch {machine['torch']}, gloo", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.7GB", choices=sorted(PRESETS), help="checkpoint preset")
    p.add_argument("--quick", action="store_true", help="the small 'quick' checkpoint, one round (harness check)")
    p.add_argument("--world", default="2", help="comma list of world sizes, e.g. 1,2,4")
    p.add_argument("--mode", default="replicated", help="replicated,fsdp")
    p.add_argument("--cache", default="hot", help="hot,cold (local filesystem only)")
    p.add_argument("--fs", default="local", help="local,fuse")
    p.add_argument("--loaders", default="", help="comma list to run (default: every loader of each mode)")
    p.add_argument("--repeat", type=int, default=None, help="runs per loader and config (default 3; 1 with --quick)")
    p.add_argument("--rate-mb", type=float, default=300, help="the emulated filesystem's shared cap, MB/s")
    p.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing one emulated host view")
    p.add_argument("--read-policy", default="", help="distload read_policy in fsdp mode (default: its own)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "/work/bench_data")),
                   help="where checkpoints are generated (outside the repository)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--mnt", type=Path, default=None, help="mount point for --fs fuse (default under --data)")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--timeout", type=float, default=900, help="seconds per torchrun job")
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA measurement even when CUDA is present")
    p.add_argument("--gpu-only", action="store_true", help="only the CUDA measurement (world 1, one GPU)")
    p.add_argument("--io-threads", type=int, default=0, help="distload's io_threads (default: its own)")
    args = p.parse_args(argv)
    # SIGTERM (a batch system's cancel) unwinds like Ctrl-C, so the emulated
    # filesystem is unmounted and the running job stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    preset = "quick" if args.quick and args.size == "1.7GB" else args.size
    repeat = args.repeat or (1 if args.quick else 3)
    ckpt = make_checkpoint(args.data / preset, preset)
    files = sorted(ckpt.glob("*.safetensors"))
    ckpt_bytes = sum(f.stat().st_size for f in files)
    machine = probes.machine()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    rate = args.rate_mb * 1e6
    only = set(_csv(args.loaders))

    configs: list[Config] = []
    for fs, world, mode in [] if args.gpu_only else itertools.product(_csv(args.fs), [int(w) for w in _csv(args.world)], _csv(args.mode)):
        for cache in (["net"] if fs == "fuse" else _csv(args.cache)):
            configs.append(Config(fs, world, mode, cache))
    gpu_note = "skipped: CUDA is not available on this machine"
    import torch

    if args.gpu_only and not torch.cuda.is_available():
        print("--gpu-only: CUDA is not available here", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and not args.no_gpu:
        configs.append(Config("local", 1, "replicated", "hot", "cuda:0"))
        gpu_note = f"measured on {torch.cuda.get_device_name(0)}"
    print(f"checkpoint {ckpt} ({ckpt_bytes / 1e9:.2f} GB, {len(files)} files); {len(configs)} config(s), "
          f"{repeat} round(s); GPU: {gpu_note}", flush=True)

    runs: list[dict] = []
    for cfg in configs:
        names = list(CUDA_LOADERS) if cfg.device != "cpu" else loaders_for(cfg.mode)
        if cfg.device == "cpu" and cfg.world == 1 and cfg.mode == "replicated":
            names += [n for n in WORLD1_EXTRAS if n not in names]
        names = [n for n in names if not only or n in only]
        fixture = None
        if cfg.fs == "fuse":
            reason = netfs.fuse_unavailable()
            if reason:
                print(f"[{cfg.label}] skipped: {reason}", flush=True)
                continue
            views = -(-cfg.world // args.ranks_per_node)
            fixture = netfs.mounted(ckpt, args.mnt or args.data / "netfs_mnt", views=views, rate=rate)
        with fixture if fixture is not None else contextlib.nullcontext() as fs:
            for rep in range(repeat):
                # A B C, B C A, C A B ...: drift on a shared machine hits every loader alike,
                # and no loader always follows the same one (on the reference VM, what the
                # previous job freed changes how much the next one pays for fresh memory).
                k = rep % len(names)
                for name in names[k:] + names[:k]:
                    row = run_one(cfg, name, ckpt, files, args.out, logs, checksum=rep == 0, fs=fs,
                                  rpn=args.ranks_per_node, timeout_s=args.timeout, read_policy=args.read_policy,
                                  io_threads=args.io_threads)
                    row["round"] = rep
                    runs.append(row)
                    status = (f"skipped: {row['skipped']}" if row.get("skipped") else
                              f"{row['seconds']:.2f} s" if not row.get("error") else f"FAILED: {row['error'][:120]}")
                    extra = f", pulled {row['storage_bytes'] / ckpt_bytes:.2f}x" if "storage_bytes" in row else ""
                    extra += f", cpu {row['cpu_s']:.1f} s" if "cpu_s" in row else ""
                    print(f"[{cfg.label}] round {rep + 1}/{repeat} {name:<16} {status}{extra}", flush=True)
    (args.out / "run.json").unlink(missing_ok=True)
    rows = summarize(runs, ckpt_bytes, rate)
    table = markdown(rows, machine, ckpt_bytes, rate)
    stem = f"compare_{preset}" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "checkpoint": {"path": str(ckpt), "preset": preset, "bytes": ckpt_bytes,
                                            "files": len(files)},
         "argv": sys.argv[1:] if argv is None else argv, "gpu": gpu_note, "rate": rate,
         "summary": rows, "runs": runs}, indent=1, default=str))
    try:
        plot(rows, machine, args.out / f"{stem}.png")
    except ImportError as e:  # a bare GPU machine may lack matplotlib: the table and JSON are written
        print(f"no plot: {e}", file=sys.stderr)
    print(table)
    print(f"wrote {args.out / (stem + '.md')}, .json and .png")
    bad = [r for r in rows if r.get("checksum_agrees") is False]
    if bad:
        print("checksums disagree for: " + ", ".join(f"{r['loader']} ({r['mode']})" for r in bad), file=sys.stderr)
    return 1 if bad or any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
