"""The save's commit: a save either replaces the checkpoint, keeping every other file of the folder, or
leaves the folder exactly as it was, and its error says which. Failures are injected from outside
distload: through ``os.rename``, ``os.replace``, ``shutil.move``, ``os.link``, ``os.fsync`` and libc's
``renameat2`` (as NFS answers it)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import distload
from dist import run_world
from distload.saver import save_checkpoint

USER_FILES = {"tokenizer.json": b'{"model": "bpe"}', "tokenizer_config.json": b'{"pad": 0}',
              "README.md": b"# my model\n"}


class Small(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(64, 32, generator=g))
        self.b = nn.Parameter(torch.randn(48, generator=g))
        self.c = nn.Parameter(torch.randn(16, 16, generator=g))


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: a file's bytes, a symlink's destination, a directory marker."""
    out: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / name)))
    return out


def assert_holds(folder: Path, model: nn.Module) -> None:
    got = weights(folder)
    want = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, dict]:
    """A folder with a checkpoint of Small(0), the user's files and a sub-folder; its snapshot."""
    root = tmp_path / "root"
    root.mkdir()
    folder = root / "ckpt"
    save_checkpoint(Small(0), folder, max_shard_size="4KB")
    for name, data in USER_FILES.items():
        (folder / name).write_bytes(data)
    (folder / "runs").mkdir()
    (folder / "runs" / "events.log").write_bytes(b"step 1\n")
    return root, folder, snapshot(folder)


def _failing(monkeypatch, names: set[str], *, link: bool) -> None:
    """Every rename-like call (and ``os.link`` if asked) that touches one of ``names`` fails with EACCES."""
    def hits(*paths) -> bool:
        return any(os.path.basename(os.fspath(p)) in names for p in paths if isinstance(p, (str, os.PathLike)))

    def wrap(real):
        def call(src, dst, *a, **kw):
            if hits(src, dst):
                raise PermissionError(errno.EACCES, "Permission denied (injected)", os.fspath(src))
            return real(src, dst, *a, **kw)
        return call

    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(shutil, "move", wrap(shutil.move))
    if link:
        monkeypatch.setattr(os, "link", wrap(os.link))


def test_a_save_that_cannot_bring_a_kept_file_along_leaves_the_folder_exactly_as_it_was(saved, monkeypatch):
    root, folder, before = saved
    _failing(monkeypatch, {"tokenizer_config.json"}, link=True)
    with pytest.raises(distload.DistLoadError) as info:
        save_checkpoint(Small(1), folder, max_shard_size="4KB", dtype=torch.bfloat16)
    monkeypatch.undo()
    text = info.value.one_line()
    assert "is unchanged" in text and "Permission denied (injected)" in text, text
    assert snapshot(folder) == before, "the previous checkpoint and every file must be as they were"
    assert sorted(os.listdir(root)) == ["ckpt"], "nothing stray beside the folder"


def test_a_save_keeps_user_files_even_when_renaming_them_would_fail(saved, monkeypatch):
    """The issue's reproduction: renames of tokenizer_config.json fail. Kept files are linked, not moved."""
    root, folder, before = saved
    _failing(monkeypatch, {"tokenizer_config.json"}, link=False)
    new = Small(1)
    save_checkpoint(new, folder, max_shard_size="4KB")
    monkeypatch.undo()
    assert_holds(folder, new)
    after = snapshot(folder)
    for name in [*USER_FILES, "runs", "runs/events.log"]:
        assert after[name] == before[name], name
    assert sorted(os.listdir(root)) == ["ckpt"]


