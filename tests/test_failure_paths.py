"""Failure paths that used to strand a rank, break a model or flood the logs, each injected on CPU.

A failed load leaves a live model's parameter objects and ties as they were; every fault that one rank
meets while saving or loading (an allocation, a thread that cannot start, a layout) reaches the
agreement, so every rank raises the same error; converted keys obey the casting rule; error text is
clipped; ranks compare their device type; the SLURM port and MPI point-to-point transfers."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distload
from ckpt import write_sized
from dist import run_world
from distload.errors import MAX_MESSAGE, MAX_TRACEBACK, NAMES_SHOWN, DistLoadError, clip_names, clip_text
from launch_env import TESTS, clean_env, venv_tool

HANG_S = 150.0
LOAD_S = 30.0


def _outcome(e: BaseException) -> dict:
    rec = {"kind": type(e).__name__, "message": str(e)}
    if isinstance(e, DistLoadError):
        rec.update(phase=e.phase, failures=sorted(e.failures), one_line=e.one_line(),
                   tracebacks={r: len(t) for r, t in e.tracebacks.items()})
    return rec


# ---- a failed load into a live model with tied weights ---------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight


def _tied_ckpt(path: Path) -> Path:
    """What save_pretrained writes for a tied model: the shared weight once, under its own name."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    src = Tied()
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if k != "head.weight"},
              str(path / "model.safetensors"))
    return path


def _fail_data_reads():
    """Make ``os.preadv`` fail with EIO for reads of tensor data (headers, a few hundred bytes, still read);
    returns the real one."""
    real = os.preadv

    def preadv(fd, buffers, offset, *a):
        if sum(len(memoryview(b)) for b in buffers) > 1024:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buffers, offset, *a)

    os.preadv = preadv
    return real


def _tied_reload(rank: int, world: int, path: str) -> dict:
    """(every rank) A live tied model: a load fails on a read; then a strict retry."""
    model = Tied()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    real = _fail_data_reads()
    try:
        distload.load_checkpoint(model, path, strict=True)
        failed = None
    except DistLoadError as e:
        failed = e.one_line()
    finally:
        os.preadv = real
    after = dict(model.named_parameters(remove_duplicate=False))
    rec = {
        "failed": failed,
        "same_objects": all(after[n] is p for n, p in before.items()),
        "tied": model.head.weight is model.embed.weight,
        "types": sorted({type(p).__name__ for p in after.values()}),
        "all_meta": all(p.is_meta for p in after.values()),
    }
    distload.load_checkpoint(model, path, strict=True)
    want = load_file(str(Path(path) / "model.safetensors"))
    rec["retry_equal"] = all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    rec["retry_tied"] = model.head.weight is model.embed.weight
    rec["retry_same_objects"] = all(model.get_parameter(n) is p for n, p in before.items())
    return rec


@pytest.mark.parametrize("world", [1, 2])
def test_a_failed_load_keeps_a_live_models_tied_parameter_objects_and_a_strict_retry_loads(tmp_path, world):
    ckpt = _tied_ckpt(tmp_path / "tied")
    results = [_tied_reload(0, 1, str(ckpt))] if world == 1 else run_world(_tied_reload, world, str(ckpt),
                                                                                  timeout=HANG_S)
    for rec in results:
        assert rec["failed"] and "Input/output error (injected)" in rec["failed"], rec
        assert rec["same_objects"] and rec["tied"], "the model's parameter objects and ties are as before"
        assert rec["types"] == ["Parameter"] and rec["all_meta"], rec
        assert rec["retry_equal"] and rec["retry_tied"] and rec["retry_same_objects"], rec


# ---- faults on one rank reach the agreement ------------------------------------------------------------


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(96, 64, generator=g))
        self.b = nn.Parameter(torch.randn(64, 48, generator=g))
        self.c = nn.Parameter(torch.randn(40, generator=g))


def _fsdp_wide():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch.distributed as dist

    model = Wide()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model


