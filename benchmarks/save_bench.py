"""Save benchmark: an FSDP2 model saved as a Hugging Face checkpoint, three ways, every one with fsync.

    python -m benchmarks.save_bench CKPT --world 2 --repeat 3 --out benchmarks/results/save_1.7GB_local

Each rank builds the model named by CKPT's config under ``empty_init``, shards
it with FSDP2 (every block, then the root), fills it with
``distload.load_checkpoint``, then saves it, in an order rotated every round:

- ``distload``: ``distload.save_checkpoint`` (every rank writes its files);
- ``dcp-hf``: ``torch.distributed.checkpoint.save`` with ``HuggingFaceStorageWriter``
  (each rank writes its shards, rank 0 consolidates them into HF files), then fsync of the output;
- ``gather+save_pretrained``: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``
  gathers to rank 0, which calls ``save_pretrained``, then fsyncs the output.

All three write the same file split (the source checkpoint's). Reported per
method: seconds (median and range), bytes each rank wrote (``/proc/self/io``
``wchar``, which counts every write call, and ``write_bytes``, what reached the
block layer) and each rank's peak anonymous memory growth during the save.
Ranks are spawned with a FileStore gloo group (no ports).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("distload", "dcp-hf", "gather+save_pretrained")


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_split(ckpt: Path) -> tuple[dict[str, int], str]:
    """The source checkpoint's key -> file number, and its max_shard_size, so every method writes that split."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    mapping = {k: int(v.split("-")[1]) for k, v in index.items()}
    largest = max((ckpt / f).stat().st_size for f in set(index.values()))
    return mapping, str(largest)


def _save(method: str, model, out: Path, mapping: dict[str, int], max_shard: str, rank: int) -> None:
    import torch.distributed as dist

    import distload

    if method == "distload":
        distload.save_checkpoint(model, out, max_shard_size=int(max_shard))
    elif method == "dcp-hf":
        import torch.distributed.checkpoint as dcp

        writer = dcp.HuggingFaceStorageWriter(path=str(out), fqn_to_index_mapping=mapping, save_distributed=True,
                                              enable_consolidation=True)
        dcp.save(model.state_dict(), storage_writer=writer)
        if rank == 0:
            _fsync_tree(out)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(out, state_dict=sd, max_shard_size=int(max_shard))
            _fsync_tree(out)
        del sd
    dist.barrier()


