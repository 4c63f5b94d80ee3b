"""Object storage (S3 and S3-compatible stores): the second implementation of the storage seam.

Process-local, on whichever rank calls (see :mod:`distload.storage.base`):
the coordinator lists the prefix and fetches headers with ranged GETs, each
owner fetches its objects' data with concurrent ranged GETs read straight
into the reader's buffers (``readinto``: no part buffers, no temporary
file), and each writer uploads its files with multipart uploads.

Configuration is the standard AWS one, read by botocore: ``AWS_ENDPOINT_URL``
/ ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``
and ``~/.aws``, instance and role credentials, ``AWS_MAX_ATTEMPTS``. A custom
endpoint (an S3-compatible store) gets path-style requests unless the profile
sets ``addressing_style``. Request size and concurrency come from the
profile's ``s3`` section as the AWS CLI reads it (``multipart_chunksize``,
``max_concurrent_requests``); ``io_threads`` overrides the concurrency of reads.

Note on the client:
    boto3 (botocore), not obstore. The body of each ranged GET is received
    with the HTTP response's ``readinto`` straight into the destination (one
    copy, from the socket), so a read holds no part buffer: 0.46 CPU-s/GB and
    1 MiB beyond the destination, against 0.79 CPU-s/GB and 144 MiB for
    obstore's ``get_range`` then copy, and 0.61 / 129 MiB for urllib3's own
    ``readinto`` (8 threads, 16 MiB parts, SeaweedFS on loopback;
    ``python -m benchmarks.s3_clients``). botocore is also what reads
    profiles, ``~/.aws`` and instance credentials, which obstore needs boto3
    for anyway, and multipart uploads need an explicit complete and abort (a
    save publishes only once every writer is done), which boto3 has and
    obstore's writer does not.

Note on retries:
    botocore retries each request on throttling, 5xx and connection errors
    (standard mode, ``AWS_MAX_ATTEMPTS``, default 3). A body that breaks
    mid-read (reset, timeout) is resumed from the first byte not yet
    received, with exponential backoff, for at most :data:`RETRY_DEADLINE_S`
    after the first failure; then the read fails like any other read error.
    Every GET names the ETag rank 0 planned with (``If-Match``), so an
    object replaced between plan and read fails instead of mixing versions.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import DistLoadError
from .base import Output, Sink, Source, Store, check_plain_name

DEFAULT_PART_BYTES = 16 << 20  # request size of reads and multipart parts (multipart_chunksize)
DEFAULT_CONCURRENCY = 8  # concurrent requests per owner or writer (max_concurrent_requests)
MIN_UPLOAD_PART = 5 << 20  # S3's smallest part but the last
MAX_PARTS = 10_000  # S3's most parts per upload
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0  # one socket read that stalls this long is a transient failure
RETRY_DEADLINE_S = 60.0  # no new attempt this long after a read's first failure
_INSTALL = "s3:// paths need the s3 extra: pip install 'distload[s3]'"
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DistLoadError(f"{uri!r} names no bucket: write s3://bucket/prefix")
    return bucket, key.strip("/")


class _Client:
    """One boto3 client per process and configuration, shared by every thread (boto3 clients are thread-safe)."""

    _lock = threading.Lock()
    _cache: dict[tuple, _Client] = {}

    def __init__(self):
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise DistLoadError(_INSTALL) from None
        session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
        scoped = session._session.get_scoped_config() or {}
        s3conf = scoped.get("s3") if isinstance(scoped.get("s3"), dict) else {}
        self.part_bytes = _size(s3conf.get("multipart_chunksize"), DEFAULT_PART_BYTES)
        self.concurrency = max(1, int(s3conf.get("max_concurrent_requests") or DEFAULT_CONCURRENCY))

        def make(extra: dict) -> object:
            cfg = botocore.config.Config(max_pool_connections=max(64, 4 * self.concurrency),
                                         connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                                         user_agent_extra="distload", **extra)
            return session.client("s3", config=cfg)

        client = make({})
        # S3-compatible stores (an IP or a private host) need path-style requests; AWS itself is
        # left to botocore, and so is an addressing_style the profile sets.
        if "amazonaws.com" not in client.meta.endpoint_url and "addressing_style" not in s3conf:
            client = make({"s3": {"addressing_style": "path"}})
        self.client = client
        self.endpoint = client.meta.endpoint_url
        retries = client.meta.config.retries or {}
        self.attempts = int(retries.get("total_max_attempts") or retries.get("max_attempts") or 3)
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
        self._secrets = [s for s in (getattr(frozen, "secret_key", None), getattr(frozen, "token", None)) if s]

    @classmethod
    def get(cls) -> _Client:
        key = tuple(os.environ.get(k) for k in _ENV)
        with cls._lock:
            client = cls._cache.get(key)
            if client is None:
                try:
                    client = cls._cache[key] = cls()
                except DistLoadError:
                    raise
                except Exception as e:  # a broken ~/.aws file, an unknown profile
                    raise DistLoadError(f"cannot configure the S3 client: {type(e).__name__}: {e}") from None
            return client

    def scrub(self, text: str) -> str:
        """``text`` without this client's secret key or session token."""
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


