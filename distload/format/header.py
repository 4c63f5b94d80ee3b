"""Safetensors headers and the index: parsing and validation, and the checkpoint they describe.

Pure and process-local: nothing here talks to other ranks. In a load, only the
coordinator (rank 0) runs :func:`read_checkpoint`; the result travels to the
other ranks inside the plan.

Every check raises :class:`DistLoadError` naming the file (and key) at fault,
so hostile or damaged checkpoints never surface as a ``KeyError`` or a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import DistLoadError
from ..storage.base import Source, Store
from ..storage.files import FileSource, open_checked, open_regular
from .discover import PICKLE_SUFFIXES, locate, pickle_help
from .dtypes import DTYPES, torch_shape

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces, per file
MAX_INDEX_BYTES = 256 * 1024 * 1024  # real indexes are a few MB even for 1T-parameter models
# Caps across the whole checkpoint, so a hostile index cannot make rank 0 open
# millions of files or hold gigabytes of headers. DeepSeek-V3 (671B) has 163
# files, about 91k tensors and under 20 MB of headers.
MAX_FILES = 65_536
MAX_TENSORS = 2_097_152
MAX_TOTAL_HEADER_BYTES = 512 * 1024 * 1024

# Bytes per torch element for every safetensors dtype whose elements are whole
# bytes (F4 counts packed pairs; see distload.format.dtypes).
DTYPE_SIZES: dict[str, int] = {n: d.itemsize for n, d in DTYPES.items() if d.bits * d.pack % 8 == 0}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one file: byte range relative to the file's data section."""

    name: str
    dtype: str  # as written in the header, e.g. "F8_E4M3"
    shape: tuple[int, ...]  # in torch elements: F4's last dimension counts packed pairs (distload.format.dtypes)
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
    version: str = ""  # the object's ETag on object storage, which pins its content; "" for local files


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


def _folder_of(src: Source) -> Path | str:
    """Where a source's file lives: a local folder (its config.json can name the model class), or a prefix."""
    return Path(src.name).parent if isinstance(src, FileSource) else src.name.rpartition("/")[0]


