"""A new user's mistakes, one test each: the exact advice distload gives, and the exit status.

Paths with ``~`` and ``$VARS``, short commit hashes, a mistyped path, a pickle
checkpoint (whose conversion recipe is run as given), unexpected keys on the
command line, ``--report`` paths that cannot be written, ``--no-strict``'s
missing keys, torchrun's failure summary, and ``python -m distload.save``
without a launcher.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import distload
from ckpt import read_all, write_llama, write_synthetic
from distload.format import discover
from launch_env import clean_env
from test_cli import error_lines, run_cli
from test_hub import COMMIT, REPO, lay_out_hub_cache

TIMEOUT = 300


def _cli(tmp_path: Path, module: str, *args: str, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    """``python -m module args`` (or under torchrun with ``nproc`` ranks) in ``tmp_path``, without a launcher's env."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc \
        else [sys.executable]
    return subprocess.run([*launch, "-m", module, *args], cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errs = error_lines(proc)
    assert len(errs) == 1, proc.stdout + proc.stderr
    return errs[0]


def _same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ---- 3. ~ and $VARS in every path argument ---------------------------------------------------


def test_tilde_and_variables_expand_in_the_api(tmp_path, monkeypatch):
    home = tmp_path / "home"
    ck = write_synthetic(home / "ckpts" / "syn")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CKPTS", str(home / "ckpts"))
    monkeypatch.chdir(tmp_path)
    want = read_all(ck)
    _same_tensors(distload.load_state_dict("~/ckpts/syn"), want)
    _same_tensors(distload.load_state_dict("$CKPTS/syn"), want)
    _same_tensors(distload.load_state_dict("${CKPTS}/syn/model.safetensors.index.json"), want)
    assert distload.resolve_checkpoint(Path("~/ckpts/syn")) == ck
    assert distload.plan_checkpoint("~/ckpts/syn").total_bytes == sum(v.nbytes for v in want.values())
    model = torch.nn.Linear(3, 3, bias=False)
    distload.save_checkpoint(model, "~/saved")
    _same_tensors(read_all(home / "saved"), {"weight": model.weight.detach()})


def test_an_unset_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_DIR_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(distload.DistLoadError) as exc:
        distload.load_state_dict("$NO_SUCH_DIR_VAR/ckpt")
    assert str(exc.value).endswith("checkpoint path does not exist: $NO_SUCH_DIR_VAR/ckpt; "
                                   "$NO_SUCH_DIR_VAR is not set in this environment")


def test_tilde_and_variables_expand_on_the_command_line(tmp_path):
    home = tmp_path / "home"
    ck = write_synthetic(home / "ckpts" / "syn")
    proc = run_cli(tmp_path, "~/ckpts/syn", "--report", "$OUT_DIR/r.json", HOME=str(home), OUT_DIR=str(home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((home / "r.json").read_text())["total_bytes"] == sum(v.nbytes for v in read_all(ck).values())

    proc = run_cli(tmp_path, "$NO_SUCH_DIR_VAR/syn", HOME=str(home))
    assert _one_error(proc) == ("distload: error: plan failed on rank 0: checkpoint path does not exist: "
                                "$NO_SUCH_DIR_VAR/syn; $NO_SUCH_DIR_VAR is not set in this environment")


# ---- 4. a short commit hash as revision ---------------------------------------------------------


@pytest.fixture
def two_snapshots(tmp_path) -> tuple[Path, Path, Path]:
    """A hub cache holding REPO at COMMIT (main) and at a second commit sharing COMMIT's first 4 digits."""
    cache = tmp_path / "hub"
    first = lay_out_hub_cache(write_synthetic(tmp_path / "a", n_files=2), cache)
    other = COMMIT[:4] + "0" * 36
    src = write_synthetic(tmp_path / "b", n_files=1)
    second = first.parent / other
    second.mkdir()
    for f in src.iterdir():
        (second / f.name).write_bytes(f.read_bytes())
    return cache, first, second


def test_a_unique_commit_prefix_selects_that_snapshot(two_snapshots, monkeypatch, tmp_path):
    cache, first, second = two_snapshots
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert discover.resolve_checkpoint(REPO, revision=COMMIT[:7]) == first
    assert discover.resolve_checkpoint(REPO, revision=second.name[:6]) == second
    assert discover.resolve_checkpoint(REPO, revision="main") == first
    proc = run_cli(tmp_path, REPO, "--revision", COMMIT[:7], "--model", "none", "--report", "r.json",
                   HF_HUB_CACHE=str(cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(json.loads((tmp_path / "r.json").read_text())["files"]) == 2


def test_an_ambiguous_commit_prefix_names_the_candidates(two_snapshots, tmp_path):
    cache, first, second = two_snapshots
    proc = run_cli(tmp_path, REPO, "--revision", COMMIT[:4], HF_HUB_CACHE=str(cache))
    assert _one_error(proc) == (
        f"distload: error (rank 0): revision '{COMMIT[:4]}' of {REPO} is ambiguous: 2 cached commits start with it "
        f"({min(first.name, second.name)}, {max(first.name, second.name)}); give more of the hash")


# ---- 5. a mistyped relative path --------------------------------------------------------------


def test_a_mistyped_path_under_a_local_folder_is_a_path_error_naming_the_nearest_entries(tmp_path):
    write_synthetic(tmp_path / "ckpts" / "tiny-qwen")
    (tmp_path / "ckpts" / "tiny-llama").mkdir()
    proc = run_cli(tmp_path, "ckpts/tiny-qwn", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    err = _one_error(proc)
    assert err == ("distload: error: plan failed on rank 0: checkpoint path does not exist: ckpts/tiny-qwn; "
                   "ckpts/ has no 'tiny-qwn', nearest: tiny-qwen; nor is it a Hub repo id in the local cache")
    assert "hf download" not in proc.stdout + proc.stderr


def test_a_mistyped_absolute_path_names_the_nearest_entries(tmp_path):
    write_synthetic(tmp_path / "llama-7b")
    with pytest.raises(distload.DistLoadError) as exc:
        discover.find_checkpoint(tmp_path / "lama-7b" / "model.safetensors")
    assert str(exc.value) == (f"checkpoint path does not exist: {tmp_path}/lama-7b/model.safetensors; "
                              f"{tmp_path}/ has no 'lama-7b', nearest: llama-7b")


def test_a_string_shaped_like_a_repo_id_still_gets_the_download_hint(tmp_path):
    proc = run_cli(tmp_path, "someorg/somemodel", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    err = _one_error(proc)
    assert err.startswith("distload: error: plan failed on rank 0: someorg/somemodel is not in the local "
                          f"Hugging Face cache {tmp_path / 'empty-cache'} (nor a local path); ")
    assert "`hf download someorg/somemodel`" in err


# ---- 6. a pickle checkpoint: the recipe in the message works ----------------------------------------


def _recipe(err: str) -> str:
    m = re.search(r": (python -c '.*') ; then load (.+)$", err)
    assert m, err
    return m.group(1)


def _run_recipe(cmd: str, cwd: Path) -> None:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_bin_refusal_gives_a_recipe_that_keeps_a_tied_model_whole(tmp_path):
    from transformers import LlamaForCausalLM

    src = write_llama(tmp_path / "safetensors-src")  # tied lm_head, fp32
    old = tmp_path / "old ckpt"  # a space, to check the quoting
    old.mkdir()
    model = LlamaForCausalLM.from_pretrained(src)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, old / "pytorch_model.bin")  # as older transformers wrote it: the tied tensors share memory
    (old / "config.json").write_text((src / "config.json").read_text())

    proc = run_cli(tmp_path, "old ckpt", "--model", "hf")
    err = _one_error(proc)
    assert err.startswith("distload: error: plan failed on rank 0: distload refuses pickle checkpoints "
                          "(pytorch_model.bin in old ckpt): unpickling runs arbitrary code from the file. Convert it "
                          "once, in an environment that trusts the file, with the class config.json names (keeps "
                          "tied weights and every head): python -c 'import transformers; "
                          "transformers.LlamaForCausalLM.from_pretrained(\"old ckpt\", torch_dtype=\"auto\")"
                          ".save_pretrained(\"old ckpt-safetensors\", safe_serialization=True)' ; "
                          "then load old ckpt-safetensors"), err
    _run_recipe(_recipe(err), tmp_path)

    with distload.empty_init():
        loaded = LlamaForCausalLM(model.config)
    report = distload.load_checkpoint(loaded, tmp_path / "old ckpt-safetensors")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _same_tensors(dict(loaded.state_dict()), dict(LlamaForCausalLM.from_pretrained(src).state_dict()))


def test_a_bare_pickle_file_gets_a_recipe_that_copies_shared_tensors(tmp_path):
    w = torch.randn(8, 4)
    state = {"embed.weight": w, "head.weight": w, "bias": torch.arange(3)}  # two names, one storage
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / "weights.pt")
    with pytest.raises(distload.DistLoadError) as exc:
        distload.load_state_dict(tmp_path / "ck")
    err = str(exc.value)
    assert "(tensors that share memory are copied)" in err and "weights_only=True" in err
    _run_recipe(_recipe(err), tmp_path)
    _same_tensors(distload.load_state_dict(tmp_path / "ck"), state)


# ---- 7. unexpected keys on the command line: --subset ----------------------------------------------

PART = textwrap.dedent('''
    """A model that holds one tensor of the synthetic checkpoint."""
    import torch
    from torch import nn


    def part():
        m = nn.Module()
        m.big = nn.Module()
        m.big.weight = nn.Parameter(torch.zeros(300, 257))
        return m
''')


def test_unexpected_keys_advise_subset_and_subset_loads_only_the_model_s_part(tmp_path, synthetic_ckpt):
    (tmp_path / "partmodel.py").write_text(PART)
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--model", "partmodel:part")
    err = _one_error(proc)
    assert err.startswith("distload: error: plan failed on rank 0: checkpoint does not match the model: "
                          "unexpected keys (9): "), err
    assert err.endswith("(pass --no-strict to load what matches, or --subset if the model holds part of the "
                        "checkpoint)"), err
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--model", "partmodel:part", "--subset", "--report", "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bytes_read"] == 300 * 257 * 4 and len(report["ignored_keys"]) == 9


# ---- 8. --report -------------------------------------------------------------------------------


def test_report_under_a_file_says_it_is_a_file(tmp_path, synthetic_ckpt):
    (tmp_path / "notes.txt").write_text("x")
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--report", "notes.txt/r.json")
    assert _one_error(proc) == "distload: error: setup failed on rank 0: --report notes.txt/r.json: notes.txt is a " \
                               "file, not a directory"
    assert "GB/s" not in proc.stdout  # refused before loading


def test_report_where_no_file_can_be_created_fails_before_loading(tmp_path, synthetic_ckpt):
    try:  # /sys refuses new files even to root, whose permission bits say it may
        open("/sys/distload-probe", "x").close()
    except OSError:
        pass
    else:
        Path("/sys/distload-probe").unlink()
        pytest.skip("this machine lets us create files in /sys")
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--report", "/sys/r.json")
    assert _one_error(proc).startswith("distload: error: setup failed on rank 0: --report /sys/r.json: cannot write "
                                       "the report there: ")
    assert "GB/s" not in proc.stdout


def test_report_write_failing_after_the_load_names_the_option_and_the_path(tmp_path, synthetic_ckpt):
    proc = run_cli(tmp_path, str(synthetic_ckpt), "--report", "/dev/full")  # every write: ENOSPC, a full disk
    assert _one_error(proc) == ("distload: error (rank 0): --report /dev/full: the load succeeded, but writing the "
                                "report failed: No space left on device")
    assert "GB/s" in proc.stdout  # the load itself completed


# ---- 9. --no-strict prints the missing keys once ------------------------------------------------------


def test_no_strict_names_missing_keys_once(tmp_path, llama_ckpt):
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = False  # the model now wants an lm_head.weight the checkpoint lacks
    (llama_ckpt / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(tmp_path, str(llama_ckpt), "--no-strict")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("lm_head.weight") == 1 and "missing keys (1): lm_head.weight" in proc.stdout, out
    assert "UserWarning" not in out


def test_the_library_warns_once_about_missing_keys(llama_ckpt):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(llama_ckpt)
    cfg.tie_word_embeddings = False
    with distload.empty_init():
        model = LlamaForCausalLM(cfg)
    with pytest.warns(UserWarning) as record:
        report = distload.load_checkpoint(model, llama_ckpt, strict=False)
    ours = [w for w in record if "distload:" in str(w.message)]
    assert len(ours) == 1 and "lm_head.weight" in str(ours[0].message) and ours[0].filename == __file__
    assert report.missing_keys == ["lm_head.weight"]
    assert not any("lm_head.weight" in w for w in report.warnings)


# ---- 13. torchrun's failure summary ------------------------------------------------------------------


def test_under_torchrun_every_failed_worker_shows_distload_s_line(tmp_path, llama_ckpt):
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (llama_ckpt / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(tmp_path, str(llama_ckpt), nproc=2)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = ("distload: error: plan failed on rank 0: checkpoint does not match the model: missing keys (1): "
            "lm_head.weight (pass --no-strict to load what matches)")
    assert error_lines(proc) == [line]  # printed once, by rank 0
    out = proc.stdout + proc.stderr
    assert out.count(f"traceback : {line}") == 2, out  # both workers in torchrun's summary, root cause included
    root = out[out.index("Root Cause"):]
    assert f"traceback : {line}" in root and "exitcode  : 1 " in root
    assert "SIGTERM)" not in out and "Signal 15" not in out, out  # no worker shown as killed by torchrun


# ---- 2. python -m distload.save -----------------------------------------------------------------------


def test_save_cli_in_one_process_defaults_to_replicated(tmp_path, llama_ckpt):
    proc = _cli(tmp_path, "distload.save", str(llama_ckpt), "~/out", "--max-shard-size", "200KB",
                HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"distload save: .* world 1, 0 gathered chunks -> .*/out$", proc.stdout.splitlines()[0])
    _same_tensors(read_all(tmp_path / "out"), {k: v for k, v in read_all(llama_ckpt).items()})


def test_save_cli_under_torchrun_defaults_to_fsdp(tmp_path, llama_ckpt):
    proc = _cli(tmp_path, "distload.save", str(llama_ckpt), "out", "--max-shard-size", "200KB", nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"distload save: .* world 2, (\d+) gathered chunks", proc.stdout)
    assert m and int(m.group(1)) > 0, proc.stdout  # sharded tensors travelled to their files' writers
    _same_tensors(read_all(tmp_path / "out"), read_all(llama_ckpt))


def test_save_cli_fsdp_without_a_launcher_says_what_works(tmp_path, llama_ckpt):
    proc = _cli(tmp_path, "distload.save", str(llama_ckpt), "out", "--mode", "fsdp")
    assert _one_error(proc) == ("distload: error (rank 0): --mode fsdp needs a distributed launch (torchrun, srun or "
                                "mpiexec); in one process use --mode replicated (the default there)")
    assert not (tmp_path / "out").exists()


def test_save_cli_refuses_a_checkpoint_that_does_not_match_its_model(tmp_path, llama_ckpt):
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = False  # lm_head.weight missing: a save would write it zero-filled
    (llama_ckpt / "config.json").write_text(json.dumps(cfg))
    proc = _cli(tmp_path, "distload.save", str(llama_ckpt), "out")
    assert _one_error(proc) == ("distload: error: plan failed on rank 0: checkpoint does not match the model: "
                                "missing keys (1): lm_head.weight (distload.save re-shards complete checkpoints only: "
                                "fix config.json, or pass --model pkg.module:factory)")
    assert not (tmp_path / "out").exists()


def test_an_index_that_maps_to_bin_files_gets_the_recipe_of_the_class_config_json_names(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001.bin"}}))
    (ck / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(distload.DistLoadError) as exc:
        distload.plan_checkpoint(ck)
    assert "maps 'w' to 'pytorch_model-00001.bin'" in str(exc.value)
    assert "transformers.LlamaForCausalLM.from_pretrained(" in str(exc.value), str(exc.value)


def test_an_s3_destination_is_never_expanded_as_a_local_path(monkeypatch):
    from distload import save as save_cli

    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    args = save_cli.parse_args(["no-such-src", "s3://bucket/$NOT_SET_HERE/out"])
    with pytest.raises(distload.DistLoadError) as exc:
        save_cli._check(args)  # the $ in an s3:// key is no variable: the complaint is the missing source
    assert "is not set" not in str(exc.value) and "no-such-src" in str(exc.value), str(exc.value)