def _save_allocation_fails(rank: int, world: int, out: str, which: str) -> dict:
    """(every rank) Save once; save again while the last rank's ``which`` allocation fails (out of memory)."""
    model = _fsdp_wide()
    distload.save_checkpoint(model, out, max_shard_size="8KB", bucket_mb=0.004)
    if rank == world - 1:
        real = torch.empty

        caller = {"scratch": "distload.saver", "staging": "distload.io.writer"}[which]

        def empty(*a, **kw):
            # torch's own collectives allocate too: fail only the save's transfer or staging buffer.
            if kw.get("dtype") is torch.uint8 and sys._getframe(1).f_globals.get("__name__") == caller:
                raise torch.OutOfMemoryError(f"injected: out of memory for the {which} buffer")
            return real(*a, **kw)

        torch.empty = empty
    try:
        distload.save_checkpoint(model, out, max_shard_size="8KB", bucket_mb=0.004, dtype=torch.bfloat16)
        return {"kind": "ok"}
    except Exception as e:
        return _outcome(e)


@pytest.mark.parametrize("which", ["scratch", "staging"])
def test_an_allocation_failing_on_one_saving_rank_fails_every_rank_and_keeps_the_checkpoint(tmp_path, which):
    out = tmp_path / "ckpt"
    results = run_world(_save_allocation_fails, 2, str(out), which, timeout=HANG_S)
    for r, rec in enumerate(results):
        assert rec["kind"] == "DistLoadError", (r, rec)
        assert rec["failures"] == [1] and rec["phase"] in ("transfer", "write"), rec
        assert f"out of memory for the {which} buffer" in rec["message"]
    assert len({rec["message"] for rec in results}) == 1
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert all(v.dtype == torch.float32 for v in saved.values()), "the previous checkpoint is kept"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def _reader_thread_fails(rank: int, world: int, path: str) -> dict:
    """(every rank) Load; on the last rank the read threads cannot start (as under a pids limit)."""
    if rank == world - 1:
        real = threading.Thread.start

        def start(self):
            if self.name.startswith("distload-io"):
                raise RuntimeError("can't start new thread (injected)")
            return real(self)

        threading.Thread.start = start
    try:
        distload.load_state_dict(path, bucket_mb=0.01, timeout_s=60)
        return {"kind": "ok"}
    except Exception as e:
        return _outcome(e)


def test_a_read_thread_that_cannot_start_fails_every_rank(tmp_path):
    ckpt = write_sized(tmp_path / "ckpt", [64, 48, 32, 16])
    results = run_world(_reader_thread_fails, 2, str(ckpt), timeout=HANG_S)
    for rec in results:
        assert rec["kind"] == "DistLoadError" and rec["phase"] == "transfer" and rec["failures"] == [1], rec
        assert "can't start new thread (injected)" in rec["message"]
        assert "starting this rank's read threads" in rec["message"]
    assert len({rec["message"] for rec in results}) == 1


def _target_layouts_fail(rank: int, world: int, path: str) -> dict:
    """(every rank) FSDP2 dinov2 (its Chunk conversions fill DTensors); the last rank's target layouts fail."""
    import distload.fsdp
    import distload.loader
    from keyckpt import dinov2_config
    from transformers import Dinov2Model

    if rank == world - 1:
        def broken(self):
            raise ValueError("injected: no layout")

        distload.loader._Load._target_layouts = broken
    with distload.empty_init():
        model = Dinov2Model(dinov2_config())
    distload.fsdp.fully_shard_blocks(model)
    try:
        distload.load_checkpoint(model, path, bucket_mb=0.004, timeout_s=60)
        rec = {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e)
    rec["all_meta"] = all(p.is_meta for p in model.parameters())
    return rec


