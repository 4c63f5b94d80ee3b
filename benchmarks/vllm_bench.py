"""vLLM start-up to first token at tensor parallel N: vLLM's default loader, runai_streamer and distload.

Each run is a fresh engine in its own process; the clock starts when the
process is launched and stops when the first generated token comes back,
so it covers everything a user waits for (imports, workers, the load, the
first forward). Runs rotate between loaders and repeat (median, min-max).
Two storages:

- ``local``: the checkpoint on the local disk, read once beforehand (hot page cache);
- ``netfs``: the emulated shared filesystem (:mod:`benchmarks.netfs`), one view per worker
  (:mod:`benchmarks.vllm_views`: each worker reads as its own host would), one bandwidth cap
  for all; the bytes it served are the bytes pulled.

Needs vLLM (``make venv-vllm``; on a CUDA machine, ``pip install vllm runai-model-streamer``
and distload). CPU (2 cores)::

    .venv-vllm/bin/python -m benchmarks.vllm_bench --size 1.7GB --tp 2 --rate-mb 300 --repeats 3
    .venv-vllm/bin/python -m benchmarks.vllm_bench --quick          # the harness on a small model

CUDA, as is (NCCL between the GPUs; pick the GPUs with CUDA_VISIBLE_DEVICES)::

    python -m benchmarks.vllm_bench --device cuda --size 6GB --tp 2 --rate-mb 1000 --repeats 3

Prints one table row per (storage, loader) and writes ``benchmarks/results/vllm_<size>_tp<N>.json``.
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

ROOT = Path(__file__).resolve().parent.parent
LOADERS = ("auto", "runai_streamer", "distload")
LABELS = {"auto": "vLLM default", "runai_streamer": "runai_streamer", "distload": "distload"}


def child(cfg: dict) -> None:
    """(the engine process) Start vLLM, generate one token, print FIRST_TOKEN."""
    if cfg["device"] == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if cfg["tp"] > 1:
            cores = os.cpu_count() or 1
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % cores) for i in range(cfg["tp"])))
    from vllm import LLM, SamplingParams

    kw = {"worker_cls": "benchmarks.vllm_views.HostViewWorker"} if cfg.get("views") else {}
    llm = LLM(model=cfg["model"], load_format=cfg["load_format"], tensor_parallel_size=cfg["tp"],
              distributed_executor_backend="mp" if cfg["tp"] > 1 else None, skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=256, enforce_eager=cfg["device"] == "cpu", seed=0,
              gpu_memory_utilization=0.8 if cfg["device"] == "cuda" else 0.9, **kw)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=1, temperature=0.0),
                       use_tqdm=False)
    print("FIRST_TOKEN " + json.dumps(out[0].outputs[0].token_ids), flush=True)  # the clock stops here


def one(cfg: dict, env: dict, timeout: float) -> float:
    """(parent) Seconds from launching the engine process to its first token."""
    full = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.vllm_bench", "--child", json.dumps(cfg)], cwd=ROOT,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    seconds = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("FIRST_TOKEN") and seconds is None:
                seconds = time.perf_counter() - t0
            tail = (tail + [line])[-40:]
            if time.perf_counter() - t0 > timeout:
                break
        proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if seconds is None:
        raise RuntimeError(f"{cfg['load_format']} produced no token (exit {proc.returncode}):\n{''.join(tail)}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", default="1.7GB", help="benchmarks.make_checkpoint preset (default 1.7GB)")
    p.add_argument("--ckpt", type=Path, help="an existing checkpoint instead of a preset")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--storage", default="local,netfs", help="comma list of local, netfs")
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--rate-mb", type=float, default=300, help="netfs: MB/s for all views together")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=1200)
    p.add_argument("--quick", action="store_true", help="a small model, one round: checks the harness")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.size, args.repeats = "quick", 1
    from benchmarks import netfs
    from benchmarks.make_checkpoint import make_checkpoint

    ckpt = args.ckpt or make_checkpoint(ROOT / "bench_data" / args.size, args.size)
    size = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
    loaders = [x for x in args.loaders.split(",") if x]
    rows = []
    for storage in [s for s in args.storage.split(",") if s]:
        times: dict[str, list[float]] = {x: [] for x in loaders}
        pulled: dict[str, list[float]] = {x: [] for x in loaders}
        if storage == "local":
            for f in Path(ckpt).iterdir():  # hot: every byte in the page cache before the first run
                f.read_bytes()
        for k in range(args.repeats):
            order = loaders[k % len(loaders):] + loaders[: k % len(loaders)]  # rotate: A B C, B C A, ...
            for fmt in order:
                cfg = {"model": str(ckpt), "load_format": fmt, "tp": args.tp, "device": args.device}
                if storage == "local":
                    times[fmt].append(one(cfg, {}, args.timeout_s))
                    continue
                with tempfile.TemporaryDirectory(prefix="vllm-netfs-") as tmp, \
                        netfs.mounted(ckpt, Path(tmp) / "mnt", views=args.tp, rate=args.rate_mb * 1e6) as fs:
                    env = {"DISTLOAD_HOST_VIEWS": str(fs.mnt / "node{rank}")}
                    times[fmt].append(one({**cfg, "views": True}, env, args.timeout_s))
                    pulled[fmt].append(fs.served() / size)
                print(f"  {storage} {fmt}: {times[fmt][-1]:.1f} s", flush=True)
        base = statistics.median(times["auto"]) if times.get("auto") else None
        for fmt in loaders:
            med = statistics.median(times[fmt])
            rows.append({"storage": storage, "loader": fmt, "median_s": med, "min_s": min(times[fmt]),
                         "max_s": max(times[fmt]), "runs": times[fmt],
                         "speedup_vs_default": base / med if base else None,
                         "bytes_pulled_x": statistics.median(pulled[fmt]) if pulled[fmt] else None})
    meta = {"size": args.size, "checkpoint_bytes": size, "tp": args.tp, "device": args.device,
            "rate_mb": args.rate_mb, "repeats": args.repeats}
    print(f"\nvLLM start-up to first token, TP {args.tp}, {args.device}, {size / 1e9:.2f} GB checkpoint "
          f"(netfs: {args.rate_mb:g} MB/s shared), median of {args.repeats} (min-max)")
    print("| storage | loader | seconds | vs default | bytes pulled |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        speed = f"{r['speedup_vs_default']:.2f}x" if r["speedup_vs_default"] else "-"
        pulled_x = f"{r['bytes_pulled_x']:.2f}x" if r["bytes_pulled_x"] is not None else "-"
        print(f"| {r['storage']} | {LABELS[r['loader']]} | {r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f}) "
              f"| {speed} | {pulled_x} |")
    out = ROOT / "benchmarks" / "results" / f"vllm_{args.size}_tp{args.tp}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
