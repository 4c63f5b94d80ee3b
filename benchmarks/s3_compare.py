"""Loading from object storage: distload against every-rank streaming, download-then-load and the floor.

    python -m benchmarks.s3_compare --size 1.7GB --world 1,2,4 --rate-mb 0,300 --repeat 3
    python -m benchmarks.s3_compare --quick            # tiny checkpoint, one round: checks it runs

One SeaweedFS server on loopback (``benchmarks/objstore.py``) holds the
checkpoint. Each measurement is one ``torchrun --standalone`` job on gloo that
fills a bf16 Llama (replicated) on every rank:

- ``distload``: ``load_checkpoint(model, "s3://...")``, each object byte fetched once per job;
- ``runai``: the Run:ai model streamer (``runai-model-streamer[s3]``), every rank streaming the
  whole checkpoint, as vLLM uses it;
- ``boto3_dl``: the first rank of the node downloads every object with boto3 (s3transfer), then
  every rank loads the local copy with safetensors;
- ``floor`` (world 1): raw concurrent ranged GETs of every object into memory, nothing else.

Bytes fetched are the server's own count for the bucket (not any loader's
report). ``--rate-mb R`` puts a relay capped at R MB/s for all connections
together in front of the server (a shared link, as ``benchmarks/netfs.py``
caps a filesystem). Loaders rotate between repeats; the table gives medians,
and ``--out`` gets a JSON file and a plot.

Also ``--worker``: one rank of one measurement (run by torchrun, not by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
PREFIX = "llama"
FLOOR_THREADS = 8  # distload's default concurrency (max_concurrent_requests)
FLOOR_PART = 16 << 20


# ---- one rank of one measurement ------------------------------------------------------------------------------


def _model(ckpt: Path, empty: bool):
    """The bf16 Llama: parameters on meta (distload fills them), or allocated and uninitialized."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import distload

    with distload.empty_init():
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(LlamaConfig.from_pretrained(ckpt))
        finally:
            torch.set_default_dtype(prev)
    if empty:
        keep = {n: b.clone() for n, b in model.named_buffers()}
        model.to_empty(device="cpu")
        for n, b in model.named_buffers():
            b.copy_(keep[n])
    return model


def _fill(model, items) -> int:
    """Copy ``(name, tensor)`` pairs into the model's parameters; the bytes copied."""
    import torch

    params = model.state_dict()
    n = 0
    with torch.no_grad():
        for name, t in items:
            if name in params:
                params[name].copy_(t)
                n += t.numel() * t.element_size()
    return n


def _client():
    import boto3
    import botocore.config

    return boto3.client("s3", config=botocore.config.Config(s3={"addressing_style": "path"},
                                                             max_pool_connections=64))


def _objects(client) -> list[tuple[str, int]]:
    page = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return [(o["Key"], o["Size"]) for o in page.get("Contents", ()) if o["Key"].endswith(".safetensors")]


