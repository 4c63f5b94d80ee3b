"""Checkpoint discovery and safetensors header/index parsing and validation.

Pure and process-local: nothing here talks to other ranks. In a load, only the
coordinator (rank 0) runs :func:`read_checkpoint`; the result travels to the
other ranks inside the plan.

Every check raises :class:`DistLoadError` naming the file (and key) at fault,
so hostile or damaged checkpoints never surface as a ``KeyError`` or a hang.
"""

from __future__ import annotations

import json
import reprlib
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import DTYPES, torch_shape
from ..errors import DistLoadError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces, per file
MAX_INDEX_BYTES = 256 * 1024 * 1024  # real indexes are a few MB even for 1T-parameter models
# Caps across the whole checkpoint, so a hostile index cannot make rank 0 open
# millions of files or hold gigabytes of headers. DeepSeek-V3 (671B) has 163
# files, about 91k tensors and under 20 MB of headers.
MAX_FILES = 65_536
MAX_TENSORS = 2_097_152
MAX_TOTAL_HEADER_BYTES = 512 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Bytes per torch element for every safetensors dtype whose elements are whole
# bytes (F4 counts packed pairs; see distload.dtypes).
DTYPE_SIZES: dict[str, int] = {n: d.itemsize for n, d in DTYPES.items() if d.bits * d.pack % 8 == 0}

