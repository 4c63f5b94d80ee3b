"""Hostile and damaged checkpoints, written byte by byte.

Each :class:`Case` builds one bad checkpoint in its own directory, starting
from a tiny valid two-file checkpoint (four fp32 tensors, 48 data bytes) and
breaking exactly one thing. ``expect`` is a piece of the message the user
must see. The builders are plain functions so that test processes and the
CLI helper can share them.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

F1 = "model-00001-of-00002.safetensors"
F2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE = "arbitrary code"


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def st_file(header: dict | bytes, data: bytes, *, hlen: int | None = None) -> bytes:
    """The bytes of a safetensors file: 8-byte little-endian length, header, data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(hb) if hlen is None else hlen).to_bytes(8, "little") + hb + data


def header_a() -> dict:
    return {"l0.weight": entry("F32", [2, 2], 0, 16), "l0.bias": entry("F32", [2], 16, 24)}


def header_b() -> dict:
    return {"l1.weight": entry("F32", [2, 2], 0, 16), "l1.bias": entry("F32", [2], 16, 24)}


DATA_A = floats(1, 2, 3, 4, 5, 6)
DATA_B = floats(7, 8, 9, 10, 11, 12)


def weight_map(f2: str = F2) -> dict[str, str]:
    return {"l0.weight": F1, "l0.bias": F1, "l1.weight": f2, "l1.bias": f2}


def write_index(d: Path, wmap: dict | None = None, *, raw: bytes | None = None) -> None:
    doc = {"metadata": {"total_size": 48}, "weight_map": weight_map() if wmap is None else wmap}
    (d / INDEX).write_bytes(raw if raw is not None else json.dumps(doc).encode())


def write_valid(d: Path) -> Path:
    """The valid checkpoint every case starts from."""
    d.mkdir(parents=True, exist_ok=True)
    (d / F1).write_bytes(st_file(header_a(), DATA_A))
    (d / F2).write_bytes(st_file(header_b(), DATA_B))
    write_index(d)
    return d


def with_file_b(header: dict | bytes, data: bytes = DATA_B, **kw) -> Callable[[Path], Path]:
    """A case whose second file is replaced by the given header and data."""

    def build(d: Path) -> Path:
        write_valid(d)
        (d / F2).write_bytes(st_file(header, data, **kw))
        return d

    return build


