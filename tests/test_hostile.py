"""Hostile and damaged checkpoints: a clear DistLoadError on every rank, a failing CLI, in seconds.

Every case in ``hostile_cases.CASES`` is one test. The cases are built once,
loaded in one world-2 gloo job (one load call per case, in turn: an agreed
error leaves the group usable for the next) and run through the CLI's
``main`` in one helper process, so the whole file costs two interpreter
start-ups, not one per case. Two further tests launch the real
``python -m distload.load`` for the cases most likely to hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distload
from dist import run_world
from hostile_cases import BY_NAME, CASES, Tiny, TinyPlus, build_all

HERE = Path(__file__).parent
SECONDS = 10.0  # generous: each case takes milliseconds; a hang takes forever
MODELS = {"tiny": Tiny, "tiny_plus": TinyPlus}


def _load_each(rank: int, world: int, specs: list[tuple[str, str, dict, str]]) -> dict[str, dict]:
    """(every rank) Load every case in turn; record what each load raised."""
    out: dict[str, dict] = {}
    for name, path, kwargs, model_name in specs:
        t0 = time.monotonic()
        rec: dict = {}
        model = None
        try:
            if model_name:
                with distload.empty_init():
                    model = MODELS[model_name]()
                report = distload.load_checkpoint(model, path, **kwargs)
                rec = {"kind": "ok", "missing": report.missing_keys}
            else:
                distload.load_state_dict(path, **kwargs)
                rec = {"kind": "ok", "missing": []}
        except distload.DistLoadError as e:
            rec = {"kind": "DistLoadError", "message": str(e), "phase": e.phase, "failures": e.failures,
                   "agreed": e.agreed, "cause": type(e.__cause__).__name__ if e.__cause__ else None,
                   "cause_has_traceback": e.__cause__ is not None and e.__cause__.__traceback__ is not None}
        except Exception as e:  # anything else is a bug the test reports
            rec = {"kind": type(e).__name__, "message": str(e)}
        rec["seconds"] = time.monotonic() - t0
        if model is not None:
            params = list(model.parameters())
            rec["all_meta"] = all(p.is_meta for p in params)
            rec["any_meta"] = any(p.is_meta for p in params)
        out[name] = rec
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str | None]:
    return build_all(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def world_results(built) -> list[dict[str, dict]]:
    specs = [(c.name, built[c.name], c.kwargs, c.model) for c in CASES if built[c.name] is not None]
    results = run_world(_load_each, 2, specs, timeout=150, expect_errors=True)
    for r, res in enumerate(results):
        assert res[0] == "ok", f"rank {r} crashed or hung: {res[1]}"
    return [res[1] for res in results]


def _cli_argv(case, path: str) -> list[str]:
    argv = [path]
    if case.model:
        argv += ["--model", f"hostile_cases:{MODELS[case.model].__name__}"]
    if case.kwargs.get("strict") is False:
        argv.append("--no-strict")
    return argv


@pytest.fixture(scope="module")
def cli_results(built, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("hostile-cli")
    spec = [(c.name, _cli_argv(c, built[c.name])) for c in CASES if built[c.name] is not None]
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, str(HERE / "hostile_cli.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
                   check=True, timeout=150, env=env)
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_every_rank_and_the_cli_refuse_a_hostile_checkpoint(name, built, world_results, cli_results):
    case = BY_NAME[name]
    if built[name] is None:
        pytest.skip("cannot create this kind of file here (mknod needs privileges)")
    ranks = [res[name] for res in world_results]
    cli = cli_results[name]
    for r, rec in enumerate(ranks):
        assert rec["seconds"] < SECONDS, f"rank {r} took {rec['seconds']:.1f}s"
    assert cli["seconds"] < SECONDS

    if case.missing_ok:  # not hostile: loads, reporting the keys as missing
        for rec in ranks:
            assert rec["kind"] == "ok", rec
            assert rec["missing"] == list(case.missing_ok)
            assert not rec["any_meta"]
        assert cli["rc"] == 0, cli["stderr"]
        return

    for r, rec in enumerate(ranks):
        assert rec["kind"] == "DistLoadError", f"rank {r}: {rec}"
        assert case.expect in rec["message"], f"rank {r}: {rec['message']}"
        assert rec["agreed"] and rec["phase"] == case.phase
        assert list(rec["failures"]) == [0], "rank 0 plans, so rank 0 is the rank that failed"
        if "all_meta" in rec:
            assert rec["all_meta"], "a failed load must leave the model on meta"
    assert ranks[0]["message"] == ranks[1]["message"], "every rank raises the same error"
    assert ranks[0]["cause_has_traceback"], "rank 0 keeps its original exception as __cause__"

    assert cli["rc"] == 1
    lines = cli["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distload: error"), cli["stderr"]
    assert case.expect in lines[0]


def _real_cli(path: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distload.load", path], capture_output=True, text=True,
                          timeout=60, env=env)
    return proc, time.monotonic() - t0


def test_the_real_cli_exits_nonzero_on_a_fifo_without_hanging(built):
    proc, seconds = _real_cli(built["fifo_in_place_of_a_shard"])
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert seconds < 45


def test_the_real_cli_refuses_pickle_and_says_how_to_convert(built):
    proc, _ = _real_cli(built["pickle_checkpoint_directory"])
    assert proc.returncode == 1
    # no config.json here: the recipe saves the state dict with safetensors, shared tensors copied
    assert "arbitrary code" in proc.stderr and "python -c" in proc.stderr and "st.save_file" in proc.stderr