def _size(value: object, default: int) -> int:
    """A size as the AWS CLI writes it in ``~/.aws/config`` (``16MB`` = 16 MiB), else ``default``."""
    if value is None:
        return default
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", str(value), re.I)
    if not m:
        raise DistLoadError(f"~/.aws/config: s3 multipart_chunksize {value!r} is not a size like 16MB")
    scale = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)[0].upper() if m.group(2) else None]
    return max(1, int(m.group(1)) * scale)


_AUTH_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "AllAccessDisabled", "403", "Forbidden"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _transient(e: BaseException) -> bool:
    """A failure worth another attempt: the connection or the body broke, or the store is busy."""
    import botocore.exceptions as be

    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with botocore
        Urllib3Error = OSError  # noqa: N806
    if isinstance(e, be.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _THROTTLE_CODES or status >= 500
    return isinstance(e, (be.ConnectionError, be.HTTPClientError, be.ResponseStreamingError, Urllib3Error,
                          OSError, _ShortBody))


class _ShortBody(Exception):
    """The body ended before the range did (a connection closed early): resumed like a reset."""


def _error(client: _Client | None, e: BaseException, uri: str, doing: str) -> DistLoadError:
    """A :class:`DistLoadError` naming ``uri`` and what failed, with no secret in it."""
    import botocore.exceptions as be

    scrub = client.scrub if client is not None else (lambda s: s)
    if isinstance(e, DistLoadError):
        return e
    if isinstance(e, (be.NoCredentialsError, be.PartialCredentialsError, be.CredentialRetrievalError)):
        return DistLoadError(f"{uri}: no usable AWS credentials ({type(e).__name__}): set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials, or run where instance "
                             "or role credentials exist")
    if isinstance(e, be.ClientError):
        err = e.response.get("Error", {})
        code, msg = str(err.get("Code", "")), scrub(str(err.get("Message", "")))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return DistLoadError(f"{uri}: bucket {parse_uri(uri)[0]!r} does not exist")
        if code in _MISSING_CODES or status == 404:
            return DistLoadError(f"missing object {uri}")
        if code in _AUTH_CODES or status == 403:
            why = f"{code}: {msg}" if msg and msg != "Forbidden" else code
            return DistLoadError(f"{uri}: access denied ({why}) while {doing}; check the AWS credentials "
                                 "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) and the "
                                 "bucket's policy")
        if code == "PreconditionFailed" or status == 412:
            return DistLoadError(f"{uri} changed since rank 0 planned the load (its ETag or size differs): "
                                 "another writer replaced it; load again")
        return DistLoadError(f"{uri}: {doing} failed: {code or status}: {msg}")
    if isinstance(e, be.EndpointConnectionError):
        return DistLoadError(f"{uri}: cannot reach the object store at {client.endpoint if client else '?'} "
                             f"while {doing}: {scrub(str(e))}")
    return DistLoadError(f"{uri}: {doing} failed: {type(e).__name__}: {scrub(str(e))}")


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: up to 0.1 s, 0.2 s, 0.4 s ... capped at 5 s."""
    return random.uniform(0, min(5.0, 0.1 * 2 ** attempt))


class S3Source(Source):
    """(any rank) One object, pinned to the ETag it had when opened: ranged GETs into the caller's buffers."""

    def __init__(self, store: S3Store, key: str, size: int, etag: str):
        self._store, self._key = store, key
        self.name, self.size, self.version = f"s3://{store.bucket}/{key}", size, etag
        self.part_bytes = store.client.part_bytes
        self.concurrency = store.client.concurrency

    def read_into(self, view: memoryview, offset: int, what: str | None = None) -> None:
        """Ranged GETs for ``view`` (``If-Match`` the pinned ETag), resumed where a transient failure cut one."""
        total = len(view)
        if total == 0:
            return
        if offset + total > self.size:
            raise DistLoadError(f"{what or self.name}: truncated: reading bytes {offset}-{offset + total} "
                                f"of a {self.size}-byte object")
        client = self._store.client
        done, attempt, first_failure = 0, 0, 0.0
        while done < total:
            try:
                done += self._get(view[done:], offset + done)
                continue
            except _Partial as p:
                done, cause = done + p.received, p.cause
                if p.received:
                    attempt = 0  # progress: count attempts afresh, the deadline still holds
            except Exception as e:
                cause = e
            doing = f"reading bytes {offset}-{offset + total}"
            if not _transient(cause):
                raise _error(client, cause, self.name, doing) from None
            now = time.monotonic()
            first_failure = first_failure or now
            attempt += 1
            if attempt >= client.attempts or now - first_failure >= RETRY_DEADLINE_S:
                raise _error(client, cause, self.name, f"{doing} (gave up after {now - first_failure:.1f} s of "
                                                       "retries)") from None
            time.sleep(_backoff(attempt))

    def _get(self, view: memoryview, offset: int) -> int:
        """One GET of ``view``'s range: ``len(view)``, or :class:`_Partial` with what arrived before it broke."""
        client = self._store.client
        end = offset + len(view) - 1
        resp = client.client.get_object(Bucket=self._store.bucket, Key=self._key, Range=f"bytes={offset}-{end}",
                                        IfMatch=self.version)
        raw = resp["Body"]._raw_stream
        # http.client's readinto receives straight into the view (recv_into); urllib3's own readinto
        # reads into bytes and copies them (more CPU, and a part's worth of memory per request).
        direct = getattr(raw, "_fp", None)
        stream = direct if direct is not None and not raw.headers.get("content-encoding") else raw
        got = resp.get("ContentRange", "")
        if got and not got.endswith(f"/{self.size}"):
            raw.close()
            raise DistLoadError(f"{self.name} changed since rank 0 planned the load: it is now "
                                f"{got.rpartition('/')[2]} bytes, not {self.size}; load again")
        pos = 0
        try:
            while pos < len(view):
                n = stream.readinto(view[pos:])
                if not n:
                    raise _ShortBody(f"the body ended {len(view) - pos} bytes early")
                pos += n
        except Exception as e:
            raw.close()
            raise _Partial(pos, e) from e
        raw.release_conn()
        return pos


class _Partial(Exception):
    """A response that broke after ``received`` bytes; carries the cause for the retry decision."""

    def __init__(self, received: int, cause: BaseException):
        super().__init__(str(cause))
        self.received, self.cause = received, cause


class S3Store(Store):
    """(any rank) The objects directly under ``s3://bucket/prefix``."""

    remote = True

    def __init__(self, location: str):
        self.bucket, self.prefix = parse_uri(location)
        self.location = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = _Client.get()

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def open(self, name: str, *, checked: bool = True) -> S3Source:
        check_plain_name(name, self.location)
        try:
            head = self.client.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:
            raise self._bucket_error(e, name, "opening it") from None
        return S3Source(self, self.key(name), int(head["ContentLength"]), str(head.get("ETag", "")))

    def _bucket_error(self, e: BaseException, name: str, doing: str) -> DistLoadError:
        """HEAD answers a missing bucket with a bare 404: ask the listing which one is missing."""
        err = _error(self.client, e, self.uri(name), doing)
        if str(err).startswith("missing object"):
            try:
                self.client.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(name), MaxKeys=1)
            except Exception as e2:
                return _error(self.client, e2, self.uri(name), doing)
        return err

    def names(self) -> list[str]:
        out: list[str] = []
        start = self.key("")
        kwargs = {"Bucket": self.bucket, "Prefix": start, "Delimiter": "/"}
        try:
            while True:
                page = self.client.client.list_objects_v2(**kwargs)
                out.extend(o["Key"][len(start):] for o in page.get("Contents", ()) if o["Key"] != start)
                if not page.get("IsTruncated"):
                    break
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
        except Exception as e:
            raise _error(self.client, e, self.location, "listing it") from None
        return sorted(out)

    def get_small(self, name: str, limit: int) -> bytes | None:
        check_plain_name(name, self.location)
        uri = self.uri(name)
        try:
            resp = self.client.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:
            err = self._bucket_error(e, name, "reading it")
            if str(err).startswith("missing object"):
                return None
            raise err from None
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", 0)) > limit:
                raise DistLoadError(f"{uri}: {resp['ContentLength']} bytes exceeds the {limit} byte limit")
            return body.read()
        except DistLoadError:
            raise
        except Exception as e:
            raise _error(self.client, e, uri, "reading it") from None
        finally:
            body.close()


