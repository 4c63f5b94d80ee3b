"""Which S3 client distload reads with: CPU seconds per GB, memory and time of concurrent ranged GETs.

    python -m benchmarks.s3_clients --gb 1 --threads 8 --part-mb 16 --repeat 3

Puts ``--gb`` of random objects on a loopback SeaweedFS, then reads them all
into one preallocated buffer with ``--threads`` concurrent ranged GETs of
``--part-mb``, once per client and repeat, each in a fresh process:

- ``boto3_direct``: botocore, the body read with the HTTP response's own ``readinto`` (``recv_into``
  the buffer: one copy, from the socket), distload's way;
- ``boto3_readinto``: botocore, urllib3's ``readinto`` (which reads into bytes and copies them);
- ``boto3_read``: botocore, ``read()`` into bytes, then copied (what most code does);
- ``obstore``: obstore's ``get_range`` (Rust object_store, releases the GIL), then copied.

CPU seconds (``time.process_time``, all threads) do not depend on what else
runs on the machine, unlike wall time; peak RSS beyond the buffer is what
each client holds in flight.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUCKET = "clients"
OBJECT = 256 << 20


def read_all(client: str, endpoint: str, n_objects: int, threads: int, part: int) -> dict:
    """(a fresh process) Read every object into one buffer; figures for the JSON line."""
    from .objstore import ACCESS_KEY, REGION, SECRET_KEY

    buf = bytearray(n_objects * OBJECT)
    for i in range(0, len(buf), 4096):  # touch: page faults are not the client's cost
        buf[i] = 1
    mv = memoryview(buf)
    if client == "obstore":
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                        region=REGION, client_options={"allow_http": True})

        def fetch(i: int, off: int, n: int) -> None:
            mv[i * OBJECT + off: i * OBJECT + off + n] = obstore.get_range(store, f"o{i}", start=off, length=n)
    else:
        import boto3
        import botocore.config

        c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                         region_name=REGION, config=botocore.config.Config(max_pool_connections=threads,
                                                                           s3={"addressing_style": "path"}))

        def fetch(i: int, off: int, n: int) -> None:
            body = c.get_object(Bucket=BUCKET, Key=f"o{i}", Range=f"bytes={off}-{off + n - 1}")["Body"]
            start = i * OBJECT + off
            if client == "boto3_read":
                mv[start: start + n] = body.read()
                return
            pos = 0
            stream = body._raw_stream._fp if client == "boto3_direct" else body._raw_stream
            while pos < n:
                got = stream.readinto(mv[start + pos: start + n])
                if not got:
                    raise OSError("short body")
                pos += got

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(n_objects):
        for off in range(0, OBJECT, part):
            todo.put((i, off, min(part, OBJECT - off)))

    def work() -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            fetch(*job)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu0, t0 = time.process_time(), time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    gb = len(buf) / 1e9
    return {"client": client, "seconds": time.perf_counter() - t0, "cpu_s_per_gb": (time.process_time() - cpu0) / gb,
            "rss_over_buffer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--part-mb", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", default="boto3_direct,boto3_readinto,boto3_read,obstore")
    p.add_argument("--child", nargs=2, metavar=("CLIENT", "ENDPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    n_objects = max(1, round(args.gb * 1e9 / OBJECT))
    if args.child:
        print(json.dumps(read_all(args.child[0], args.child[1], n_objects, args.threads, args.part_mb << 20)))
        return 0
    import os

    from .objstore import seaweed

    with tempfile.TemporaryDirectory(prefix="distload-s3-clients-") as tmp, seaweed(Path(tmp)) as server:
        c = server.client()
        server.make_bucket(BUCKET, c)
        data = os.urandom(OBJECT)
        for i in range(n_objects):
            c.put_object(Bucket=BUCKET, Key=f"o{i}", Body=data)
        rows: dict[str, list[dict]] = {}
        clients = args.clients.split(",")
        for rep in range(args.repeat):
            for name in clients[rep % len(clients):] + clients[: rep % len(clients)]:
                cmd = [sys.executable, "-m", "benchmarks.s3_clients", "--gb", str(args.gb), "--threads",
                       str(args.threads), "--part-mb", str(args.part_mb), "--child", name, server.endpoint]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).resolve().parent.parent)
                rows.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{n_objects * OBJECT / 1e9:.2f} GB, {args.threads} threads, {args.part_mb} MiB parts, "
          f"medians of {args.repeat}")
    print("| client | CPU-s/GB | MiB held beyond the buffer | seconds |\n| --- | --- | --- | --- |")
    for name, rs in rows.items():
        print(f"| {name} | {statistics.median(r['cpu_s_per_gb'] for r in rs):.2f} | "
              f"{statistics.median(r['rss_over_buffer'] for r in rs) / 2**20:.0f} | "
              f"{statistics.median(r['seconds'] for r in rs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
