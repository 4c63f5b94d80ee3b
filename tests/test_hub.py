"""Checkpoints in the Hugging Face hub cache: by snapshot directory and by repo id, over gloo.

The cache is laid out with huggingface_hub's own helpers, as ``snapshot_download``
leaves it: ``models--org--name/blobs/<sha256 or git sha1>``,
``snapshots/<commit>/<file>`` as relative symlinks to ``../../blobs/...``, and
``refs/main`` holding the commit. Nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)
from safetensors.torch import load_file

from ckpt import write_llama
from dist import run_world

REPO = "org/tiny-llama"
COMMIT = "5f1c9a0e7b3d2c4a6e8f0b1d3c5e7a9b2d4f6a8c"
HEAVY = 300  # seconds: every rank imports transformers on a 2-core machine


def _blob_name(f: Path) -> str:
    """The hub's blob name: sha256 for LFS files (weights), the git blob sha1 for the rest."""
    data = f.read_bytes()
    if f.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_hub_cache(src: Path, cache: Path, repo_id: str = REPO, commit: str = COMMIT) -> Path:
    """Move ``src``'s files into ``cache`` exactly as huggingface_hub stores a download; return the snapshot."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = storage / "blobs" / _blob_name(f)
        shutil.move(str(f), blob)
        _create_symlink(str(blob), str(snapshot / f.name), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(cache dir, snapshot dir, safetensors' own read of the weights) for a tiny tied Llama in 4+ shards."""
    root = tmp_path_factory.mktemp("hub")
    src = write_llama(root / "src")
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        ref.update(load_file(f))
    assert len(list(src.glob("*.safetensors"))) >= 4
    snapshot = lay_out_hub_cache(src, root / "cache")
    return root / "cache", snapshot, ref


def test_the_layout_is_the_hub_cache_layout(hub):
    cache, snapshot, _ = hub
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main"}
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.snapshot_path == snapshot
    for f in snapshot.iterdir():
        assert f.is_symlink() and os.readlink(f).startswith("../../blobs/")


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _child(rank, world, snapshot):
    from transformers import AutoConfig, LlamaForCausalLM

    import distload.fsdp

    out = {}
    out["by_snapshot"] = {k: _raw(v) for k, v in distload.load_state_dict(snapshot, bucket_mb=0.02).items()}
    out["by_repo_id"] = {k: _raw(v) for k, v in distload.load_state_dict(REPO).items()}
    out["by_revision"] = {k: _raw(v) for k, v in distload.load_state_dict(REPO, revision=COMMIT).items()}
    try:
        distload.load_state_dict(REPO, revision="no-such-branch")
        out["bad_revision"] = None
    except distload.DistLoadError as e:
        out["bad_revision"] = (e.phase, str(e))
    cfg = AutoConfig.from_pretrained(distload.resolve_checkpoint(REPO))
    with distload.empty_init():
        model = LlamaForCausalLM(cfg)
    report = distload.load_checkpoint(model, REPO, bucket_mb=0.02)
    out["model"] = {k: _raw(v) for k, v in model.state_dict().items()}
    out["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    out["files"] = report.files
    with distload.empty_init():  # FSDP2: each rank receives only its shards from the snapshot
        sharded = distload.fsdp.fully_shard_blocks(LlamaForCausalLM(cfg))
    distload.load_checkpoint(sharded, snapshot, bucket_mb=0.02)
    out["fsdp"] = {k: _raw(v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sharded.state_dict().items()}
    try:
        distload.load_state_dict("org/not-downloaded")
        out["uncached"] = None
    except distload.DistLoadError as e:
        out["uncached"] = (e.phase, str(e))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_a_snapshot_and_a_repo_id_load_bit_for_bit_replicated_and_fsdp2(hub, world):
    cache, snapshot, ref = hub
    want = {k: _raw(v) for k, v in ref.items()}
    results = run_world(_child, world, str(snapshot), timeout=HEAVY, env={"HF_HUB_CACHE": str(cache)})
    for r, got in enumerate(results):
        assert got["by_snapshot"] == want, f"rank {r}: by snapshot"
        assert got["by_repo_id"] == want, f"rank {r}: by repo id"
        assert got["by_revision"] == want, f"rank {r}: by repo id at its commit"
        phase, msg = got["bad_revision"]  # every rank, in the plan phase, naming the revision
        assert phase == "plan" and "revision 'no-such-branch'" in msg, msg
        model = got["model"]
        assert got["tied"] and model["lm_head.weight"] == want["model.embed_tokens.weight"]
        assert {k: v for k, v in model.items() if k != "lm_head.weight"} == want
        assert {k: v for k, v in got["fsdp"].items() if k != "lm_head.weight"} == want, f"rank {r}: FSDP2"
        phase, msg = got["uncached"]
        assert phase == "plan" and "org/not-downloaded is not in the local Hugging Face cache" in msg and "(nor a local path)" in msg
        assert "hf download org/not-downloaded" in msg
    assert sorted(f for res in results for f in res["files"]) == sorted(p.name for p in snapshot.glob("*.safetensors"))


def test_the_cli_loads_a_repo_id_from_the_cache(hub, tmp_path):
    cache, _, ref = hub
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "distload.load", REPO, "--revision", "main", "--model", "hf",
                           "--report", str(tmp_path / "r.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HEAVY, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["total_bytes"] == sum(v.numel() * v.element_size() for v in ref.values())
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    proc = subprocess.run([sys.executable, "-m", "distload.load", "org/not-downloaded", "--model", "hf"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HEAVY,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "hf download org/not-downloaded" in proc.stdout + proc.stderr