def _worker(rank: int, world: int, store: str, ckpt: str, work: str, repeat: int, methods: list[str], q) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import distload

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    config = AutoConfig.from_pretrained(ckpt)
    with distload.empty_init():
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    distload.load_checkpoint(model, ckpt)
    mapping, max_shard = _file_split(Path(ckpt))
    rows = []
    for rnd in range(repeat):
        order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
        for method in order:
            out = Path(work) / f"out-{method.replace('+', '_')}"
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
            os.sync() if rank == 0 else None
            dist.barrier()
            peak, stop = [0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_anon())
                    time.sleep(0.005)

            io0, before = _io(), _rss_anon()
            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            t0 = time.perf_counter()
            _save(method, model, out, mapping, max_shard, rank)
            seconds = time.perf_counter() - t0
            stop.set()
            thread.join()
            io1 = _io()
            peak[0] = max(peak[0], _rss_anon())
            rows.append({"round": rnd, "method": method, "rank": rank, "seconds": seconds,
                         "wchar": io1["wchar"] - io0["wchar"], "write_bytes": io1["write_bytes"] - io0["write_bytes"],
                         "anon_growth": peak[0] - before})
            if rank == 0 and rnd == 0:
                files = sorted(p.name for p in out.glob("*.safetensors"))
                rows[-1]["files"] = files
    if rank == 0:
        # Every method's output holds the model, bit for bit: compare against the source checkpoint.
        from safetensors import safe_open

        src = {}
        for f in Path(ckpt).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                src.update({k: h.get_tensor(k) for k in h.keys()})
        for method in methods:
            out = Path(work) / f"out-{method.replace('+', '_')}"
            got = {}
            for f in out.glob("*.safetensors"):
                with safe_open(str(f), "pt") as h:
                    got.update({k: h.get_tensor(k) for k in h.keys()})
            ok = got.keys() == src.keys() and all(torch.equal(got[k], v) for k, v in src.items())
            rows.append({"method": method, "rank": 0, "check": "ok" if ok else "MISMATCH"})
    q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def run(ckpt: Path, world: int, repeat: int, methods: list[str], work: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="save-bench-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, str(ckpt), str(work), repeat, methods, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = [row for _ in procs for row in q.get()]
        for p in procs:
            p.join()
    return rows


def summarize(rows: list[dict], world: int, ckpt_bytes: int) -> list[dict]:
    out = []
    for m in METHODS:
        runs = [r for r in rows if r.get("method") == m and "seconds" in r]
        if not runs:
            continue
        per_round: dict[int, float] = {}
        for r in runs:
            per_round[r["round"]] = max(per_round.get(r["round"], 0.0), r["seconds"])
        secs = sorted(per_round.values())
        row = {"method": m, "seconds": statistics.median(secs), "min": secs[0], "max": secs[-1],
               "gbps": ckpt_bytes / statistics.median(secs) / 1e9}
        for rank in range(world):
            mine = [r for r in runs if r["rank"] == rank]
            row[f"wchar_r{rank}"] = statistics.median(r["wchar"] for r in mine)
            row[f"write_bytes_r{rank}"] = statistics.median(r["write_bytes"] for r in mine)
            row[f"anon_r{rank}"] = max(r["anon_growth"] for r in mine)
        checks = [r["check"] for r in rows if r.get("method") == m and "check" in r]
        row["check"] = checks[0] if checks else "-"
        out.append(row)
    base = next((r["seconds"] for r in out if r["method"] == "distload"), None)
    for r in out:
        r["x_distload"] = r["seconds"] / base if base else float("nan")
    return out


def markdown(summary: list[dict], world: int, ckpt_bytes: int, machine: str, repeat: int) -> str:
    lines = [f"FSDP2, world {world}, {ckpt_bytes / 1e9:.2f} GB checkpoint (bf16 Llama), {repeat} rotated round(s), "
             f"every method fsyncs its output. Machine: {machine}.", "",
             "| method | seconds (min–max) | GB/s | × distload | " +
             " | ".join(f"rank {r} wrote (wchar / to disk)" for r in range(world)) + " | " +
             " | ".join(f"rank {r} peak anon growth" for r in range(world)) + " | check |",
             "|---|---|---|---|" + "---|" * (2 * world) + "---|"]
    for r in summary:
        wrote = " | ".join(f"{r[f'wchar_r{k}'] / 1e9:.2f} / {r[f'write_bytes_r{k}'] / 1e9:.2f} GB" for k in range(world))
        anon = " | ".join(f"{r[f'anon_r{k}'] / 1e9:.2f} GB" for k in range(world))
        lines.append(f"| {r['method']} | {r['seconds']:.2f} ({r['min']:.2f}–{r['max']:.2f}) | {r['gbps']:.2f} | "
                     f"{r['x_distload']:.2f} | {wrote} | {anon} | {r['check']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--work", type=Path, default=None, help="where outputs go (default: beside CKPT)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    methods = args.methods.split(",")
    work = args.work or args.ckpt.parent / f"{args.ckpt.name}-save-bench"
    work.mkdir(parents=True, exist_ok=True)
    ckpt_bytes = sum(f.stat().st_size for f in args.ckpt.glob("*.safetensors"))
    rows = run(args.ckpt, args.world, args.repeat, methods, work)
    summary = summarize(rows, args.world, ckpt_bytes)
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}"
    md = markdown(summary, args.world, ckpt_bytes, machine, args.repeat)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name(args.out.name + ".json").write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine,
                                                             "world": args.world, "ckpt_bytes": ckpt_bytes}, indent=1))
        args.out.with_name(args.out.name + ".md").write_text(md)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