def _floor(uri: str) -> int:
    """Every object into memory with concurrent ranged GETs, received as distload receives them (http.client's
    readinto into the destination, 8 threads of 16 MiB parts), and nothing else: the bytes read."""
    import queue

    client = _client()
    objects = _objects(client)
    import torch

    # untouched memory, as distload's destinations are (bytearray would zero-fill it first)
    bufs = {k: torch.empty(n, dtype=torch.uint8).numpy() for k, n in objects}
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for k, n in objects:
        for off in range(0, n, FLOOR_PART):
            todo.put((k, off, min(FLOOR_PART, n - off)))
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            try:
                k, off, n = todo.get_nowait()
            except queue.Empty:
                return
            try:
                raw = client.get_object(Bucket=BUCKET, Key=k, Range=f"bytes={off}-{off + n - 1}")["Body"]._raw_stream
                # http.client's readinto: recv_into the buffer, no copy (as distload, unless the body is encoded)
                direct = getattr(raw, "_fp", None)
                stream = direct if direct is not None and not raw.headers.get("content-encoding") else raw
                view, pos = memoryview(bufs[k]).cast("B")[off: off + n], 0
                try:
                    while pos < n:
                        got = stream.readinto(view[pos:])
                        if not got:
                            raise OSError("short body")
                        pos += got
                finally:
                    raw.release_conn()
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=work) for _ in range(FLOOR_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(n for _, n in objects)


def _runai(model, uri: str) -> int:
    from runai_model_streamer import SafetensorsStreamer

    files = [f"s3://{BUCKET}/{k}" for k, _ in _objects(_client())]
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(files)
        return _fill(model, streamer.get_tensors())


def _boto3_download(model, rank: int) -> int:
    """The first rank of the node downloads, every rank loads the local copy."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    local = Path(os.environ.get("S3_BENCH_DL", tempfile.gettempdir())) / "distload-s3-bench-dl"
    if rank == 0:
        client = _client()
        local.mkdir(parents=True, exist_ok=True)
        for key, _ in _objects(client):
            client.download_file(BUCKET, key, str(local / key.rsplit("/", 1)[1]))
    dist.barrier()
    n = 0
    for f in sorted(local.glob("*.safetensors")):
        n += _fill(model, load_file(f).items())
    dist.barrier()
    if rank == 0:
        for f in local.iterdir():
            f.unlink()
        local.rmdir()
    return n


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = None if args.loader == "floor" else _model(Path(args.ckpt), empty=args.loader != "distload")
    dist.barrier()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if args.loader == "distload":
        import distload

        report = distload.load_checkpoint(model, args.uri)
        nbytes = report.bytes_read
    elif args.loader == "runai":
        nbytes = _runai(model, args.uri)
    elif args.loader == "boto3_dl":
        nbytes = _boto3_download(model, rank)
    else:
        nbytes = _floor(args.uri)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    dist.barrier()
    wall = time.perf_counter() - t0
    row = {"rank": rank, "seconds": seconds, "cpu_s": cpu, "bytes": nbytes,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"wall": wall, "ranks": rows}))
    dist.destroy_process_group()
    return 0


# ---- the harness ---------------------------------------------------------------------------------------------------


def run_one(loader: str, world: int, ckpt: Path, env: dict, server, logs: Path, timeout_s: float) -> dict:
    out = logs / f"{loader}-w{world}.json"
    out.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "benchmarks.s3_compare", "--worker", "--loader", loader, "--uri", f"s3://{BUCKET}/{PREFIX}",
           "--ckpt", str(ckpt), "--out", str(out)]
    before = server.sent_bytes(BUCKET)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=timeout_s)
    job = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        (logs / f"{loader}-w{world}.log").write_text(proc.stdout + proc.stderr)
        raise RuntimeError(f"{loader} at world {world} failed; see {logs}/{loader}-w{world}.log:\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    res = json.loads(out.read_text())
    ranks = res["ranks"]
    return {"loader": loader, "world": world, "seconds": max(r["seconds"] for r in ranks), "job_s": job,
            "cpu_s": sum(r["cpu_s"] for r in ranks), "peak_rss": max(r["peak_rss"] for r in ranks),
            "fetched": server.sent_bytes(BUCKET) - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loader", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3"),
                   help="directory for the JSON, the table and the plot")
    p.add_argument("--size", default="1.7GB", help="checkpoint preset of benchmarks.make_checkpoint")
    p.add_argument("--world", default="1,2,4", help="world sizes (distload, runai, boto3_dl)")
    p.add_argument("--loaders", default="distload,runai,boto3_dl,floor")
    p.add_argument("--rate-mb", default="0,300", help="link caps in MB/s to run under (0: no cap)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "distload-s3-bench")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, worlds 1,2, one round, no cap")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.size, args.world, args.rate_mb, args.repeat = "smoke", "1,2", "0", 1
    from .make_checkpoint import make_checkpoint
    from .objstore import Relay, seaweed, upload_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / f"ckpt-{args.size}"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args.size)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    worlds = [int(w) for w in args.world.split(",")]
    loaders = args.loaders.split(",")
    configs = [(name, w) for name in loaders for w in ([1] if name == "floor" else worlds)]
    rows: list[dict] = []
    with seaweed(args.workdir / "seaweed") as server:
        client = server.client()
        server.make_bucket(BUCKET, client)
        upload_dir(client, BUCKET, PREFIX, ckpt)
        for rate in [float(r) for r in args.rate_mb.split(",")]:
            relay = Relay(server.port, rate * 1e6) if rate > 0 else None
            env = {**server.env(relay.endpoint if relay else None), "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
            try:
                for rep in range(args.repeat):
                    shift = rep % len(configs)
                    for name, w in configs[shift:] + configs[:shift]:  # rotate: drift hits every loader
                        r = run_one(name, w, ckpt, env, server, logs, args.timeout_s)
                        r.update(rate_mb=rate, repeat=rep)
                        rows.append(r)
                        print(f"  {name:<9} w{w} cap {rate:g} MB/s: {r['seconds']:.2f} s, "
                              f"{r['fetched'] / size:.2f}x fetched, {r['cpu_s'] / (size / 1e9):.2f} CPU-s/GB",
                              flush=True)
            finally:
                if relay is not None:
                    relay.close()
    table = summarize(rows, size)
    print(table)
    (out / "s3_compare.json").write_text(json.dumps({"checkpoint_bytes": size, "rows": rows}, indent=1))
    (out / "s3_compare.md").write_text(table + "\n")
    plot(rows, size, out / "s3_compare.png")
    return 0


def summarize(rows: list[dict], size: int) -> str:
    """Medians per (cap, loader, world): seconds, GB/s, bytes fetched (x checkpoint), CPU-s/GB, peak RSS."""
    lines = [f"checkpoint: {size / 1e9:.2f} GB (bf16 Llama, replicated on every rank), SeaweedFS on loopback",
             "", "| link cap | loader | world | seconds | GB/s | fetched (x ckpt) | CPU-s/GB | peak RSS GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["rate_mb"], r["loader"], r["world"]) for r in rows})
    for rate, loader, w in keys:
        sel = [r for r in rows if (r["rate_mb"], r["loader"], r["world"]) == (rate, loader, w)]
        sec = statistics.median(r["seconds"] for r in sel)
        lines.append(f"| {'none' if not rate else f'{rate:g} MB/s'} | {loader} | {w} | {sec:.2f} | "
                     f"{size / sec / 1e9:.2f} | {statistics.median(r['fetched'] for r in sel) / size:.2f} | "
                     f"{statistics.median(r['cpu_s'] for r in sel) / (size / 1e9):.2f} | "
                     f"{max(r['peak_rss'] for r in sel) / 2**30:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], size: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rates = sorted({r["rate_mb"] for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        keys = sorted({(r["loader"], r["world"]) for r in rows if r["rate_mb"] == rate})
        secs = [statistics.median(r["seconds"] for r in rows if (r["loader"], r["world"], r["rate_mb"]) ==
                                  (k[0], k[1], rate)) for k in keys]
        ax.bar([f"{k[0]}\nw{k[1]}" for k in keys], secs,
               color=["tab:blue" if k[0] == "distload" else "tab:gray" for k in keys])
        ax.set_title(f"{size / 1e9:.1f} GB from S3, link {'uncapped' if not rate else f'{rate:g} MB/s'}")
        ax.set_ylabel("seconds (lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