_PICKLE_HELP = (
    "distload refuses pickle checkpoints ({what}): unpickling runs arbitrary code "
    "from the file. Convert it once in a trusted environment, e.g. "
    "`transformers.AutoModel.from_pretrained(src).save_pretrained(dst, safe_serialization=True)` "
    "or `safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`."
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one file: byte range relative to the file's data section."""

    name: str
    dtype: str  # as written in the header, e.g. "F8_E4M3"
    shape: tuple[int, ...]  # in torch elements: F4's last dimension counts packed pairs (distload.dtypes)
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardFile:
    """One validated ``.safetensors`` file."""

    name: str  # file name relative to the checkpoint directory
    size: int  # whole file size in bytes
    data_offset: int  # 8 + header length: where tensor bytes begin
    tensors: tuple[TensorEntry, ...]  # sorted by start offset


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its directory, files and tensors."""

    root: str
    files: tuple[ShardFile, ...]
    missing_in_files: tuple[str, ...] = ()  # index keys absent from their file (strict=False only)
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)

    def keys(self) -> list[str]:
        return [t.name for f in self.files for t in f.tensors]


def resolve_checkpoint(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """(any rank, locally) The local path for what the user named: a path, or a Hub repo id.

    A path that exists here is returned as is. Otherwise ``org/name`` is
    looked up in this machine's Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), at ``revision``
    (a branch, tag or commit; default ``main``), and its snapshot directory is
    returned. Nothing is ever downloaded: a repo that is not cached is a
    :class:`DistLoadError` saying how to download it. Example::

        root = distload.resolve_checkpoint("meta-llama/Llama-3.1-8B")
        # ~/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/<commit>
    """
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
        if name.endswith(".bin.index.json") or name.endswith(_PICKLE_SUFFIXES):
            raise DistLoadError(_PICKLE_HELP.format(what=p))
        if name.endswith(".index.json"):
            return p.parent, p, []
        if name.endswith(".safetensors"):
            return p.parent, None, [name]
        raise DistLoadError(f"not a safetensors checkpoint (expected .safetensors or .index.json): {p}")
    if not p.is_dir():
        raise DistLoadError(f"checkpoint path is neither a file nor a directory: {p}")
    default_index = p / "model.safetensors.index.json"
    if default_index.is_file():
        return p, default_index, []
    indexes = sorted(x.name for x in p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return p, p / indexes[0], []
    if len(indexes) > 1:
        raise DistLoadError(f"several index files in {p}: {indexes}; pass the one to load")
    if (p / "model.safetensors").is_file():
        return p, None, ["model.safetensors"]
    singles = sorted(x.name for x in p.glob("*.safetensors"))
    if len(singles) == 1:
        return p, None, singles
    if len(singles) > 1:
        raise DistLoadError(f"{len(singles)} .safetensors files in {p} but no *.safetensors.index.json to join them")
    pickles = sorted(x.name for x in p.iterdir() if x.name.endswith(_PICKLE_SUFFIXES + (".bin.index.json",)))
    if pickles:
        raise DistLoadError(_PICKLE_HELP.format(what=", ".join(pickles)))
    raise DistLoadError(f"no safetensors checkpoint in {p}: looked for model.safetensors.index.json, "
                        "*.safetensors.index.json, model.safetensors and *.safetensors")


def read_index(index_path: Path) -> tuple[dict[str, str], int | None]:
    """Parse an index file into ``(weight_map, total_size or None)``."""
    fd = open_regular(index_path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_INDEX_BYTES:
            raise DistLoadError(f"index {index_path}: {size} bytes exceeds the {MAX_INDEX_BYTES} byte limit")
        raw = _pread_all(fd, size, index_path)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except DistLoadError as e:
        raise DistLoadError(f"index {index_path.name}: {e}") from None
    except UnicodeDecodeError as e:
        raise DistLoadError(f"index {index_path.name} is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise DistLoadError(f"index {index_path.name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise DistLoadError(f"index {index_path.name} has no 'weight_map' object")
    wmap = doc["weight_map"]
    if not wmap:
        raise DistLoadError(f"index {index_path.name} has an empty weight_map")
    for key, fname in wmap.items():
        if not isinstance(fname, str):
            raise DistLoadError(f"index {index_path.name}: weight_map[{key!r}] is not a file name")
        if fname.endswith(_PICKLE_SUFFIXES):
            raise DistLoadError(f"index {index_path.name} maps {key!r} to {fname!r}: "
                                + _PICKLE_HELP.format(what=fname))
    meta = doc.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if isinstance(total, bool) or not isinstance(total, int):
        total = None
    return wmap, total


def check_file_name(root: Path, name: str) -> Path:
    """Refuse names that could read outside ``root`` or block on open.

    Returns the path to open. Runs on rank 0 while planning and again on each
    owner before it opens the file (storage may differ between nodes). To open
    the file, use :func:`open_checked`, which also closes the race between
    this check and the open.
    """
    return _check(root, name)[0]


def _check(root: Path, name: str) -> tuple[Path, os.stat_result]:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or ".." in name:
        raise DistLoadError(f"refusing file name {name!r}: it must be a plain file name inside {root}")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    allowed = [real_root]
    repo = hub_repo_folder(real_root)
    if repo is not None:  # a cache snapshot: its files link to ../../blobs/<hash>
        allowed.append(repo)
    if not any(os.path.commonpath([a, real]) == a for a in allowed):
        inside = real_root if repo is None else f"{real_root} or its Hugging Face cache folder {repo}"
        raise DistLoadError(f"refusing {name}: it resolves to {real}, outside the checkpoint directory {inside}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise DistLoadError(f"missing file {path}") from None
    except OSError as e:
        raise DistLoadError(f"cannot stat {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise DistLoadError(f"{path} is not a regular file (a FIFO, device or directory)")
    return path, st


def hub_repo_folder(real_dir: str) -> str | None:
    """The cache repo folder (``.../models--org--name``) holding ``real_dir`` in a snapshot, else None.

    The Hugging Face cache keeps ``<repo>/snapshots/<commit>/<file>`` as
    relative symlinks to ``<repo>/blobs/<hash>``.
    """
    p = Path(real_dir)
    for anc in (p, *p.parents):
        repo = anc.parent.parent
        if anc.parent.name == "snapshots" and re.fullmatch(r"(models|datasets|spaces)--.+", repo.name):
            return str(repo)
    return None


def open_checked(root: Path, name: str) -> tuple[int, Path]:
    """Check ``name`` as :func:`check_file_name` does, open it, and verify the open file is the checked one.

    Between the check and the open, a symlink could be swapped to point
    elsewhere: the opened descriptor must be the same regular file (device
    and inode) that was checked. Returns ``(fd, path)``; the caller closes ``fd``.
    """
    path, checked = _check(root, name)
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
            raise DistLoadError(f"{path} changed between checking and opening it (another file was swapped in)")
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def read_header(path: Path | str, display: str | None = None, *, root: Path | None = None,
                limit: int = MAX_HEADER_BYTES) -> ShardFile:
    """Read and validate one file's header. Opens, reads the header, closes.

    With ``root``, ``path`` is a file name inside it (a string, as the index
    writes it), checked and opened with :func:`open_checked`.
    """
    if root is not None:
        fd, path = open_checked(root, os.fspath(path))
    else:
        path = Path(path)
        fd = open_regular(path)
    name = display or path.name
    try:
        return header_from_fd(fd, name, limit=limit)
    finally:
        os.close(fd)


def open_regular(path: Path) -> int:
    """Open ``path`` read-only, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO that replaced the file since it was
    checked return at once instead of waiting for a writer; it has no effect
    on reads of regular files.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise DistLoadError(f"missing file {path}") from e
    except OSError as e:
        raise DistLoadError(f"cannot open {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DistLoadError(f"{path} is not a regular file (a FIFO, device or directory)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, view: memoryview, offset: int, name: object) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` with ``preadv``; a short file is a truncation error.

    The one read loop: headers here, tensor bytes in :mod:`distload.reader`.
    OS errors propagate as themselves, so callers can say what they were reading.
    """
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DistLoadError(f"{name}: truncated: file ended {total - done} bytes early at offset {offset + done}")
        done += n


def _pread_all(fd: int, n: int, name: object, offset: int = 0) -> bytes:
    """Exactly ``n`` bytes at ``offset``."""
    buf = bytearray(n)
    try:
        pread_into(fd, memoryview(buf), offset, name)
    except OSError as e:
        raise DistLoadError(f"{name}: read failed: {e.strerror or e}") from e
    return bytes(buf)


def header_from_fd(fd: int, name: str, *, limit: int = MAX_HEADER_BYTES) -> ShardFile:
    """Read and validate the header of the open file ``fd`` (the length prefix first).

    ``limit`` caps the header length (at most :data:`MAX_HEADER_BYTES`).
    """
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise DistLoadError(f"{name}: cannot stat: {e.strerror or e}") from e
    if size < 8:
        raise DistLoadError(f"{name}: truncated: {size} bytes, too short for the 8-byte header length")
    (hlen,) = struct.unpack("<Q", _pread_all(fd, 8, name))
    if hlen > MAX_HEADER_BYTES:
        raise DistLoadError(f"{name}: header length {hlen} exceeds the {MAX_HEADER_BYTES} byte limit")
    if hlen > limit:
        raise DistLoadError(f"{name}: header length {hlen} takes the checkpoint's headers past the "
                            f"{MAX_TOTAL_HEADER_BYTES} byte limit on all headers together")
    if 8 + hlen > size:
        raise DistLoadError(f"{name}: header length {hlen} runs past the end of the file ({size} bytes)")
    return parse_header(_pread_all(fd, hlen, name, 8), size, name)


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


def parse_header(raw: bytes, file_size: int, name: str) -> ShardFile:
    """Validate header bytes against the file size; pure, for tests and fuzzing."""
    if not raw.startswith(b"{"):
        raise DistLoadError(f"{name}: header does not start with '{{'")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except DistLoadError as e:
        raise DistLoadError(f"{name}: {e}") from None
    except UnicodeDecodeError:
        raise DistLoadError(f"{name}: header is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise DistLoadError(f"{name}: header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise DistLoadError(f"{name}: header is not a JSON object")
    data_offset = 8 + len(raw)
    data_len = file_size - data_offset
    count = len(doc) - ("__metadata__" in doc)
    if count > MAX_TENSORS:
        raise DistLoadError(f"{name}: {count} header entries exceed the {MAX_TENSORS} tensor limit")
    entries: list[TensorEntry] = []
    for key, info in doc.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise DistLoadError(f"{name}: __metadata__ is not an object")
            continue
        entries.append(_parse_entry(name, key, info))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:
        if e.start < pos:
            raise DistLoadError(f"{name}: tensor {_clip(e.name)} overlaps the tensor before it (starts at {e.start}, previous ends at {pos})")
        if e.start > pos:
            raise DistLoadError(f"{name}: gap of {e.start - pos} bytes before tensor {_clip(e.name)}")
        pos = e.end
    if pos > data_len:
        raise DistLoadError(f"{name}: tensor data runs to byte {pos} but the file holds {data_len} data bytes (truncated?)")
    if pos < data_len:
        raise DistLoadError(f"{name}: {data_len - pos} trailing bytes not covered by any tensor")
    return ShardFile(name=name, size=file_size, data_offset=data_offset, tensors=tuple(entries))


def _parse_entry(fname: str, key: str, info: object) -> TensorEntry:
    where = f"{fname}: tensor {_clip(key)}"
    if not isinstance(info, dict):
        raise DistLoadError(f"{where}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DistLoadError(f"{where}: unknown dtype {_clip(dtype)}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise DistLoadError(f"{where}: shape {_clip(shape)} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise DistLoadError(f"{where}: data_offsets {_clip(offsets)} must be [begin, end] with 0 <= begin <= end")
    # Sizes count bits (F4 and F6 values are smaller than a byte). Stop as
    # soon as the size leaves 64 bits: a hostile shape of a million huge
    # dimensions would otherwise make an enormous (slow) Python integer.
    bits = DTYPES[dtype].bits
    for d in shape:
        bits *= d
        if d >= 2**63 or bits >= 2**66:
            raise DistLoadError(f"{where}: shape {_clip(shape)} overflows 64-bit sizes")
    if bits % 8:
        raise DistLoadError(f"{where}: {dtype} x shape {_clip(shape)} is {bits} bits, not a whole number of bytes")
    expected = bits // 8
    if offsets[1] - offsets[0] != expected:
        raise DistLoadError(
            f"{where}: holds {offsets[1] - offsets[0]} bytes but dtype {dtype} x shape {_clip(shape)} needs {expected}"
        )
    try:
        shape = torch_shape(dtype, tuple(shape))
    except ValueError as e:
        raise DistLoadError(f"{where}: shape {_clip(shape)}: {e}") from None
    return TensorEntry(key, dtype, shape, offsets[0], offsets[1])


def _clip(value: object, limit: int = 120) -> str:
    """``repr`` for error messages, cut short: hostile headers hold huge values."""
    text = reprlib.repr(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DistLoadError(f"duplicate key {_clip(k)}")
        out[k] = v
    return out


def read_checkpoint(path: str | os.PathLike, *, strict: bool = True) -> Checkpoint:
    """(coordinator) Discover the checkpoint, read every header, cross-check the index.

    Under ``strict``, an index key missing from its file, or a file tensor the
    index does not list, is an error; otherwise it is reported as missing or as
    a warning (and the unlisted tensor is still loaded). Raises only
    :class:`DistLoadError` (an unexpected OS error keeps its cause).
    """
    try:
        return _read_checkpoint(path, strict)
    except OSError as e:
        raise DistLoadError(f"reading checkpoint {path}: {e}") from e


def _read_checkpoint(path: str | os.PathLike, strict: bool) -> Checkpoint:
    root, index_path, single = find_checkpoint(path)
    warnings: list[str] = []
    if index_path is None:
        shard = read_header(single[0], root=root)
        if not shard.tensors:
            raise DistLoadError(f"{shard.name} holds no tensors")
        return Checkpoint(str(root), (shard,))

    wmap, total_size = read_index(index_path)
    by_file: dict[str, list[str]] = {}
    for key, fname in wmap.items():
        by_file.setdefault(fname, []).append(key)
    if len(by_file) > MAX_FILES:
        raise DistLoadError(f"{index_path.name} names {len(by_file)} files, over the {MAX_FILES} file limit")
    if len(wmap) > MAX_TENSORS:
        raise DistLoadError(f"{index_path.name} lists {len(wmap)} tensors, over the {MAX_TENSORS} tensor limit")
    files: list[ShardFile] = []
    seen: dict[str, str] = {}
    header_bytes = 0
    for fname in sorted(by_file):
        shard = read_header(fname, fname, root=root, limit=MAX_TOTAL_HEADER_BYTES - header_bytes)
        header_bytes += shard.data_offset - 8
        if len(seen) + len(shard.tensors) > MAX_TENSORS:
            raise DistLoadError(f"the checkpoint's files hold over {MAX_TENSORS} tensors (the limit) "
                                f"by {fname}")
        for t in shard.tensors:  # a tensor in two files is never loadable, strict or not
            if t.name in seen:
                raise DistLoadError(f"tensor {t.name!r} is in both {seen[t.name]} and {fname}")
            seen[t.name] = fname
        files.append(shard)
    missing: list[str] = []
    for shard in files:
        in_file = {t.name for t in shard.tensors}
        for key in by_file[shard.name]:
            if key not in in_file:
                if strict:
                    raise DistLoadError(f"index lists {key!r} in {shard.name}, but that file does not hold it")
                missing.append(key)
        for t in shard.tensors:
            if wmap.get(t.name) != shard.name:
                msg = f"{shard.name} holds {t.name!r}, which the index does not list there"
                if strict:
                    raise DistLoadError(msg)
                warnings.append(msg)
    data_bytes = sum(t.nbytes for f in files for t in f.tensors)
    if total_size is None:
        warnings.append(f"{index_path.name} has no metadata.total_size (using {data_bytes} from headers)")
    elif total_size != data_bytes:
        warnings.append(f"{index_path.name} says total_size={total_size} but the headers hold {data_bytes} bytes")
    return Checkpoint(str(root), tuple(files), tuple(sorted(missing)), tuple(warnings))