class Tiny(nn.Module):
    """A model matching the valid checkpoint's four tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(2, 2)
        self.l1 = nn.Linear(2, 2)


class _Weight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, 2))


class TinyPlus(Tiny):
    """Tiny plus ``l2.weight``, which the broken index lists but no file holds."""

    def __init__(self) -> None:
        super().__init__()
        self.l2 = _Weight()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path | None]  # returns the path to load, or None if unbuildable here
    expect: str  # part of the message every rank must show
    phase: str = "plan"
    kwargs: dict = field(default_factory=dict)  # extra load_checkpoint arguments
    model: str = ""  # "", "tiny" or "tiny_plus"
    missing_ok: tuple[str, ...] = ()  # not an error: the load succeeds, reporting these as missing


# ---- builders that need more than one replaced file ------------------------

def _dotdot(d: Path) -> Path:
    write_valid(d)
    (d.parent / f"{d.name}-{F2}").write_bytes((d / F2).read_bytes())
    write_index(d, weight_map(f"../{d.name}-{F2}"))
    return d


def _dotdot_plain(d: Path) -> Path:
    write_valid(d)
    write_index(d, weight_map(".."))
    return d


def _absolute(d: Path) -> Path:
    write_valid(d)
    write_index(d, weight_map(str((d / F2).resolve())))
    return d


def _separator(d: Path) -> Path:
    write_valid(d)
    (d / "sub").mkdir()
    (d / F2).rename(d / "sub" / F2)
    write_index(d, weight_map(f"sub/{F2}"))
    return d


def _symlink_escape(d: Path) -> Path:
    write_valid(d)
    outside = d.parent / f"{d.name}-outside.safetensors"
    (d / F2).rename(outside)
    (d / F2).symlink_to(outside)
    return d


def _symlink_escaping_a_cache_snapshot(d: Path) -> Path:
    """A hub-cache snapshot whose files link into ../../blobs, except one that leaves the repo folder."""
    repo = d / "models--org--tiny"
    snap = repo / "snapshots" / ("a1" * 20)
    write_valid(snap)
    (repo / "blobs").mkdir()
    for name in (F1, INDEX):
        (snap / name).rename(repo / "blobs" / name)
        (snap / name).symlink_to(f"../../blobs/{name}")
    (snap / F2).rename(d / F2)  # inside the test's folder, outside models--org--tiny
    (snap / F2).symlink_to(f"../../../../{F2}")
    return snap


def _fifo_shard(d: Path) -> Path:
    write_valid(d)
    (d / F2).unlink()
    os.mkfifo(d / F2)
    return d


def _device_shard(d: Path) -> Path | None:
    write_valid(d)
    (d / F2).unlink()
    try:  # /dev/zero's numbers: a read would never end
        os.mknod(d / F2, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except (PermissionError, OSError):
        return None
    return d


def _fifo_index(d: Path) -> Path:
    write_valid(d)
    (d / INDEX).unlink()
    os.mkfifo(d / INDEX)
    return d


def _truncated(d: Path) -> Path:
    write_valid(d)
    raw = (d / F2).read_bytes()
    (d / F2).write_bytes(raw[:-5])
    return d


def _truncated_in_header(d: Path) -> Path:
    write_valid(d)
    raw = (d / F2).read_bytes()
    (d / F2).write_bytes(raw[:20])
    return d


def _shorter_than_length_prefix(d: Path) -> Path:
    write_valid(d)
    (d / F2).write_bytes(b"\x10\x00\x00")
    return d


def _duplicate_header_key(d: Path) -> Path:
    write_valid(d)
    e = json.dumps(entry("F32", [2], 16, 24))
    raw = ('{"l1.weight": %s, "l1.bias": %s, "l1.bias": %s}' % (json.dumps(entry("F32", [2, 2], 0, 16)), e, e))
    (d / F2).write_bytes(st_file(raw.encode(), DATA_B))
    return d


def _duplicate_index_key(d: Path) -> Path:
    write_valid(d)
    raw = ('{"weight_map": {"l0.weight": "%s", "l0.bias": "%s", "l1.weight": "%s", "l1.bias": "%s", '
           '"l1.bias": "%s"}}' % (F1, F1, F2, F2, F1))
    write_index(d, raw=raw.encode())
    return d


def _same_key_two_files(d: Path) -> Path:
    write_valid(d)
    h = header_b()
    h["l0.bias"] = entry("F32", [2], 24, 32)
    (d / F2).write_bytes(st_file(h, DATA_B + floats(0, 0)))
    return d


def _index_key_missing(d: Path) -> Path:
    write_valid(d)
    write_index(d, {**weight_map(), "l2.weight": F2})
    return d


def _file_tensor_not_in_index(d: Path) -> Path:
    write_valid(d)
    h = header_b()
    h["l1.extra"] = entry("F32", [2], 24, 32)
    (d / F2).write_bytes(st_file(h, DATA_B + floats(0, 0)))
    return d


def _missing_file(d: Path) -> Path:
    write_valid(d)
    (d / F2).unlink()
    return d


def _pickle_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickled empty dict
    return d


def _pickle_index_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "pytorch_model-00001-of-00001.bin").write_bytes(b"\x80\x02}q\x00.")
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    return d


def _pickle_file(d: Path) -> Path:
    return _pickle_dir(d) / "pytorch_model.bin"


def _pickle_index_file(d: Path) -> Path:
    return _pickle_index_dir(d) / "pytorch_model.bin.index.json"


def _safetensors_index_naming_pickles(d: Path) -> Path:
    write_valid(d)
    (d / "pytorch_model-00002-of-00002.bin").write_bytes(b"\x80\x02}q\x00.")
    write_index(d, weight_map("pytorch_model-00002-of-00002.bin"))
    return d


def _index_writer(raw: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        write_valid(d)
        write_index(d, raw=raw)
        return d

    return build


_B_SHAPE_WRONG = {**header_b(), "l1.bias": entry("F32", [3], 16, 24)}
_B_OVERFLOW = {**header_b(), "l1.bias": entry("F32", [2**40, 2**40], 16, 24)}
_B_DTYPE = {**header_b(), "l1.bias": entry("F128", [2], 16, 24)}
_B_OVERLAP = {"l1.weight": entry("F32", [2, 2], 0, 16), "l1.bias": entry("F32", [2], 8, 16)}
_B_GAP = {"l1.weight": entry("F32", [2, 2], 0, 16), "l1.bias": entry("F32", [2], 20, 28)}
_B_OUT_OF_BOUNDS = {"l1.weight": entry("F32", [2, 2], 0, 16), "l1.bias": entry("F32", [2], 16, 24)}
_B_F6 = {"l1.weight": entry("F6_E2M3", [2, 2], 0, 3), "l1.bias": entry("F32", [2], 3, 11)}  # 4 values: 24 bits
_B_REVERSED = {"l1.weight": entry("F32", [2, 2], 0, 16), "l1.bias": entry("F32", [2], 24, 16)}

CASES: list[Case] = [
    Case("weight_map_name_with_dotdot", _dotdot, "refusing file name"),
    Case("weight_map_name_that_is_dotdot", _dotdot_plain, "refusing file name"),
    Case("weight_map_absolute_path", _absolute, "refusing file name"),
    Case("weight_map_path_separator", _separator, "refusing file name"),
    Case("symlink_escaping_the_directory", _symlink_escape, "outside the checkpoint directory"),
    Case("symlink_escaping_a_hub_cache_repo_folder", _symlink_escaping_a_cache_snapshot,
         "outside the checkpoint directory"),
    Case("fifo_in_place_of_a_shard", _fifo_shard, "not a regular file"),
    Case("device_file_in_place_of_a_shard", _device_shard, "not a regular file"),
    Case("fifo_in_place_of_the_index", _fifo_index, "not a regular file"),
    Case("truncated_file", _truncated, "truncated"),
    Case("file_truncated_inside_its_header", _truncated_in_header, "runs past the end of the file"),
    Case("file_shorter_than_the_length_prefix", _shorter_than_length_prefix, "too short for the 8-byte"),
    Case("header_length_larger_than_the_file", with_file_b(header_b(), hlen=10_000),
         "runs past the end of the file"),
    Case("header_over_100_mb", with_file_b(header_b(), hlen=100 * 1024 * 1024 + 1), "exceeds the 104857600"),
    Case("header_not_utf8", with_file_b(b'{"l1.weight\xff\xfe": 1}'), "not UTF-8"),
    Case("header_not_json", with_file_b(b'{"l1.weight": {"dtype": "F32",'), "not valid JSON"),
    Case("header_not_starting_with_brace", with_file_b(b'[{"l1.weight": 1}]'), "does not start with '{'"),
    Case("header_json_nested_too_deep", with_file_b(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         "not valid JSON"),
    Case("overlapping_offsets", with_file_b(_B_OVERLAP, DATA_B[:16]), "overlaps"),
    Case("gap_between_tensors", with_file_b(_B_GAP, DATA_B + floats(0)), "gap of 4 bytes"),
    Case("trailing_bytes_not_covered", with_file_b(header_b(), DATA_B + b"\0" * 8), "8 trailing bytes"),
    Case("offsets_out_of_bounds", with_file_b(_B_OUT_OF_BOUNDS, DATA_B[:20]), "runs to byte 24"),
    Case("offsets_reversed", with_file_b(_B_REVERSED), "must be [begin, end]"),
    Case("size_not_dtype_times_shape", with_file_b(_B_SHAPE_WRONG), "needs 12"),
    Case("shape_product_overflow", with_file_b(_B_OVERFLOW), "overflows 64-bit"),
    Case("unknown_dtype", with_file_b(_B_DTYPE), "unknown dtype 'F128'"),
    Case("dtype_torch_lacks", with_file_b(_B_F6, DATA_B[:11]), "tensor 'l1.weight': dtype F6_E2M3 has no torch dtype"),
    Case("dtype_torch_lacks_with_a_model", with_file_b(_B_F6, DATA_B[:11]),
         "tensor 'l1.weight': dtype F6_E2M3 has no torch dtype", model="tiny"),
    Case("duplicate_key_in_a_header", _duplicate_header_key, "duplicate key 'l1.bias'"),
    Case("duplicate_key_in_the_index", _duplicate_index_key, "duplicate key 'l1.bias'"),
    Case("same_key_in_two_files", _same_key_two_files, "'l0.bias' is in both"),
    Case("index_key_missing_from_its_file", _index_key_missing, "'l2.weight' in " + F2),
    Case("index_key_missing_from_its_file_with_a_model", _index_key_missing, "'l2.weight' in " + F2,
         model="tiny_plus"),
    Case("index_key_missing_from_its_file_not_strict", _index_key_missing, "", model="tiny_plus",
         kwargs={"strict": False}, missing_ok=("l2.weight",)),
    Case("file_tensor_absent_from_the_index", _file_tensor_not_in_index, "'l1.extra', which the index does not"),
    Case("empty_weight_map", _index_writer(json.dumps({"weight_map": {}}).encode()), "empty weight_map"),
    Case("index_not_json", _index_writer(b'{"weight_map": {"l0.weight": '), "not valid JSON"),
    Case("index_not_utf8", _index_writer(b'{"weight_map": {"\xff": "x"}}'), "not UTF-8"),
    Case("index_without_weight_map", _index_writer(b'{"metadata": {}}'), "no 'weight_map' object"),
    Case("missing_file", _missing_file, "missing file"),
    Case("pickle_checkpoint_directory", _pickle_dir, PICKLE),
    Case("pickle_index_directory", _pickle_index_dir, PICKLE),
    Case("path_to_a_pickle_file", _pickle_file, PICKLE),
    Case("path_to_a_pickle_index", _pickle_index_file, PICKLE),
    Case("safetensors_index_naming_pickle_files", _safetensors_index_naming_pickles, PICKLE),
]

BY_NAME = {c.name: c for c in CASES}


def build_all(root: Path) -> dict[str, str | None]:
    """Build every case under ``root``; name -> path to load (None: not buildable here)."""
    out: dict[str, str | None] = {}
    for case in CASES:
        path = case.build(root / case.name)
        out[case.name] = None if path is None else str(path)
    return out