def test_kept_files_are_moved_and_moved_back_where_hard_links_fail(saved, monkeypatch):
    """A filesystem without hard links: kept files are renamed in, and renamed back when a later one fails."""
    root, folder, before = saved

    def no_link(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted (injected)")

    monkeypatch.setattr(os, "link", no_link)
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
        if os.path.basename(os.fspath(src)) == "tokenizer_config.json":
            raise PermissionError(errno.EACCES, "Permission denied (injected)")
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(distload.DistLoadError, match="is unchanged"):
        save_checkpoint(Small(1), folder, max_shard_size="4KB")
    monkeypatch.setattr(os, "rename", real_rename)
    assert snapshot(folder) == before
    assert sorted(os.listdir(root)) == ["ckpt"]
    new = Small(2)
    save_checkpoint(new, folder, max_shard_size="4KB")  # without hard links, moving works too
    monkeypatch.undo()
    assert_holds(folder, new)
    after = snapshot(folder)
    assert all(after[n] == before[n] for n in [*USER_FILES, "runs/events.log"])
    assert sorted(os.listdir(root)) == ["ckpt"]


def test_a_failure_after_the_swap_says_the_new_checkpoint_is_in_place(saved, monkeypatch):
    """fsync of the parent fails after the exchange: the folder holds the new checkpoint, and the error says so."""
    root, folder, before = saved
    real = os.fsync

    def fsync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(root):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    new = Small(1)
    with pytest.raises(distload.DistLoadError) as info:
        save_checkpoint(new, folder, max_shard_size="4KB")
    monkeypatch.undo()
    assert "holds the new checkpoint, complete" in info.value.one_line()
    assert_holds(folder, new)
    after = snapshot(folder)
    assert all(after[n] == before[n] for n in [*USER_FILES, "runs/events.log"])
    assert sorted(os.listdir(root)) == ["ckpt"]


def test_saving_to_a_symlink_writes_into_the_folder_it_points_to(tmp_path):
    step1, step0 = tmp_path / "step1", tmp_path / "step0"
    save_checkpoint(Small(0), step0, max_shard_size="4KB")
    save_checkpoint(Small(0), step1, max_shard_size="4KB")
    for name, data in USER_FILES.items():
        (step1 / name).write_bytes(data)
    (tmp_path / "latest").symlink_to("step1")
    before0, before1 = snapshot(step0), snapshot(step1)
    new = Small(1)
    save_checkpoint(new, tmp_path / "latest", max_shard_size="4KB")
    assert os.readlink(tmp_path / "latest") == "step1", "the link stays a link, to the same folder"
    assert_holds(step1, new)
    after = snapshot(step1)
    assert all(after[n] == before1[n] for n in USER_FILES), "the folder's own files are kept"
    assert snapshot(step0) == before0, "nothing is taken from any other folder"
    assert sorted(os.listdir(tmp_path)) == ["latest", "step0", "step1"], "nothing stray"


def test_saving_to_a_dangling_symlink_creates_the_folder_it_names(tmp_path):
    (tmp_path / "latest").symlink_to("step2")
    new = Small(1)
    save_checkpoint(new, tmp_path / "latest", max_shard_size="4KB")
    assert os.readlink(tmp_path / "latest") == "step2"
    assert_holds(tmp_path / "step2", new)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step2"]


class _NoExchange:
    """libc as NFS presents it: ``renameat2(RENAME_EXCHANGE)`` answers EINVAL."""

    def __init__(self, *a, **kw):
        def renameat2(*args):
            ctypes.set_errno(errno.EINVAL)
            return -1

        self.renameat2 = renameat2


@pytest.fixture
def nfs(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", _NoExchange)


def test_without_an_exchange_two_renames_replace_the_checkpoint_keeping_every_file(saved, nfs):
    root, folder, before = saved
    new = Small(1)
    save_checkpoint(new, folder, max_shard_size="4KB")
    assert_holds(folder, new)
    after = snapshot(folder)
    assert all(after[n] == before[n] for n in [*USER_FILES, "runs", "runs/events.log"])
    assert sorted(os.listdir(root)) == ["ckpt"]


def _stage_renames_fail(monkeypatch, *, restore_fails: bool) -> None:
    """Moving the staging folder into place fails (and, if asked, so does moving the previous one back)."""
    real = os.rename

    def rename(src, dst, *a, **kw):
        s = os.path.basename(os.fspath(src))
        if ".distload-" in s and not s.endswith(".old") and os.path.basename(os.fspath(dst)) == "ckpt":
            raise OSError(errno.EIO, "Input/output error (injected: stage -> target)")
        if restore_fails and s.endswith(".old"):
            raise OSError(errno.EIO, "Input/output error (injected: previous -> target)")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)


def test_without_an_exchange_a_failed_move_puts_the_previous_checkpoint_back(saved, nfs, monkeypatch):
    root, folder, before = saved
    _stage_renames_fail(monkeypatch, restore_fails=False)
    with pytest.raises(distload.DistLoadError) as info:
        save_checkpoint(Small(1), folder, max_shard_size="4KB")
    assert "is unchanged" in info.value.one_line()
    assert snapshot(folder) == before
    assert sorted(os.listdir(root)) == ["ckpt"]


def test_without_an_exchange_no_copy_is_deleted_and_the_error_names_where_each_is(saved, nfs, monkeypatch):
    root, folder, before = saved
    _stage_renames_fail(monkeypatch, restore_fails=True)
    new = Small(1)
    with pytest.raises(distload.DistLoadError) as info:
        save_checkpoint(new, folder, max_shard_size="4KB")
    monkeypatch.undo()
    text = info.value.one_line()
    assert "does not exist now" in text, text
    assert not folder.exists()
    old = [p for p in root.iterdir() if p.name.endswith(".old")]
    stage = [p for p in root.iterdir() if p.name.startswith(".ckpt.distload-") and not p.name.endswith(".old")]
    assert len(old) == 1 and len(stage) == 1, os.listdir(root)
    assert str(old[0]) in text and str(stage[0]) in text
    # The previous checkpoint is whole with every file, but the sub-folder, which moved (a directory
    # cannot be linked) and is now with the new one, as the error says.
    assert "runs moved to the new one" in text
    assert snapshot(old[0]) == {k: v for k, v in before.items() if not k.startswith("runs")}
    assert_holds(stage[0], new)
    staged = snapshot(stage[0])
    assert all(staged[n] == before[n] for n in [*USER_FILES, "runs", "runs/events.log"])


# ---- a peer dies after every file is written --------------------------------------------------------


def _dies_before_commit_agreement(rank: int, world: int, out: str) -> dict:
    """Every rank saves twice; in the second save, the last rank dies once its files are written."""
    import distload.transport.comm as comm_mod

    torch.manual_seed(0)
    save_checkpoint(Small(0), out, max_shard_size="4KB")
    if rank == world - 1:
        real = comm_mod.Comm.agree

        def agree(self, phase, error):
            if phase == "commit":
                os._exit(17)  # dies between "written" and "committed"
            return real(self, phase, error)

        comm_mod.Comm.agree = agree
    try:
        save_checkpoint(Small(1), out, max_shard_size="4KB", timeout_s=60)
        return {"ok": True}
    except distload.DistLoadError as e:
        return {"ok": False, "text": e.one_line(), "phase": e.phase}


def test_a_peer_dying_between_written_and_committed_is_reported_truthfully(tmp_path):
    out = tmp_path / "ckpt"
    results = run_world(_dies_before_commit_agreement, 3, str(out), timeout=150, expect_errors=True)
    assert results[2][0] == "error" and "exited with code 17" in results[2][1]
    rank0, rank1 = results[0][1], results[1][1]
    assert results[0][0] == "ok" and not rank0["ok"], results[0]
    assert f"{out} holds the new checkpoint, complete" in rank0["text"], rank0
    assert results[1][0] == "ok" and not rank1["ok"], results[1]
    assert str(out) in rank1["text"] and ("holds the new checkpoint" in rank1["text"]
                                          or "holds either the previous checkpoint or the new" in rank1["text"]), rank1
    assert_holds(out, Small(1))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