def test_a_converted_dtensors_layout_failing_on_one_rank_fails_every_rank(tmp_path):
    pytest.importorskip("transformers")
    from keyckpt import build, dinov2_config, save
    from transformers import Dinov2Model

    ckpt = save(build(Dinov2Model, dinov2_config()), tmp_path / "dino")
    results = run_world(_target_layouts_fail, 2, str(ckpt), timeout=HANG_S)
    for rec in results:
        assert rec["kind"] == "DistLoadError" and rec["phase"] == "open" and rec["failures"] == [1], rec
        assert "injected: no layout" in rec["message"] and "converted DTensors" in rec["message"]
        assert rec["all_meta"]


# ---- converted keys obey the casting rule ---------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.int8])
def test_a_converted_key_stored_as_fp8_or_integer_fails_the_plan_naming_it(tmp_path, stored):
    pytest.importorskip("transformers")
    from keyckpt import build, dinov2_config, save
    from transformers import Dinov2Model

    ckpt = save(build(Dinov2Model, dinov2_config()), tmp_path / "dino")
    key = "encoder.layer.0.mlp.weights_in.weight"  # Chunk(dim=0) -> gate_proj, up_proj
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    fname = ckpt / index["weight_map"][key]
    tensors = load_file(str(fname))
    tensors[key] = tensors[key].clamp(-100, 100).to(stored)
    save_file(tensors, str(fname), metadata={"format": "pt"})
    index["metadata"].pop("total_size", None)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with distload.empty_init():
        model = Dinov2Model(dinov2_config())
    with pytest.raises(DistLoadError) as info:
        distload.load_checkpoint(model, ckpt)
    text = str(info.value)
    assert info.value.phase == "plan", text
    assert key in text and "Chunk(dim=0)" in text and "encoder.layer.0.mlp" in text, text
    assert all(p.is_meta for p in model.parameters())


# ---- clipped error text -----------------------------------------------------------------------------------


def test_clip_names_and_clip_text_keep_a_count_and_both_ends():
    names = [f"k{i}" for i in range(100)]
    assert clip_names(names[:3]) == "k0, k1, k2"
    clipped = clip_names(names)
    assert clipped.startswith("k0, k1") and clipped.endswith(f"... ({100 - NAMES_SHOWN} more)")
    text = "head " + "x" * 50_000 + " tail"
    out = clip_text(text)
    assert len(out) < MAX_MESSAGE + 100 and out.startswith("head") and out.endswith("tail")


def test_an_agreed_error_with_thousands_of_distinct_causes_stays_short():
    err = DistLoadError.from_failures("open", {r: f"file {r} missing" for r in range(16384)})
    assert len(str(err)) < 3000 and "rank(s) 0-16383" in str(err) and "other cause(s)" in str(err)
    assert len(err.one_line()) < 3000 and len(err.failures) == 16384


class Many(nn.Module):
    def __init__(self, n: int, prefix: str) -> None:
        super().__init__()
        self.p = nn.ParameterDict({f"{prefix}{i}": nn.Parameter(torch.zeros(1)) for i in range(n)})


N_KEYS = 20_000


def _wrong_model(rank: int, world: int, path: str) -> dict:
    with distload.empty_init():
        model = Many(N_KEYS, "w")
    try:
        distload.load_checkpoint(model, path)
        return {"kind": "ok"}
    except Exception as e:
        rec = _outcome(e)
        cause = e.__cause__
        if cause is not None:
            from distload.transport.comm import format_traceback

            rec["cause_message"] = len(str(cause))
            rec["cause_traceback"] = len(format_traceback(cause))
        return rec


def test_a_checkpoint_loaded_into_the_wrong_model_gives_a_short_error_on_every_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({f"p.x{i}": torch.zeros(1) for i in range(N_KEYS)}, str(ckpt / "model.safetensors"))
    for rec in run_world(_wrong_model, 2, str(ckpt), timeout=HANG_S):
        assert rec["kind"] == "DistLoadError" and rec["phase"] == "plan", rec
        assert f"missing keys ({N_KEYS})" in rec["message"] and f"unexpected keys ({N_KEYS})" in rec["message"]
        assert f"({N_KEYS - NAMES_SHOWN} more)" in rec["message"]
        assert len(rec["message"]) < 5000 and len(rec["one_line"]) < 5000, len(rec["message"])
        assert all(n < MAX_TRACEBACK + 200 for n in rec["tracebacks"].values()), rec["tracebacks"]
        if "cause_message" in rec:  # rank 0, which planned: its own exception and traceback are short too
            assert rec["cause_message"] < 5000 and rec["cause_traceback"] < 10000, rec


