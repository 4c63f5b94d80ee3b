"""Finding a checkpoint: what the user named (a directory, a file, an index, a Hub repo id, an
``s3://bucket/prefix``) -> its files.

(any rank, locally) :func:`resolve_checkpoint` turns a path or a repo id in
the local Hugging Face cache into a local path; :func:`find_checkpoint` finds
the index or the single file there; :func:`locate` does the same for local
paths and object storage alike, through the storage seam; :func:`local_root`
and :func:`owner_store` are an owner rank's own view of the same checkpoint.
Pickle checkpoints are refused here, with the command that converts them.
Nothing is downloaded and nothing talks to other ranks.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import shlex
import socket
from pathlib import Path

from ..errors import DistLoadError
from ..storage.base import Store, is_object_uri, open_store
from ..storage.files import LocalStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def expand_path(path: str | os.PathLike) -> Path:
    """(any rank, locally) ``path`` with ``~``, ``~user``, ``$VAR`` and ``${VAR}`` expanded.

    Expanded as the shell expands an unquoted argument, with this process's
    own home directory and environment (so each rank of a job expands on its
    own node). A variable that is not set stays as written, as with
    :func:`os.path.expandvars`; messages about a path that does not exist
    then name it.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.startswith("~") and "$" not in text:
        return Path(text)
    return Path(os.path.expandvars(os.path.expanduser(text)))


def unset_variables(text: str) -> list[str]:
    """The ``$VAR`` / ``${VAR}`` names in ``text`` that this environment does not set."""
    return [m.group(1) or m.group(2) for m in _VAR.finditer(text) if (m.group(1) or m.group(2)) not in os.environ]


_VAR = re.compile(r"\$(?:(\w+)|\{([^}]*)\})")