def read_index(index: Path | Source) -> tuple[dict[str, str], int | None]:
    """Parse an index file (a path, or an opened source, which is closed) into ``(weight_map, total_size or None)``."""
    src = FileSource(open_regular(index), index) if isinstance(index, Path) else index
    name = src.name.rsplit("/", 1)[-1]
    try:
        if src.size > MAX_INDEX_BYTES:
            raise DistLoadError(f"index {src.name}: {src.size} bytes exceeds the {MAX_INDEX_BYTES} byte limit")
        raw = src.read(src.size, 0, src.name)
    finally:
        src.close()
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except DistLoadError as e:
        raise DistLoadError(f"index {name}: {e}") from None
    except UnicodeDecodeError as e:
        raise DistLoadError(f"index {name} is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise DistLoadError(f"index {name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise DistLoadError(f"index {name} has no 'weight_map' object")
    wmap = doc["weight_map"]
    if not wmap:
        raise DistLoadError(f"index {name} has an empty weight_map")
    for key, fname in wmap.items():
        if not isinstance(fname, str):
            raise DistLoadError(f"index {name}: weight_map[{key!r}] is not a file name")
        if fname.endswith(PICKLE_SUFFIXES):
            raise DistLoadError(f"index {name} maps {key!r} to {fname!r}: "
                                + pickle_help(_folder_of(src), [fname]))
    meta = doc.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if isinstance(total, bool) or not isinstance(total, int):
        total = None
    return wmap, total


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
    src = FileSource(fd, path)
    try:
        return header_from(src, display or path.name, limit=limit)
    finally:
        src.close()


def header_from(src: Source, name: str, *, limit: int = MAX_HEADER_BYTES) -> ShardFile:
    """Read and validate the header of an opened file or object: the 8-byte length, then the header.

    Two exact reads (ranged GETs on object storage), never the tensor data.
    ``limit`` caps the header length (at most :data:`MAX_HEADER_BYTES`). The
    result carries the source's version (an ETag), which pins what was read.
    """
    return _header_after(src, name, header_length(src, name, limit))


def header_length(src: Source, name: str, limit: int = MAX_HEADER_BYTES) -> int:
    """The header length an opened source declares, checked against the limits and its size."""
    size = src.size
    if size < 8:
        raise DistLoadError(f"{name}: truncated: {size} bytes, too short for the 8-byte header length")
    (hlen,) = struct.unpack("<Q", src.read(8, 0, name))
    if hlen > MAX_HEADER_BYTES:
        raise DistLoadError(f"{name}: header length {hlen} exceeds the {MAX_HEADER_BYTES} byte limit")
    if hlen > limit:
        raise DistLoadError(f"{name}: header length {hlen} takes the checkpoint's headers past the "
                            f"{MAX_TOTAL_HEADER_BYTES} byte limit on all headers together")
    if 8 + hlen > size:
        raise DistLoadError(f"{name}: header length {hlen} runs past the end of the file ({size} bytes)")
    return hlen


def _header_after(src: Source, name: str, hlen: int) -> ShardFile:
    shard = parse_header(src.read(hlen, 8, name), src.size, name)
    return dataclasses.replace(shard, version=src.version) if src.version else shard


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
    store, index_name, single = locate(path)
    warnings: list[str] = []
    if index_name is None:
        (shard,) = _read_headers(store, single)
        if not shard.tensors:
            raise DistLoadError(f"{shard.name} holds no tensors")
        return Checkpoint(store.location, (shard,))

    wmap, total_size = read_index(store.open(index_name, checked=False))
    by_file: dict[str, list[str]] = {}
    for key, fname in wmap.items():
        by_file.setdefault(fname, []).append(key)
    if len(by_file) > MAX_FILES:
        raise DistLoadError(f"{index_name} names {len(by_file)} files, over the {MAX_FILES} file limit")
    if len(wmap) > MAX_TENSORS:
        raise DistLoadError(f"{index_name} lists {len(wmap)} tensors, over the {MAX_TENSORS} tensor limit")
    files: list[ShardFile] = []
    seen: dict[str, str] = {}
    for shard in _read_headers(store, sorted(by_file)):
        fname = shard.name
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
        warnings.append(f"{index_name} has no metadata.total_size (using {data_bytes} from headers)")
    elif total_size != data_bytes:
        warnings.append(f"{index_name} says total_size={total_size} but the headers hold {data_bytes} bytes")
    return Checkpoint(store.location, tuple(files), tuple(sorted(missing)), tuple(warnings))


HEADER_FETCHES = 32  # concurrent header requests on object storage, where each read is a round trip


def _read_headers(store: Store, names: list[str]) -> list[ShardFile]:
    """(coordinator) Every named file's validated header, in order, under the limit on all headers together.

    Local files are read one after another. On object storage the lengths
    are fetched concurrently first and checked against the limit in order,
    then the headers, so a hostile checkpoint cannot make rank 0 fetch more
    than the limit.
    """
    if not store.remote:
        out, header_bytes = [], 0
        for name in names:
            src = store.open(name)
            try:
                out.append(header_from(src, name, limit=MAX_TOTAL_HEADER_BYTES - header_bytes))
            finally:
                src.close()
            header_bytes += out[-1].data_offset - 8
        return out

    def length(name: str) -> tuple[Source, int]:
        src = store.open(name)
        return src, header_length(src, name)

    with ThreadPoolExecutor(min(HEADER_FETCHES, max(1, len(names))), thread_name_prefix="distload-head") as pool:
        opened = list(pool.map(length, names))
        total = 0
        for name, (_, hlen) in zip(names, opened):
            total += hlen
            if total > MAX_TOTAL_HEADER_BYTES:
                raise DistLoadError(f"{name}: header length {hlen} takes the checkpoint's headers past the "
                                    f"{MAX_TOTAL_HEADER_BYTES} byte limit on all headers together")
        return list(pool.map(lambda a: _header_after(a[1][0], a[0], a[1][1]), zip(names, opened)))
