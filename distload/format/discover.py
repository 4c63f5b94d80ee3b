"""Finding a checkpoint: what the user named (a directory, a file, an index, a Hub repo id, an
``s3://bucket/prefix``) -> its files.

(any rank, locally) :func:`resolve_checkpoint` turns a path or a repo id in
the local Hugging Face cache into a local path; :func:`find_checkpoint` finds
the index or the single file there; :func:`locate` does the same for local
paths and object storage alike, through the storage seam; :func:`local_root`
and :func:`owner_store` are an owner rank's own view of the same checkpoint.
Pickle checkpoints are refused here, with how to convert them. Nothing is
downloaded and nothing talks to other ranks.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from ..errors import DistLoadError
from ..storage.base import Store, is_object_uri, open_store
from ..storage.files import LocalStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PICKLE_HELP = (
    "distload refuses pickle checkpoints ({what}): unpickling runs arbitrary code "
    "from the file. Convert it once in a trusted environment, e.g. "
    "`transformers.AutoModel.from_pretrained(src).save_pretrained(dst, safe_serialization=True)` "
    "or `safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`."
)


def resolve_checkpoint(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path | str:
    """(any rank, locally) The local path for what the user named: a path, or a Hub repo id.

    An ``s3://bucket/prefix`` comes back unchanged: it is never a local path.

    A path that exists here is returned as is. Otherwise ``org/name`` is
    looked up in this machine's Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), at ``revision``
    (a branch, tag or commit; default ``main``), and its snapshot directory is
    returned. Nothing is ever downloaded: a repo that is not cached is a
    :class:`DistLoadError` saying how to download it. Example::

        root = distload.resolve_checkpoint("meta-llama/Llama-3.1-8B")
        # ~/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/<commit>
    """
    if is_object_uri(path_or_repo):
        if revision is not None:
            raise DistLoadError(f"revision={revision!r} needs a Hub repo id (org/name), not {path_or_repo!r}")
        return str(path_or_repo)
    p = Path(path_or_repo)
    try:
        if revision is None and p.exists():
            return p
    except (OSError, ValueError) as e:  # permissions, NUL bytes, over-long names
        raise DistLoadError(f"cannot inspect checkpoint path {p}: {e}") from e
    text = os.fspath(path_or_repo)
    if not _REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        if revision is not None:
            raise DistLoadError(f"revision={revision!r} needs a Hub repo id (org/name), not the path {text!r}")
        raise DistLoadError(f"checkpoint path does not exist: {p}")
    return _from_hub_cache(text, revision)


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder, read from the environment now (as huggingface_hub does at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HUB_CACHE"])))
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(env["HUGGINGFACE_HUB_CACHE"])))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


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
    try:
        snap = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception as e:  # not cached, an incomplete snapshot, a bad revision
        where = repo_id + (f" at revision {revision!r}" if revision else "")
        # huggingface_hub's own "not found" text suggests local_files_only=False, which is not ours to offer
        why = "" if type(e).__name__ == "LocalEntryNotFoundError" else f" ({type(e).__name__}: {e})"
        raise DistLoadError(f"{where} is not in the local Hugging Face cache {cache}"
                            + (" (nor a local path)" if revision is None else "") + f"{why}; {how}") from None
    return Path(snap)


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
        raise DistLoadError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        name = p.name
        if name.endswith(".bin.index.json") or name.endswith(PICKLE_SUFFIXES):
            raise DistLoadError(PICKLE_HELP.format(what=p))
        if name.endswith(".index.json"):
            return p.parent, p, []
        if name.endswith(".safetensors"):
            return p.parent, None, [name]
        raise DistLoadError(f"not a safetensors checkpoint (expected .safetensors or .index.json): {p}")
    if not p.is_dir():
        raise DistLoadError(f"checkpoint path is neither a file nor a directory: {p}")
    index, single = pick_files(sorted(x.name for x in p.iterdir()), p, is_file=lambda n: (p / n).is_file())
    return p, (p / index if index is not None else None), single


def pick_files(names: list[str], where: object, is_file=lambda name: True) -> tuple[str | None, list[str]]:
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
        raise DistLoadError(PICKLE_HELP.format(what=", ".join(pickles)))
    raise DistLoadError(f"no safetensors checkpoint in {where}: looked for model.safetensors.index.json, "
                        "*.safetensors.index.json, model.safetensors and *.safetensors")


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
                raise DistLoadError(PICKLE_HELP.format(what=uri))
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