# ---- ranks compare their device type --------------------------------------------------------------------


def test_the_device_type_is_compared_like_the_other_arguments():
    from distload.transport.groups import argument_mismatch, load_arguments

    cpu = load_arguments("/ck", None, True, "auto", 64, device="cpu")
    assert argument_mismatch([cpu, load_arguments("/ck", None, True, "auto", 64, device=torch.device("cpu"))]) is None
    err = argument_mismatch([load_arguments("/ck", None, True, "auto", 64, device="cuda:0"),
                             load_arguments("/ck", None, True, "auto", 64, device="cuda:3"), cpu])
    assert err is not None and list(err.failures) == [2]
    assert "device is cpu here but cuda on rank 0" in str(err)


def _other_device_on_last(rank: int, world: int, path: str) -> dict:
    """(every rank) The last rank resolves its device to another type than rank 0's."""
    import distload.loader

    if rank == world - 1:
        distload.loader.resolve_device = lambda device: torch.device("meta")
    try:
        distload.load_state_dict(path, timeout_s=60)
        return {"kind": "ok"}
    except Exception as e:
        return _outcome(e)


def test_a_rank_on_another_device_type_fails_the_plan_on_every_rank_naming_it(tmp_path):
    ckpt = write_sized(tmp_path / "ckpt", [16, 8])
    results = run_world(_other_device_on_last, 2, str(ckpt), timeout=HANG_S)
    for rec in results:
        assert rec["kind"] == "DistLoadError" and rec["phase"] == "plan" and rec["failures"] == [1], rec
        assert "device is meta here but cpu on rank 0" in rec["message"]


# ---- the SLURM rendezvous port -----------------------------------------------------------------------------


def test_slurm_steps_of_one_job_and_jobs_20000_apart_get_different_ports():
    from distload.transport.bootstrap import slurm_port

    assert len({slurm_port(4242, s) for s in range(64)}) == 64, "steps running at once in one job"
    assert len({slurm_port(4242 + k * 20000, 0) for k in range(64)}) == 64, "jobs whose ids differ by 20000"


def test_a_taken_slurm_port_fails_with_an_error_that_says_to_set_master_port(tmp_path):
    from distload.transport.bootstrap import slurm_port

    held = socket.socket()
    for job in range(900_001, 900_200):  # a job id whose port is free here; then hold that port
        try:
            held.bind(("0.0.0.0", slurm_port(job, 2)))
            break
        except OSError:
            continue
    held.listen()
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_STEP_ID="2", SLURM_JOB_ID=str(job),
               SLURM_JOB_NODELIST="localhost")
    code = ("import distload\n"
            "try:\n    distload.init_distributed('cpu', timeout_s=20)\n    print('joined')\n"
            "except distload.DistLoadError as e:\n    print('ERROR', e)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    out = proc.stdout + proc.stderr
    assert "ERROR" in out and "already in use" in out and "MASTER_PORT" in out, out[-2000:]
    assert str(slurm_port(job, 2)) in out


# ---- MPI point-to-point transfers keep their buffers after a timeout -----------------------------------------


def test_a_timed_out_mpi_point_to_point_transfer_keeps_its_buffer_until_it_completes(tmp_path):
    mpiexec = venv_tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'distload[mpi]' provides mpich's)")
    pytest.importorskip("mpi4py")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(TESTS / "mpi_stranded_check.py"), str(tmp_path),
                           "p2p"], env=clean_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen == {"timed_out": True, "alive_after_timeout": True, "stranded_after_timeout": 1,
                    "zeros_until_the_root_sends": True, "released_after_completion": True,
                    "stranded_after_completion": 0}
