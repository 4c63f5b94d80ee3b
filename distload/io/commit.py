"""Committing a staged save into a local or network-mounted directory, and saying what a failure left.

(rank 0, once every rank's files are complete) :func:`commit_directory` makes
the staging directory the target directory. It either succeeds or raises a
:class:`CommitError` whose ``state`` says what the target holds now:

- ``previous``: the target is as it was before the save, its checkpoint and
  every other file in it; the new checkpoint was discarded.
- ``new``: the target holds the new checkpoint, complete, with the other
  files the folder held; a step after the swap failed (making it durable).
- ``split``: only where the filesystem has no atomic exchange: the target
  does not exist, and both checkpoints exist whole at the paths the message
  names. Nothing was deleted.

Note on the protocol:
    1. Entries of the target that the save does not replace (a tokenizer, a
       README, a folder; see :func:`replaced_names`) are brought into the
       staging directory first: files and symlinks as hard links, so the
       target does not change at all; directories, and files that cannot be
       linked (a filesystem without hard links, or a file the user may not
       link), by ``rename``, which is undone if a later step fails.
    2. One ``renameat2(RENAME_EXCHANGE)`` swaps the two directories: the one
       moment the target changes, atomically (local ext4, xfs, btrfs, tmpfs).
       Where the kernel or filesystem lacks it (NFS, Lustre, most FUSE
       filesystems answer ``EINVAL``), two renames follow each other with
       nothing in between: target -> a hidden ``.NAME.distload-TOKEN.old``
       beside it, then stage -> target. The target is missing between those
       two calls; if the second fails, the first is undone.
    3. The parent directory is fsynced, then the previous checkpoint (now at
       the staging path or the ``.old`` one, holding only its own weights and
       hard links to the kept files) is removed.

    No step deletes the only copy of either checkpoint or of a user's file.

A second backend (object storage: data objects first, the index last) has its
own commit that raises :class:`CommitError` with the same states; it shares no
code path with this one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

PREVIOUS, NEW, SPLIT = "previous", "new", "split"

# What a save replaces in an existing target (as save_pretrained overwrites or cleans them up);
# everything else there is kept. The previous index's own shard names are replaced too.
_REPLACED = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                       r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json|"
                       r"config\.json|generation_config\.json")
_INDEX = "model.safetensors.index.json"


class CommitError(Exception):
    """A commit that did not complete. ``state`` is ``previous``, ``new`` or ``split`` (see the module doc);
    the message says where each copy is."""

    def __init__(self, message: str, state: str):
        super().__init__(message)
        self.state = state

    def __reduce__(self):
        return (CommitError, (str(self), self.state))


def resolve_target(path: str | os.PathLike) -> Path:
    """The directory a save writes: ``path`` with every symlink resolved.

    Saving to ``latest -> step1`` writes into ``step1`` (a dangling link's
    destination is created), and ``latest`` stays the link it was. The
    staging directory goes beside the resolved folder, on its filesystem.
    """
    return Path(os.path.realpath(os.path.abspath(path)))


def trash_dir(stage: Path) -> Path:
    """Where the two-rename fallback parks the previous checkpoint while the new one moves in."""
    return stage.with_name(stage.name + ".old")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replaced_names(target: Path, entries: list[str]) -> set[str]:
    """The entries of ``target`` that belong to its checkpoint: weights, their index, the configs,
    and every file the previous index names."""
    out = {e for e in entries if _REPLACED.fullmatch(e)}
    try:
        weight_map = json.loads((target / _INDEX).read_text()).get("weight_map", {})
        named = {v for v in weight_map.values() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError):  # no index, or not one we can read: nothing more
        named = set()
    return out | {e for e in entries if e in named}


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the kernel or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _bring_kept(stage: Path, target: Path, moved: list[str]) -> None:
    """Put every entry of ``target`` that the save keeps into ``stage``: linked, else moved (listed in ``moved``)."""
    entries = sorted(os.listdir(target))
    replaced = replaced_names(target, entries)
    for entry in entries:
        if entry in replaced or os.path.lexists(stage / entry):
            continue
        src, dst = target / entry, stage / entry
        if not src.is_dir() or src.is_symlink():
            try:
                os.link(src, dst, follow_symlinks=False)
                continue
            except OSError:
                pass  # no hard links here, or not allowed for this file: move it instead
        os.rename(src, dst)
        moved.append(entry)


def _put_back(stage: Path, target: Path, moved: list[str]) -> list[str]:
    """Undo :func:`_bring_kept`'s moves; the entries that could not be moved back."""
    stuck = []
    for entry in reversed(moved):
        try:
            os.rename(stage / entry, target / entry)
        except Exception:
            stuck.append(entry)
    return sorted(stuck)


