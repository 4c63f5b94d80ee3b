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
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import DistLoadError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
MAX_INDEX_BYTES = 256 * 1024 * 1024  # real indexes are a few MB even for 1T-parameter models
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Bytes per element for every safetensors dtype distload can place into torch.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}

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
    dtype: str
    shape: tuple[int, ...]
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


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None, list[str]]:
    """Resolve what the user pointed at into ``(root_dir, index_file, files)``.

    ``files`` is filled only when there is no index (single-file checkpoints).
    Accepts a directory, a ``.safetensors`` file, or a ``*.safetensors.index.json``.
    """
    p = Path(path)
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
    owner before it opens the file (storage may differ between nodes).
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or ".." in name:
        raise DistLoadError(f"refusing file name {name!r}: it must be a plain file name inside {root}")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DistLoadError(f"refusing {name}: it resolves to {real}, outside the checkpoint directory {real_root}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise DistLoadError(f"missing file {path}") from None
    except OSError as e:
        raise DistLoadError(f"cannot stat {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise DistLoadError(f"{path} is not a regular file (a FIFO, device or directory)")
    return path


def read_header(path: Path, display: str | None = None) -> ShardFile:
    """Read and validate one file's header. Opens, reads the header, closes."""
    name = display or path.name
    fd = open_regular(path)
    try:
        return header_from_fd(fd, name)
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


def _pread_all(fd: int, n: int, name: object, offset: int = 0) -> bytes:
    """Exactly ``n`` bytes at ``offset``; a short file is a truncation error."""
    parts, done = [], 0
    while done < n:
        try:
            part = os.pread(fd, n - done, offset + done)
        except OSError as e:
            raise DistLoadError(f"{name}: read failed at offset {offset + done}: {e.strerror or e}") from e
        if not part:
            raise DistLoadError(f"{name}: truncated: file ended {n - done} bytes early at offset {offset + done}")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def header_from_fd(fd: int, name: str) -> ShardFile:
    """Read and validate the header of the open file ``fd`` (the length prefix first)."""
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise DistLoadError(f"{name}: cannot stat: {e.strerror or e}") from e
    if size < 8:
        raise DistLoadError(f"{name}: truncated: {size} bytes, too short for the 8-byte header length")
    (hlen,) = struct.unpack("<Q", _pread_all(fd, 8, name))
    if hlen > MAX_HEADER_BYTES:
        raise DistLoadError(f"{name}: header length {hlen} exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + hlen > size:
        raise DistLoadError(f"{name}: header length {hlen} runs past the end of the file ({size} bytes)")
    return parse_header(_pread_all(fd, hlen, name, 8), size, name)


def local_root(path: str | os.PathLike) -> Path:
    """(owner ranks) This rank's checkpoint directory for the path the user passed.

    Each owner opens its files under its own view of ``path`` (node-local
    storage, per-node mounts, relative paths), not rank 0's; a path missing
    here is a clear error naming this host.
    """
    p = Path(path)
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
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
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
    # Stop as soon as the size leaves 64 bits: a hostile shape of a million
    # huge dimensions would otherwise make an enormous (slow) Python integer.
    expected = DTYPE_SIZES[dtype]
    for d in shape:
        expected *= d
        if d >= 2**63 or expected >= 2**63:
            raise DistLoadError(f"{where}: shape {_clip(shape)} overflows 64-bit sizes")
    if offsets[1] - offsets[0] != expected:
        raise DistLoadError(
            f"{where}: holds {offsets[1] - offsets[0]} bytes but dtype {dtype} x shape {_clip(shape)} needs {expected}"
        )
    return TensorEntry(key, dtype, tuple(shape), offsets[0], offsets[1])


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
        shard = read_header(check_file_name(root, single[0]))
        if not shard.tensors:
            raise DistLoadError(f"{shard.name} holds no tensors")
        return Checkpoint(str(root), (shard,))

    wmap, total_size = read_index(index_path)
    by_file: dict[str, list[str]] = {}
    for key, fname in wmap.items():
        by_file.setdefault(fname, []).append(key)
    files: list[ShardFile] = []
    seen: dict[str, str] = {}
    for fname in sorted(by_file):
        shard = read_header(check_file_name(root, fname), fname)
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
