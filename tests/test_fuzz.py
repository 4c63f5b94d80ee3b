"""Fuzzing the header and index parsers: only DistLoadError, never another exception, never a hang.

Inputs are random bytes, random JSON, and valid headers/indexes that are then
damaged: byte flips, insertions, deletions, truncation, and fields replaced by
arbitrary JSON values (huge, negative, float, nested). The fast runs are part
of the default suite; ``pytest -m slow tests/test_fuzz.py`` runs the same
properties with many more examples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distload.errors import DistLoadError
from distload.format.dtypes import DTYPES, nbytes
from distload.format.header import ShardFile, parse_header, read_checkpoint, read_index

FAST = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=3000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies -------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.integers(min_value=-(2**70), max_value=2**70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
dims = st.integers(min_value=0, max_value=5)


@st.composite
def valid_headers(draw) -> tuple[dict, int]:
    """A well-formed header dict and the size of the data section it describes."""
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=5, unique=True))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    pos = 0
    for name in names:
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(dims, max_size=3))
        if DTYPES[dtype].bits < 8:  # F4 pairs along the last dimension; F6 fills bytes 4 values at a time
            shape.append(2 if dtype == "F4" else 4)
        numel = 1
        for d in shape:
            numel *= d
        n = nbytes(dtype, numel)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


@st.composite
def structurally_damaged_headers(draw) -> tuple[bytes, int]:
    """A valid header with one field (or one whole entry) replaced by arbitrary JSON."""
    header, data_len = draw(valid_headers())
    keys = [k for k in header if k != "__metadata__"]
    if keys:
        key = draw(st.sampled_from(keys))
        where = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra"]))
        junk = draw(json_values | st.lists(st.integers(min_value=-(2**64), max_value=2**64), max_size=4))
        if where == "entry":
            header[key] = junk
        elif where == "extra":
            header[key]["extra"] = junk
        else:
            header[key][where] = junk
    else:
        header[draw(st.text(max_size=4))] = draw(json_values)
    delta = draw(st.sampled_from([0, 0, 1, -1, 7]))
    return json.dumps(header).encode(), 8 + len(json.dumps(header).encode()) + max(0, data_len + delta)


@st.composite
def byte_mutations(draw, base: bytes) -> bytes:
    """``base`` with a few random byte-level edits."""
    data = bytearray(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        i = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[i : i + draw(st.integers(min_value=1, max_value=4))]
        elif op == "truncate":
            del data[i:]
        elif op == "set" and data:
            data[i] = draw(st.sampled_from(b'{}[]",:0-e9\\\x00\xff'))
    return bytes(data)


@st.composite
def mutated_valid_headers(draw) -> tuple[bytes, int]:
    header, data_len = draw(valid_headers())
    raw = json.dumps(header).encode()
    return draw(byte_mutations(raw)), 8 + len(raw) + data_len


def _index_doc(draw) -> dict:
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True))
    files = draw(st.lists(st.sampled_from(["a.safetensors", "b.safetensors", "../x", "/abs", "c.bin", ""]),
                          min_size=len(names), max_size=len(names)))
    doc: dict = {"weight_map": dict(zip(names, files))}
    if draw(st.booleans()):
        doc["metadata"] = {"total_size": draw(json_values)}
    return doc


@st.composite
def index_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "json", "mutated", "damaged"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    doc = _index_doc(draw)
    if kind == "damaged":
        doc[draw(st.sampled_from(["weight_map", "metadata"]))] = draw(json_values)
    raw = json.dumps(doc).encode()
    return draw(byte_mutations(raw)) if kind == "mutated" else raw


# ---- properties -------------------------------------------------------------

def _parse_only_raises_distload_error(raw: bytes, file_size: int) -> None:
    try:
        shard = parse_header(raw, file_size, "fuzz.safetensors")
    except DistLoadError:
        return
    assert isinstance(shard, ShardFile)
    # Anything accepted is self-consistent: contiguous, in bounds, sized right.
    pos = 0
    for t in shard.tensors:
        assert t.start == pos and t.end >= t.start
        pos = t.end
    assert pos == file_size - shard.data_offset


def _read_index_only_raises_distload_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors.index.json"
        path.write_bytes(raw)
        try:
            wmap, total = read_index(path)
        except DistLoadError:
            return
        assert wmap and all(isinstance(v, str) for v in wmap.values())
        assert total is None or isinstance(total, int)


def _read_checkpoint_only_raises_distload_error(index: bytes, shard: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        d.mkdir()
        (d / "model.safetensors.index.json").write_bytes(index)
        (d / "a.safetensors").write_bytes(shard)
        (d / "b.safetensors").write_bytes(_valid_file({"w": [1.0, 2.0]}))
        for strict in (True, False):
            try:
                read_checkpoint(d, strict=strict)
            except DistLoadError:
                pass


def _valid_file(tensors: dict[str, list[float]]) -> bytes:
    import struct

    header, data, pos = {}, b"", 0
    for name, vals in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(vals)], "data_offsets": [pos, pos + 4 * len(vals)]}
        data += struct.pack(f"<{len(vals)}f", *vals)
        pos += 4 * len(vals)
    hb = json.dumps(header).encode()
    return len(hb).to_bytes(8, "little") + hb + data


@st.composite
def shard_bytes(draw) -> bytes:
    """Whole shard files: random, mutated valid, or with a damaged length prefix."""
    kind = draw(st.sampled_from(["random", "mutated", "prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    good = _valid_file({"v": [1.0, 2.0, 3.0], "w": [4.0]})
    if kind == "mutated":
        return draw(byte_mutations(good))
    prefix = draw(st.integers(min_value=0, max_value=2**64 - 1)).to_bytes(8, "little")
    return prefix + good[8:]


headers = (st.tuples(st.binary(max_size=400), st.integers(min_value=-10, max_value=2**64))
           | mutated_valid_headers() | structurally_damaged_headers())


@FAST
@given(headers)
def test_parse_header_raises_only_distload_error(case):
    _parse_only_raises_distload_error(*case)


@pytest.mark.slow
@SLOW
@given(headers)
def test_parse_header_raises_only_distload_error_long_run(case):
    _parse_only_raises_distload_error(*case)


@FAST
@given(valid_headers())
def test_parse_header_accepts_every_valid_header(case):
    header, data_len = case
    raw = json.dumps(header).encode()
    shard = parse_header(raw, 8 + len(raw) + data_len, "ok.safetensors")
    assert {t.name for t in shard.tensors} == set(header) - {"__metadata__"}


@FAST
@given(index_bytes())
def test_read_index_raises_only_distload_error(raw):
    _read_index_only_raises_distload_error(raw)


@pytest.mark.slow
@SLOW
@given(index_bytes())
def test_read_index_raises_only_distload_error_long_run(raw):
    _read_index_only_raises_distload_error(raw)


checkpoints = st.tuples(
    index_bytes() | st.just(json.dumps({"weight_map": {"v": "a.safetensors", "w": "b.safetensors"}}).encode()),
    shard_bytes(),
)


@FAST
@given(checkpoints)
def test_read_checkpoint_raises_only_distload_error(case):
    _read_checkpoint_only_raises_distload_error(*case)


@pytest.mark.slow
@SLOW
@given(checkpoints)
def test_read_checkpoint_raises_only_distload_error_long_run(case):
    _read_checkpoint_only_raises_distload_error(*case)


def test_a_header_of_a_million_huge_dimensions_fails_fast():
    shape = [2**62] * 1_000_000
    raw = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    with pytest.raises(DistLoadError, match="overflows 64-bit"):
        parse_header(raw, 8 + len(raw), "big.safetensors")


def test_error_messages_stay_short_for_huge_hostile_values():
    raw = json.dumps({"k" * 100_000: {"dtype": "X" * 100_000, "shape": [], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(DistLoadError) as info:
        parse_header(raw, 8 + len(raw), "long.safetensors")
    assert len(str(info.value)) < 1000