class S3Output(Output):
    """(a writer rank) One object written as a multipart upload, in order, ``concurrency`` parts in flight.

    Bytes are copied into part buffers (the write queue hands chunks of any
    size; S3 wants parts of at least 5 MiB); a full part goes to the sink's
    upload threads. The upload is completed by :meth:`publish` only, so until
    every writer has finished nothing of the new checkpoint is visible.
    """

    def __init__(self, sink: S3Sink, name: str, size: int):
        check_plain_name(name, sink.store.location)
        self.name, self.size, self._sink = name, size, sink
        self._key, self.uri = sink.store.key(name), sink.store.uri(name)
        self._part = max(sink.part_bytes, MIN_UPLOAD_PART, -(-size // MAX_PARTS))
        self._buf: bytearray | None = None
        self._fill = self._next = 0
        self._parts: list[Future] = []
        self._completed = False
        try:
            up = sink.client.client.create_multipart_upload(Bucket=sink.store.bucket, Key=self._key)
        except Exception as e:
            raise _error(sink.client, e, self.uri, "starting its upload") from None
        self._upload_id: str | None = up["UploadId"]

    def write(self, offset: int, data: memoryview) -> None:
        if offset != self._next:
            raise DistLoadError(f"{self.uri}: write at byte {offset}, but the upload is at byte {self._next} "
                                "(an object is written front to back)")
        if self._sink.failed is not None:  # a part already failed: stop feeding uploads that cannot complete
            raise self._sink.failed
        data = data.cast("B") if data.format != "B" else data
        while len(data):
            if self._buf is None:
                self._buf = self._sink.part_buffer(self._part)
            take = min(len(data), self._part - self._fill)
            self._buf[self._fill: self._fill + take] = data[:take]
            self._fill += take
            self._next += take
            data = data[take:]
            if self._fill == self._part:
                self._flush()

    def _flush(self) -> None:
        buf, n, number = self._buf, self._fill, len(self._parts) + 1
        self._buf, self._fill = None, 0
        assert buf is not None
        self._parts.append(self._sink.upload(self._upload_part, number, buf, n))

    def _upload_part(self, number: int, buf: bytearray, n: int) -> dict:
        body = buf if n == len(buf) else bytes(memoryview(buf)[:n])
        try:
            got = self._sink.client.client.upload_part(Bucket=self._sink.store.bucket, Key=self._key,
                                                        UploadId=self._upload_id, PartNumber=number, Body=body)
        except Exception as e:
            raise _error(self._sink.client, e, self.uri, f"uploading part {number}") from None
        return {"PartNumber": number, "ETag": got["ETag"]}

    def finish(self) -> None:
        """Upload the last part and wait for every part; the object is still invisible."""
        if self._next != self.size:
            raise DistLoadError(f"{self.uri}: {self._next} bytes written, but the file is {self.size}")
        if self._fill:
            self._flush()
        for f in self._parts:
            f.result()

    def publish(self) -> None:
        """Complete the upload: the object appears under its final name, replacing any older one."""
        parts = [f.result() for f in self._parts]
        try:
            self._sink.client.client.complete_multipart_upload(
                Bucket=self._sink.store.bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": parts})
        except Exception as e:
            raise _error(self._sink.client, e, self.uri, "completing its upload") from None
        self._completed = True

    def abort(self) -> None:
        """Stop the upload and remove what it made: the parts, or the object once completed (best effort)."""
        for f in self._parts:
            f.cancel()
        for f in self._parts:
            try:
                f.exception()
            except BaseException:  # a cancelled part: nothing to wait for
                pass
        if self._buf is not None:
            self._sink.return_buffer(self._buf)
            self._buf = None
        c, bucket = self._sink.client.client, self._sink.store.bucket
        try:
            if self._completed:
                c.delete_object(Bucket=bucket, Key=self._key)
            elif self._upload_id is not None:
                c.abort_multipart_upload(Bucket=bucket, Key=self._key, UploadId=self._upload_id)
        except Exception:  # the store is gone or denies it: a lifecycle rule collects what is left
            pass
        self._upload_id = None


class S3Sink(Sink):
    """(every rank of a save) The objects a save writes under ``s3://bucket/prefix`` from this rank.

    Uploads of all this rank's files share ``concurrency`` threads and at
    most ``concurrency + 1`` part buffers (the writer fills one while the
    others upload), so a writer's memory is bounded whatever the file sizes.
    """

    def __init__(self, location: str, replaced: re.Pattern):
        self.store = S3Store(location)
        self.client = self.store.client
        self.part_bytes, self.concurrency = self.client.part_bytes, self.client.concurrency
        self._replaced = replaced
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.Semaphore(self.concurrency)
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._small: list[str] = []
        self._committed = False
        self.failed: BaseException | None = None  # the first part upload that failed

    def begin(self) -> str:
        """(rank 0) Check the bucket answers (a missing bucket or bad credentials fail here, before any upload)."""
        self.store.names()
        return self.store.location

    def create(self, name: str, size: int) -> S3Output:
        return S3Output(self, name, size)

    def part_buffer(self, nbytes: int) -> bytearray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == nbytes:
                    return buf
        return bytearray(nbytes)

    def return_buffer(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)

    def upload(self, fn, number: int, buf: bytearray, n: int) -> Future:
        """Run ``fn(number, buf, n)`` on an upload thread once fewer than ``concurrency`` parts are in flight."""
        self._slots.acquire()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="distload-upload")

        def run() -> dict:
            try:
                return fn(number, buf, n)
            except BaseException as e:
                self.failed = self.failed or e
                raise
            finally:
                self.return_buffer(buf)
                self._slots.release()

        try:
            return self._pool.submit(run)
        except BaseException:
            self.return_buffer(buf)
            self._slots.release()
            raise

    def put_small(self, name: str, data: bytes) -> None:
        check_plain_name(name, self.store.location)
        try:
            self.client.client.put_object(Bucket=self.store.bucket, Key=self.store.key(name), Body=data)
        except Exception as e:
            raise _error(self.client, e, self.store.uri(name), "writing it") from None
        self._small.append(name)

    def commit(self, index_name: str, index: bytes, files: list[str]) -> list[str]:
        """(rank 0) The index last, then remove what the previous checkpoint held and this one does not:
        the names a save replaces, and every file the previous index named."""
        previous = self._named_by(index_name)
        self.put_small(index_name, index)
        self._committed = True
        keep = set(files) | set(self._small)
        warnings: list[str] = []
        try:
            stale = [n for n in self.store.names()
                     if (self._replaced.fullmatch(n) or n in previous) and n not in keep]
            for i in range(0, len(stale), 1000):
                got = self.client.client.delete_objects(
                    Bucket=self.store.bucket,
                    Delete={"Objects": [{"Key": self.store.key(n)} for n in stale[i: i + 1000]], "Quiet": True})
                for err in got.get("Errors", ()):
                    warnings.append(f"could not remove {err.get('Key')} of the previous checkpoint: "
                                    f"{err.get('Code')}")
        except Exception as e:
            warnings.append(f"the new checkpoint is complete, but removing the previous one's files failed: "
                            f"{_error(self.client, e, self.store.location, 'listing it')}")
        return warnings

    def _named_by(self, index_name: str) -> set[str]:
        """The files the prefix's current index names (none when there is none or it is not one)."""
        try:
            doc = json.loads(self.store.get_small(index_name, 256 << 20) or b"{}")
            return {v for v in doc.get("weight_map", {}).values() if isinstance(v, str)}
        except (ValueError, AttributeError, DistLoadError):
            return set()

    def discard(self) -> None:
        """(rank 0, on failure) Remove the configs this save wrote; nothing once the index is written."""
        if not self._committed:
            for name in self._small:
                try:
                    self.client.client.delete_object(Bucket=self.store.bucket, Key=self.store.key(name))
                except Exception:  # best effort: the failure being reported matters more
                    pass
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
