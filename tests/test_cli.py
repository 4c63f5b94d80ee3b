"""``python -m distload.load`` as a subprocess: plain python, and torchrun --standalone with 2 ranks.

torchrun --standalone picks a free port itself. Every run is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distload.format.header import read_checkpoint

TIMEOUT = 300


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(tmp_path: Path, *args: str, nproc: int = 0, script: str | None = None, **env: str):
    """Run the CLI (or ``script``) in one process, or under torchrun with ``nproc`` ranks."""
    target = [script] if script else ["-m", "distload.load"]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *target, *args]
    else:
        cmd = [sys.executable, *target, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("distload: error")]


def check_report(report: dict, ckpt: Path, world: int) -> None:
    ck = read_checkpoint(ckpt)
    assert report["world_size"] == world and len(report["ranks"]) == world
    assert report["total_bytes"] == ck.total_bytes
    assert sum(r["bytes_read"] for r in report["ranks"]) == ck.total_bytes
    assert sorted(f for r in report["ranks"] for f in r["files"]) == sorted(f.name for f in ck.files)
    assert [r["rank"] for r in report["ranks"]] == list(range(world))
    for r in report["ranks"]:
        assert r["peak_rss_bytes"] > 0 and r["seconds"] > 0
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []


FACTORY = textwrap.dedent('''
    """Model factories for the CLI tests: a module shaped like whatever checkpoint they are given."""
    import torch
    from torch import nn

    from distload.format.header import read_checkpoint
    from distload.format.dtypes import torch_dtype

    FIXED_PATH = {fixed!r}


    def _module(path, extra=False):
        root = nn.Module()
        for f in read_checkpoint(path).files:
            for t in f.tensors:
                *parts, leaf = t.name.split(".")
                mod = root
                for p in parts:
                    mod = mod._modules.setdefault(p, nn.Module())
                dt = torch_dtype(t.dtype)
                if dt.is_floating_point:
                    mod.register_parameter(leaf, nn.Parameter(torch.zeros(t.shape, dtype=dt)))
                else:
                    mod.register_buffer(leaf, torch.zeros(t.shape, dtype=dt))
        if extra:
            root.extra = nn.Linear(2, 2, bias=False)
        for p in root.parameters():
            assert p.is_meta, "the CLI must call factories under empty_init"
        return root


    def build(path):
        return _module(path)


    def build_fixed():
        return _module(FIXED_PATH)


    def build_extra(path):
        return _module(path, extra=True)


    def broken(path):
        raise RuntimeError("factory exploded\\nsecond line")
''')


@pytest.fixture
def factory(tmp_path, synthetic_ckpt) -> str:
    (tmp_path / "userfactory.py").write_text(FACTORY.format(fixed=str(synthetic_ckpt)))
    return "userfactory"


# ---- success ------------------------------------------------------------------------------


def test_single_process_hf_model_with_report(tmp_path, llama_ckpt):
    out = tmp_path / "report.json"
    proc = run_cli(tmp_path, str(llama_ckpt), "--model", "hf", "--report", str(out), "--bucket-mb", "0.05")
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == []
    assert re.search(r"distload: [\d.]+ GB in [\d.]+ s = [\d.]+ GB/s, world 1", proc.stdout), proc.stdout
    assert "rank   0" in proc.stdout and "peak RSS" in proc.stdout
    report = json.loads(out.read_text())
    check_report(report, llama_ckpt, 1)
    assert report["chunks"] > 4 and report["gbps"] > 0


def test_torchrun_two_ranks_hf_model(tmp_path, llama_ckpt):
    out = tmp_path / "report.json"
    proc = run_cli(tmp_path, str(llama_ckpt), "--model", "hf", "--dtype", "bf16", "--report", str(out),
                   "--bucket-mb", "0.05", nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert error_lines(proc) == []
    assert proc.stdout.count("GB/s") == 1  # only rank 0 prints the summary
    assert re.search(r"world 2", proc.stdout)
    report = json.loads(out.read_text())
    check_report(report, llama_ckpt, 2)
    assert all(r["bytes_read"] > 0 for r in report["ranks"])  # 4 files over 2 ranks: both read


def test_model_none_loads_a_state_dict(tmp_path, llama_ckpt):
    out = tmp_path / "report.json"
    proc = run_cli(tmp_path, str(llama_ckpt), "--model", "none", "--report", str(out))
    assert proc.returncode == 0, proc.stderr
    check_report(json.loads(out.read_text()), llama_ckpt, 1)


def test_model_factory_with_and_without_path(tmp_path, synthetic_ckpt, factory):
    for spec in (f"{factory}:build", f"{factory}:build_fixed"):
        out = tmp_path / f"{spec.replace(':', '_')}.json"
        proc = run_cli(tmp_path, str(synthetic_ckpt), "--model", spec, "--report", str(out), "--bucket-mb", "0.001")
        assert proc.returncode == 0, proc.stderr
        check_report(json.loads(out.read_text()), synthetic_ckpt, 1)


def test_factory_under_torchrun_strict_and_no_strict(tmp_path, synthetic_ckpt, factory):
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--model", f"{factory}:build_extra", nproc=2)
    assert proc.returncode != 0
    errs = error_lines(proc)
    assert len(errs) == 1, proc.stdout + proc.stderr  # agreed on both ranks, printed once
    assert "missing keys" in errs[0] and "extra.weight" in errs[0]
    assert "--no-strict" in errs[0] and "strict=False" not in errs[0]  # the CLI's option, not the library's

    out = tmp_path / "report.json"
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--model", f"{factory}:build_extra", "--no-strict",
                   "--report", str(out), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["missing_keys"] == ["extra.weight"]
    assert "missing keys (1): extra.weight" in proc.stdout


# ---- --dry-run ------------------------------------------------------------------------------

SPY = textwrap.dedent('''
    """Run the CLI while recording every read of a .safetensors file: (path, offset, length)."""
    import builtins, io, json, os, sys

    reads, opens = [], []
    _pread, _preadv, _read, _open = os.pread, os.preadv, os.read, builtins.open

    def _path(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def pread(fd, n, off):
        if _path(fd).endswith(".safetensors"):
            reads.append((_path(fd), off, n))
        return _pread(fd, n, off)

    def preadv(fd, bufs, off, *a):
        if _path(fd).endswith(".safetensors"):
            reads.append((_path(fd), off, sum(memoryview(b).nbytes for b in bufs)))
        return _preadv(fd, bufs, off, *a)

    def read(fd, n):
        if _path(fd).endswith(".safetensors"):
            reads.append((_path(fd), os.lseek(fd, 0, os.SEEK_CUR), n))
        return _read(fd, n)

    def open_(p, *a, **kw):
        if isinstance(p, (str, os.PathLike)) and os.fspath(p).endswith(".safetensors"):
            opens.append(os.fspath(p))
        return _open(p, *a, **kw)

    os.pread, os.preadv, os.read = pread, preadv, read
    builtins.open = io.open = open_
    import distload.load
    rc = distload.load.main(sys.argv[1:])
    with _open(os.environ["SPY_OUT"] + "." + os.environ.get("RANK", "0"), "w") as f:
        json.dump({"reads": reads, "opens": opens}, f)
    sys.exit(rc)
''')


@pytest.mark.parametrize("nproc", [0, 2])
def test_dry_run_prints_plan_and_reads_no_tensor_data(tmp_path, llama_ckpt, nproc):
    spy = tmp_path / "spy_cli.py"
    spy.write_text(SPY)
    proc = run_cli(tmp_path, str(llama_ckpt), "--dry-run", "--model", "hf", script=str(spy), nproc=nproc,
                   SPY_OUT=str(tmp_path / "spy"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = nproc or 1
    ck = read_checkpoint(llama_ckpt)
    # file -> rank: every file once, on one line with its rank; owners as the planner decides
    owners = {}
    for f in ck.files:
        lines = [line for line in proc.stdout.splitlines() if f.name in line]
        assert len(lines) == 1, proc.stdout
        m = re.search(r"-> rank (\d+)", lines[0])
        assert m, lines[0]
        owners[f.name] = int(m.group(1))
    assert set(owners.values()) == set(range(world))  # 4 files: every rank gets some
    # bytes per rank, one line each (printed by rank 0 only)
    for r in range(world):
        per_rank = [line for line in proc.stdout.splitlines() if re.match(rf"\s*rank {r}\b", line)]
        assert len(per_rank) == 1 and "GB" in per_rank[0], proc.stdout
    assert proc.stdout.count("-> rank") == len(ck.files)
    assert "GB/s" not in proc.stdout  # nothing was loaded
    # no tensor data read: every read of a .safetensors file stays inside its header
    header_end = {str(llama_ckpt / f.name): f.data_offset for f in ck.files}
    for r in range(world):
        spied = json.loads((tmp_path / f"spy.{r}").read_text())
        assert spied["opens"] == []
        for path, off, n in spied["reads"]:
            assert off + n <= header_end[path], f"rank {r} read {n} bytes at {off} of {path}: tensor data"
        if r != 0:
            assert spied["reads"] == []  # only rank 0 reads headers
    assert json.loads((tmp_path / "spy.0").read_text())["reads"]  # the spy did see the header reads


# ---- bad input: non-zero exit, one line ------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    (["{missing}"], "does not exist"),
    (["{synth}", "--model", "no_such_module:build"], "cannot import model factory"),
    (["{synth}", "--model", "userfactory:broken"], "factory exploded | second line"),
    (["{synth}", "--model", "hf"], "config.json"),
    (["{synth}", "--dtype", "int3"], "--dtype"),
    (["{synth}", "--bucket-mb", "0"], "--bucket-mb must be positive"),
    (["{synth}", "--device", "gpu"], "--device gpu is not a device"),
    (["{synth}", "--model", "none", "--mode", "fsdp"], "--mode fsdp needs a model"),
    (["{synth}", "--report", "{missing}/r.json"], "--report"),
])
def test_bad_input_one_line_error(tmp_path, synthetic_ckpt, factory, args, match):
    args = [a.format(missing=tmp_path / "nowhere", synth=synthetic_ckpt) for a in args]
    proc = run_cli(tmp_path, *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errs = error_lines(proc)
    assert len(errs) == 1, proc.stderr
    assert match in errs[0]
    assert errs[0] == proc.stderr.strip().splitlines()[-1]
    assert "GB/s" not in proc.stdout


def test_bad_input_under_torchrun(tmp_path):
    proc = run_cli(tmp_path, str(tmp_path / "nowhere"), nproc=2)
    assert proc.returncode != 0
    errs = error_lines(proc)
    assert len(errs) == 1 and "does not exist" in errs[0], proc.stdout + proc.stderr
    assert errs[0].startswith("distload: error: plan failed on rank 0: checkpoint path does not exist"), errs[0]
    # torchrun's summary ends with distload's line as the root cause
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    assert any("traceback : distload: error" in line for line in tail[-4:]), tail[-12:]


def test_dry_run_with_fsdp_prints_the_sharded_plan_and_reads_no_tensor_data(tmp_path, llama_ckpt):
    spy = tmp_path / "spy_cli.py"
    spy.write_text(SPY)
    proc = run_cli(tmp_path, str(llama_ckpt), "--dry-run", "--model", "hf", "--mode", "fsdp",
                   "--read-policy", "scatter", script=str(spy), nproc=2, SPY_OUT=str(tmp_path / "spy"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sharded = [line for line in proc.stdout.splitlines() if line.startswith("sharded:")]
    assert len(sharded) == 1 and "read_policy scatter" in sharded[0] and "0 read as slices" in sharded[0], proc.stdout
    assert int(re.search(r"(\d+) DTensor", sharded[0]).group(1)) > 0
    for r in range(2):
        per_rank = [line for line in proc.stdout.splitlines() if re.match(rf"\s*rank {r}\b", line)]
        assert len(per_rank) == 1 and "GB of shards" in per_rank[0], proc.stdout
    assert "GB/s" not in proc.stdout  # nothing was loaded
    header_end = {str(llama_ckpt / f.name): f.data_offset for f in read_checkpoint(llama_ckpt).files}
    for r in range(2):
        for path, off, n in json.loads((tmp_path / f"spy.{r}").read_text())["reads"]:
            assert off + n <= header_end[path], f"rank {r} read {n} bytes at {off} of {path}: tensor data"


def test_help_names_the_command_shows_defaults_and_a_torchrun_example(tmp_path):
    code = ("import sys; sys.argv[0] = '/venv/bin/distload'; from distload.load import main; main(['--help'])")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: distload ")
    assert "(default: 64" in proc.stdout and "(default: 300" in proc.stdout
    assert "torchrun --standalone --nproc_per_node 8 -m distload.load" in proc.stdout


def test_model_hf_refuses_a_config_naming_a_class_that_is_not_a_model(tmp_path, llama_ckpt):
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["architectures"] = ["AutoTokenizer"]  # a transformers class, but not a PreTrainedModel
    (llama_ckpt / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(tmp_path, str(llama_ckpt), "--model", "hf")
    assert proc.returncode == 1
    errs = error_lines(proc)
    assert len(errs) == 1 and "'AutoTokenizer', which is not a transformers model class" in errs[0], proc.stderr