def _remove(path: Path) -> str | None:
    """Remove a directory tree; a warning naming what is left if that failed."""
    errors: list[str] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, e: errors.append(f"{p}: {e}"))
    else:
        shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(f"{p}: {info[1]}"))
    if errors and os.path.lexists(path):
        return f"could not remove the previous checkpoint's folder {path}: {errors[0]}"
    return None


def _discard(stage: Path, target: Path, moved: list[str], why: BaseException) -> CommitError:
    """(before the swap) Restore the target exactly, remove the stage; the error to raise."""
    stuck = _put_back(stage, target, moved)
    if stuck:  # the stage now holds a user's file: keep it, and say where
        return CommitError(
            f"{target} still holds the previous checkpoint, but {', '.join(stuck)} could not be moved back "
            f"from {stage} (move them back to {target}; the new checkpoint in {stage} was not committed): "
            f"{_what(why)}", PREVIOUS)
    _remove(stage)
    return CommitError(f"{target} is unchanged (the previous checkpoint and every file in it); "
                       f"the new checkpoint was discarded: {_what(why)}", PREVIOUS)


def _what(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def commit_directory(stage: Path, target: Path) -> list[str]:
    """(rank 0, after every rank's files are complete) Make ``stage`` the directory ``target``.

    ``target`` is resolved (:func:`resolve_target`) and ``stage`` is beside it.
    Takes over ``stage``: whatever happens, this function decides what is
    removed. Returns warnings (a previous checkpoint's folder that could not
    be removed); raises :class:`CommitError` saying what the target holds.
    """
    if not os.path.lexists(target):
        try:
            fsync_dir(stage)
            os.rename(stage, target)
        except Exception as e:
            _remove(stage)
            raise CommitError(f"nothing was written at {target}: {_what(e)}", PREVIOUS) from e
        _durable(target, None)
        return []
    moved: list[str] = []
    try:
        if not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{target} exists and is not a directory")
        _bring_kept(stage, target, moved)
        fsync_dir(stage)
        exchanged = _exchange(stage, target)
    except Exception as e:  # before the swap: whatever failed, the target is put back as it was
        raise _discard(stage, target, moved, e) from e
    if exchanged:
        old = stage  # the staging path now holds the previous checkpoint
    else:
        old = trash_dir(stage)
        try:
            os.rename(target, old)
        except Exception as e:
            raise _discard(stage, target, moved, e) from e
        try:
            os.rename(stage, target)
        except Exception as e:  # the target is missing: put the previous checkpoint back
            try:
                os.rename(old, target)
            except Exception as e2:
                raise CommitError(
                    f"{target} does not exist now: the previous checkpoint is whole at {old} and the new one "
                    f"(complete) at {stage}; rename either to {target}. Moving the new one in failed "
                    f"({_what(e)}), and so did moving the previous one back ({_what(e2)})"
                    + (f"; {', '.join(moved)} moved to the new one" if moved else ""), SPLIT) from e
            raise _discard(stage, target, moved, e) from e
    _durable(target, old)
    leftover = _remove(old)
    return [leftover] if leftover else []


def _durable(target: Path, old: Path | None) -> None:
    """(after the swap) fsync the parent, so the swap survives a crash; the target holds the new checkpoint."""
    try:
        fsync_dir(target.parent)
    except Exception as e:
        if old is not None:
            _remove(old)
        raise CommitError(f"{target} holds the new checkpoint, complete, but the swap may not survive a crash: "
                          f"fsync of {target.parent} failed: {_what(e)}", NEW) from e


def stage_identity(stage: Path) -> tuple[int, int] | None:
    """(each rank, before the commit) The staging directory's device and inode, to recognise it later."""
    try:
        st = os.stat(stage)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def observe(target: Path, stage: Path, identity: tuple[int, int] | None) -> str:
    """(a rank that lost contact with rank 0 while it committed) What this rank sees at ``target`` now.

    Rank 0 alone knows how its commit ended; this describes the target as
    this rank's view of the shared filesystem shows it, which a network
    filesystem's cache may delay.
    """
    try:
        st = os.stat(target)
        here = (st.st_dev, st.st_ino)
    except OSError:
        here = None
    if identity is not None and here == identity:
        return f"as this rank sees it, {target} holds the new checkpoint, complete"
    if here is None:
        copies = [f"{what} at {p}" for what, p in (("the previous checkpoint", trash_dir(stage)),
                                                    ("the new one", stage)) if os.path.lexists(p)]
        return (f"as this rank sees it, {target} does not exist; " + (", ".join(copies) if copies else "no copy is "
                "visible from here") + " (rank 0 may still be moving them)")
    return (f"rank 0 was committing when the job broke: {target} holds either the previous checkpoint or the new "
            "one, each complete (as this rank sees it now, still the previous one)")