def resolve_checkpoint(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path | str:
    """(any rank, locally) The local path for what the user named: a path, or a Hub repo id.

    An ``s3://bucket/prefix`` comes back unchanged: it is never a local path.

    ``~`` and ``$VARS`` are expanded first (:func:`expand_path`). A path that
    exists here is returned as is. Otherwise ``org/name`` is looked up in this
    machine's Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``), at ``revision`` (a branch, a tag, a commit
    or a unique prefix of a cached commit of at least 4 hex digits; default
    ``main``), and its snapshot directory is returned. Nothing is ever
    downloaded: a repo that is not cached is a :class:`DistLoadError` saying
    how to download it; a path that does not exist is one naming the nearest
    entries of the folder it should be in. Example::

        root = distload.resolve_checkpoint("Qwen/Qwen3-0.6B")
        # ~/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/<commit>
    """
    if is_object_uri(path_or_repo):
        if revision is not None:
            raise DistLoadError(f"revision={revision!r} needs a Hub repo id (org/name), not {path_or_repo!r}")
        return str(path_or_repo)
    text = os.fspath(path_or_repo)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    p = expand_path(text)
    try:
        if revision is None and p.exists():
            return p
        # "ckpts/tiny-qwn" where ckpts/ is a folder here is a mistyped path, not a repo id
        local_first = bool(_REPO_ID.fullmatch(text)) and Path(text.split("/")[0]).is_dir()
    except (OSError, ValueError) as e:  # permissions, NUL bytes, over-long names
        raise DistLoadError(f"cannot inspect checkpoint path {p}: {e}") from e
    repo_shaped = bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text
    if not repo_shaped:
        if revision is not None:
            raise DistLoadError(f"revision={revision!r} needs a Hub repo id (org/name), not the path {text!r}")
        raise DistLoadError(missing_path_message(text, p))
    if local_first:
        try:
            return _from_hub_cache(text, revision)
        except DistLoadError:  # not a cached repo either: the path is what was meant
            pass
        if revision is not None:
            raise DistLoadError(f"{text} is neither a cached Hub repo id at revision {revision!r} nor a local "
                                f"path: {missing_path_message(text, p)}")
        raise DistLoadError(missing_path_message(text, p) + "; nor is it a Hub repo id in the local cache")
    return _from_hub_cache(text, revision)


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_COMMIT_PREFIX = re.compile(r"[0-9a-f]{4,39}")


def missing_path_message(text: str, p: Path) -> str:
    """``checkpoint path does not exist: X``, naming the deepest folder of ``X`` that exists and
    its entries nearest to the next part of ``X`` (a typo), or the unset ``$VAR`` in ``X``."""
    msg = f"checkpoint path does not exist: {text}"
    if str(p) != text:
        msg += f" (expanded: {p})"
    unset = unset_variables(text)
    if unset:
        return msg + f"; ${unset[0]} is not set in this environment"
    base, want = p.parent, p.name
    try:
        while not base.is_dir() and base != base.parent:
            base, want = base.parent, base.name
        if not base.is_dir():
            return msg
        names = [e.name for e in itertools.islice(os.scandir(base), 100_000)]
    except (OSError, ValueError):
        return msg
    where = "the current directory" if str(base) == "." else f"{base}/"
    close = difflib.get_close_matches(want, names, n=3, cutoff=0.6)
    return msg + f"; {where} has no {want!r}" + (f", nearest: {', '.join(close)}" if close else "")


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder, read from the environment now (as huggingface_hub does at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return expand_path(env["HF_HUB_CACHE"])
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return expand_path(env["HUGGINGFACE_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return expand_path(home) / "hub"


def _from_hub_cache(repo_id: str, revision: str | None) -> Path:
    cache = hub_cache_dir()
    rev = f" --revision {revision}" if revision else ""
    how = (f"distload never downloads: download it first, once per node or onto shared storage, with "
           f"`hf download {repo_id}{rev}` (older huggingface_hub: `huggingface-cli download {repo_id}{rev}`) "
           "and the same HF_HUB_CACHE")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DistLoadError(f"{repo_id!r} is not a local path, and loading a Hub repo id from the cache "
                            "needs huggingface_hub (pip install huggingface_hub)") from None

    def snapshot(rev: str | None) -> str:
        return snapshot_download(repo_id, revision=rev, cache_dir=str(cache), local_files_only=True)

    try:
        return Path(snapshot(revision))
    except Exception as e:  # not cached, an incomplete snapshot, a bad revision
        error = e
    if revision is not None and _COMMIT_PREFIX.fullmatch(revision):  # a short commit hash, as git users type
        found = _cached_commits(cache, repo_id, revision)
        if len(found) > 1:
            raise DistLoadError(f"revision {revision!r} of {repo_id} is ambiguous: {len(found)} cached commits "
                                f"start with it ({', '.join(found)}); give more of the hash") from None
        if found:
            try:
                return Path(snapshot(found[0]))
            except Exception as e:
                error = e
    where = repo_id + (f" at revision {revision!r}" if revision else "")
    # huggingface_hub's own "not found" text suggests local_files_only=False, which is not ours to offer
    why = "" if type(error).__name__ == "LocalEntryNotFoundError" else f" ({type(error).__name__}: {error})"
    raise DistLoadError(f"{where} is not in the local Hugging Face cache {cache}"
                        + (" (nor a local path)" if revision is None else "") + f"{why}; {how}") from None


def _cached_commits(cache: Path, repo_id: str, prefix: str) -> list[str]:
    """The cached snapshot commits of ``repo_id`` that start with ``prefix``."""
    from huggingface_hub.file_download import repo_folder_name

    snaps = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    try:
        return sorted(e.name for e in os.scandir(snaps) if e.name.startswith(prefix) and e.is_dir())
    except OSError:
        return []


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None, list[str]]:
    """Resolve what the user pointed at into ``(root_dir, index_file, files)``.

    ``files`` is filled only when there is no index (single-file checkpoints).
    Accepts a directory, a ``.safetensors`` file, a ``*.safetensors.index.json``,
    or a Hub repo id in the local cache (see :func:`resolve_checkpoint`).
    """
    p = resolve_checkpoint(path)
    try:
        return _find_checkpoint(p)
    except (OSError, ValueError) as e:  # permissions, NUL bytes, over-long names
        raise DistLoadError(f"cannot inspect checkpoint path {p}: {e}") from e


def _find_checkpoint(p: Path) -> tuple[Path, Path | None, list[str]]:
    if not p.exists():
        raise DistLoadError(missing_path_message(str(p), p))
    if p.is_file():
        name = p.name
        if name.endswith(".bin.index.json") or name.endswith(PICKLE_SUFFIXES):
            raise DistLoadError(pickle_help(p.parent, [name]))
        if name.endswith(".index.json"):
            return p.parent, p, []
        if name.endswith(".safetensors"):
            return p.parent, None, [name]
        raise DistLoadError(f"not a safetensors checkpoint (expected .safetensors or .index.json): {p}")
    if not p.is_dir():
        raise DistLoadError(f"checkpoint path is neither a file nor a directory: {p}")
    index, single = pick_files(sorted(x.name for x in p.iterdir()), p, is_file=lambda n: (p / n).is_file())
    return p, (p / index if index is not None else None), single


def pick_files(names: list[str], where: Path | str, is_file=lambda name: True) -> tuple[str | None, list[str]]:
    """Choose what to load among the names in one directory or prefix: ``(index, [])`` or ``(None, [file])``.

    ``model.safetensors.index.json``, else the only ``*.safetensors.index.json``,
    else ``model.safetensors``, else the only ``*.safetensors``. ``is_file``
    tells a file from a directory of that name (every object is a file).
    """
    if "model.safetensors.index.json" in names and is_file("model.safetensors.index.json"):
        return "model.safetensors.index.json", []
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return indexes[0], []
    if len(indexes) > 1:
        raise DistLoadError(f"several index files in {where}: {indexes}; pass the one to load")
    if "model.safetensors" in names and is_file("model.safetensors"):
        return None, ["model.safetensors"]
    singles = [n for n in names if n.endswith(".safetensors")]
    if len(singles) == 1:
        return None, singles
    if len(singles) > 1:
        raise DistLoadError(f"{len(singles)} .safetensors files in {where} but no *.safetensors.index.json to "
                            "join them")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES + (".bin.index.json",))]
    if pickles:
        raise DistLoadError(pickle_help(where, pickles))
    raise DistLoadError(f"no safetensors checkpoint in {where}: looked for model.safetensors.index.json, "
                        "*.safetensors.index.json, model.safetensors and *.safetensors")


def pickle_help(root: Path | str, pickles: list[str]) -> str:
    """Why a pickle checkpoint is refused, and the one command that converts it.

    With a ``config.json`` naming the model class, the recipe loads the
    checkpoint with that class and saves it with ``save_pretrained``: tied
    weights are stored once and every head (``lm_head``) is kept, which
    ``AutoModel`` (the base model) and ``safetensors.torch.save_file``
    (which refuses tensors that share memory) do not do. Without one, it
    saves the state dict of the one pickle file with the shared tensors copied.
    """
    what = ", ".join(pickles)
    head = (f"distload refuses pickle checkpoints ({what} in {root}): unpickling runs arbitrary code from the "
            "file. Convert it once, in an environment that trusts the file")
    arch = _config_architecture(root) if isinstance(root, Path) else None
    hf_weights = any(n.startswith("pytorch_model") for n in pickles)
    if arch is not None and hf_weights:
        dst = f"{root}-safetensors"
        code = (f"import transformers; transformers.{arch}.from_pretrained({json.dumps(str(root))}, "
                f'torch_dtype="auto").save_pretrained({json.dumps(dst)}, safe_serialization=True)')
        return (f"{head}, with the class config.json names (keeps tied weights and every head): "
                f"python -c {shlex.quote(code)} ; then load {dst}")
    weights = [n for n in pickles if not n.endswith(".index.json")]
    if len(weights) == 1 and isinstance(root, Path):
        src = root / weights[0]
        out = root / ("model.safetensors" if weights[0].startswith("pytorch_model")
                      else Path(weights[0]).stem + ".safetensors")
        code = (f"import torch, safetensors.torch as st; sd = torch.load({json.dumps(str(src))}, weights_only=True); "
                f"st.save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {json.dumps(str(out))})")
        return f"{head} (tensors that share memory are copied): python -c {shlex.quote(code)} ; then load {root}"
    return (f"{head}: load it with the model class it was saved from and call "
            "save_pretrained(dst, safe_serialization=True), then load dst")


def _config_architecture(root: Path) -> str | None:
    """``architectures[0]`` of ``root/config.json``, if it names a class (read as data, never imported)."""
    try:
        archs = json.loads((root / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    name = archs[0] if isinstance(archs, list) and archs else None
    return name if isinstance(name, str) and name.isidentifier() else None


def locate(path: str | os.PathLike) -> tuple[Store, str | None, list[str]]:
    """(coordinator) ``(store, index name or None, [single file] or [])`` for what the user named.

    Local paths resolve as :func:`find_checkpoint` does. ``s3://bucket/prefix``
    is a prefix (its objects are listed, never read) unless it names an object
    ending in ``.safetensors`` or ``.index.json``, which is then the file to load.
    """
    if not is_object_uri(path):
        root, index, single = find_checkpoint(path)
        return LocalStore(root), (index.name if index is not None else None), single
    uri = str(path).rstrip("/")
    parent, _, base = uri.rpartition("/")
    if base.endswith((".safetensors", ".index.json") + PICKLE_SUFFIXES) and parent not in ("s3:/", "s3:"):
        store = open_store(parent)
        if base in store.names():
            if base.endswith(".bin.index.json") or base.endswith(PICKLE_SUFFIXES):
                raise DistLoadError(pickle_help(parent, [base]))
            if base.endswith(".index.json"):
                return store, base, []
            if base.endswith(".safetensors"):
                return store, None, [base]
    store = open_store(uri)
    names = store.names()
    if not names:
        raise DistLoadError(f"checkpoint path does not exist: {uri} (no objects under that prefix)")
    index, single = pick_files(names, uri)
    return store, index, single


def owner_store(path: str | os.PathLike, planned: str) -> Store:
    """(owner ranks) This rank's store for the checkpoint rank 0 planned at ``planned``.

    Object storage looks the same from every node: the planned prefix. A local
    checkpoint is this rank's own view of ``path`` (see :func:`local_root`).
    """
    if is_object_uri(planned):
        return open_store(planned)
    return LocalStore(local_root(path))


def local_root(path: str | os.PathLike) -> Path:
    """(owner ranks) This rank's checkpoint directory for the path the user passed.

    Each owner opens its files under its own view of ``path`` (node-local
    storage, per-node mounts, relative paths, its own Hugging Face cache for
    a repo id), not rank 0's; a path missing here is a clear error naming
    this host.
    """
    try:
        p = resolve_checkpoint(path)
    except DistLoadError as e:
        raise DistLoadError(f"on {socket.gethostname()}: {e}") from e.__cause__
    try:
        if p.is_dir():
            return p
        if p.exists():
            return p.parent
    except (OSError, ValueError) as e:
        raise DistLoadError(f"cannot inspect checkpoint path {p} on {socket.gethostname()}: {e}") from e
    raise DistLoadError(f"checkpoint path {p} does not exist on {socket.gethostname()}")
