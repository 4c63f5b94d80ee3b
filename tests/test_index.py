"""Pure unit tests of distload/format/index.py: discovery, header parsing, index cross-checks.

The exhaustive list of hostile headers and file names lives in test_hostile.py;
here are the accepted inputs, the happy path and a few representative refusals.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt import st_bytes, write_sized
from distload import DistLoadError
from distload.format import discover, header
from distload.format.discover import find_checkpoint
from distload.format.header import (
    Checkpoint,
    parse_header,
    read_checkpoint,
    read_header,
    read_index,
)
from distload.storage import files


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _two_file_index(d: Path, index_name: str = "model.safetensors.index.json", **meta) -> Path:
    _save(d / "a.safetensors", {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    _save(d / "b.safetensors", {"y": torch.ones(4, dtype=torch.int64), "z": torch.zeros(1, dtype=torch.float16)})
    doc = {"metadata": meta, "weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}}
    (d / index_name).write_text(json.dumps(doc))
    return d


DATA_BYTES = 2 * 3 * 4 + 4 * 8 + 2  # x, y, z above


# ---- discovery: every accepted input ----------------------------------------


def test_directory_with_model_index(tmp_path):
    d = _two_file_index(tmp_path / "ck")
    root, index, files = find_checkpoint(d)
    assert (root, index, files) == (d, d / "model.safetensors.index.json", [])
    ck = read_checkpoint(d)
    assert sorted(ck.keys()) == ["x", "y", "z"]
    assert [f.name for f in ck.files] == ["a.safetensors", "b.safetensors"]
    assert ck.total_bytes == DATA_BYTES


def test_directory_with_other_index_name(tmp_path):
    d = _two_file_index(tmp_path / "ck", "diffusion_pytorch_model.safetensors.index.json", total_size=DATA_BYTES)
    root, index, files = find_checkpoint(d)
    assert index == d / "diffusion_pytorch_model.safetensors.index.json" and files == []
    assert sorted(read_checkpoint(d).keys()) == ["x", "y", "z"]


def test_model_index_preferred_over_others(tmp_path):
    d = _two_file_index(tmp_path / "ck")
    (d / "other.safetensors.index.json").write_text((d / "model.safetensors.index.json").read_text())
    assert find_checkpoint(d)[1] == d / "model.safetensors.index.json"


def test_several_non_default_indexes_refused(tmp_path):
    d = _two_file_index(tmp_path / "ck", "one.safetensors.index.json")
    (d / "two.safetensors.index.json").write_text((d / "one.safetensors.index.json").read_text())
    with pytest.raises(DistLoadError, match="several index files"):
        find_checkpoint(d)


def test_directory_with_single_model_safetensors(tmp_path):
    f = _save(tmp_path / "ck" / "model.safetensors", {"w": torch.randn(3, 2), "b": torch.randn(2)})
    (tmp_path / "ck" / "config.json").write_text("{}")
    root, index, files = find_checkpoint(f.parent)
    assert (root, index, files) == (f.parent, None, ["model.safetensors"])
    ck = read_checkpoint(f.parent)
    assert sorted(ck.keys()) == ["b", "w"] and ck.warnings == () and ck.missing_in_files == ()


def test_path_to_one_safetensors_file(tmp_path):
    f = _save(tmp_path / "ck" / "weights-v2.safetensors", {"w": torch.randn(3, 2)})
    _save(tmp_path / "ck" / "unrelated.safetensors", {"q": torch.randn(1)})  # not picked up
    root, index, files = find_checkpoint(f)
    assert (root, index, files) == (f.parent, None, ["weights-v2.safetensors"])
    assert read_checkpoint(f).keys() == ["w"]


def test_path_to_index_file(tmp_path):
    d = _two_file_index(tmp_path / "ck", "custom.safetensors.index.json")
    idx = d / "custom.safetensors.index.json"
    assert find_checkpoint(idx) == (d, idx, [])
    assert sorted(read_checkpoint(idx).keys()) == ["x", "y", "z"]


def test_index_file_only_reads_listed_files(tmp_path):
    d = _two_file_index(tmp_path / "ck")
    _save(d / "stray.safetensors", {"stray": torch.randn(2)})
    assert "stray" not in read_checkpoint(d).keys()


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "nope", "does not exist"),
    (lambda d: d, "no safetensors checkpoint"),
    (lambda d: (_save(d / "a.safetensors", {"a": torch.ones(1)}), _save(d / "b.safetensors", {"b": torch.ones(1)}), d)[2],
     "no \\*.safetensors.index.json"),
    (lambda d: ((d / "pytorch_model.bin").write_bytes(b"x"), d)[1], "pickle"),
    (lambda d: ((d / "weights.txt").write_text("x"), d / "weights.txt")[1], "not a safetensors checkpoint"),
])
def test_discovery_refusals(tmp_path, make, match):
    with pytest.raises(DistLoadError, match=match):
        find_checkpoint(make(tmp_path))


# ---- parse_header ----------------------------------------------------------


def _raw(tensors, **kw) -> tuple[bytes, int]:
    """(header bytes, whole file size) for hand-written tensors."""
    blob = st_bytes(tensors, **kw)
    (hlen,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + hlen], len(blob)


def test_parse_header_happy_path():
    raw, size = _raw({
        "b": ("BF16", [2, 2], b"\x01" * 8),
        "a": ("F32", [3], b"\x02" * 12),
        "scalar": ("I64", [], b"\x03" * 8),
        "empty": ("F16", [0, 7], b""),
        "flag": ("BOOL", [1], b"\x01"),
    }, metadata={"format": "pt"})
    shard = parse_header(raw, size, "hand.safetensors")
    assert shard.name == "hand.safetensors" and shard.size == size
    assert shard.data_offset == 8 + len(raw)
    # sorted by start offset, __metadata__ skipped
    assert [(t.name, t.dtype, t.shape, t.start, t.end) for t in shard.tensors] == [
        ("b", "BF16", (2, 2), 0, 8),
        ("a", "F32", (3,), 8, 20),
        ("scalar", "I64", (), 20, 28),
        ("empty", "F16", (0, 7), 28, 28),
        ("flag", "BOOL", (1,), 28, 29),
    ]
    assert sum(t.nbytes for t in shard.tensors) == size - shard.data_offset


def test_parse_header_agrees_with_safetensors(tmp_path):
    tensors = {"w": torch.randn(7, 5), "h": torch.randn(3).half(), "i": torch.arange(4, dtype=torch.int32)}
    f = _save(tmp_path / "m.safetensors", tensors)
    shard = read_header(f)
    blob = f.read_bytes()
    ref = load_file(f)
    assert {t.name for t in shard.tensors} == set(ref)
    for t in shard.tensors:
        want = ref[t.name].reshape(-1).view(torch.uint8).numpy().tobytes()
        assert blob[shard.data_offset + t.start : shard.data_offset + t.end] == want
        assert t.shape == tuple(ref[t.name].shape)


def test_parse_header_padded_with_spaces():
    # safetensors pads headers with spaces to an 8-byte boundary; that is valid JSON whitespace
    raw, size = _raw({"a": ("U8", [3], b"abc")})
    padded = raw + b"   "
    shard = parse_header(padded, size + 3, "p.safetensors")
    assert shard.data_offset == 8 + len(padded)


@pytest.mark.parametrize("mutate,match", [
    (lambda raw, size: (b"not json", size), "does not start with"),
    (lambda raw, size: (raw, size + 4), "trailing bytes"),
    (lambda raw, size: (raw.replace(b'"F32"', b'"F99"'), size), "unknown dtype"),
    (lambda raw, size: (raw.replace(b"[2, 2]", b"[2, 3]"), size), r"needs 24"),
])
def test_parse_header_representative_refusals(mutate, match):
    raw, size = _raw({"m": ("F32", [2, 2], b"\x00" * 16)})
    bad, bad_size = mutate(raw, size)
    with pytest.raises(DistLoadError, match=match) as exc:
        parse_header(bad, bad_size, "bad.safetensors")
    assert "bad.safetensors" in str(exc.value)


def test_read_header_names_file_on_truncation(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(st_bytes({"m": ("F32", [4], b"\x00" * 16)})[:-3])
    with pytest.raises(DistLoadError, match="t.safetensors"):
        read_header(f)


# ---- index cross-checks ----------------------------------------------------


def test_total_size_correct_gives_no_warning(tmp_path):
    ck = read_checkpoint(_two_file_index(tmp_path / "ck", total_size=DATA_BYTES))
    assert ck.warnings == ()


def test_total_size_absent_is_a_warning(tmp_path):
    ck = read_checkpoint(_two_file_index(tmp_path / "ck"), strict=True)
    assert len(ck.warnings) == 1 and "no metadata.total_size" in ck.warnings[0]
    assert ck.total_bytes == DATA_BYTES


@pytest.mark.parametrize("stale", [DATA_BYTES + 1, 0, 10**12])
def test_total_size_stale_is_a_warning(tmp_path, stale):
    ck = read_checkpoint(_two_file_index(tmp_path / "ck", total_size=stale), strict=True)
    assert len(ck.warnings) == 1 and f"total_size={stale}" in ck.warnings[0]
    assert ck.total_bytes == DATA_BYTES


def test_total_size_of_wrong_type_is_a_warning(tmp_path):
    ck = read_checkpoint(_two_file_index(tmp_path / "ck", total_size="big"))
    assert len(ck.warnings) == 1
    assert read_index(tmp_path / "ck" / "model.safetensors.index.json")[1] is None


def test_sized_builder_total_size_matches(tmp_path):
    assert read_checkpoint(write_sized(tmp_path / "s", [4, 2, 1])).warnings == ()
    assert len(read_checkpoint(write_sized(tmp_path / "t", [4, 2], total_size=False)).warnings) == 1


def _index_with_ghost(d: Path) -> Path:
    _two_file_index(d, total_size=DATA_BYTES)
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    doc["weight_map"]["ghost.weight"] = "b.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    return d


def test_index_key_missing_from_file_strict(tmp_path):
    d = _index_with_ghost(tmp_path / "ck")
    with pytest.raises(DistLoadError) as exc:
        read_checkpoint(d, strict=True)
    assert "'ghost.weight'" in str(exc.value) and "b.safetensors" in str(exc.value)


def test_index_key_missing_from_file_non_strict(tmp_path):
    ck = read_checkpoint(_index_with_ghost(tmp_path / "ck"), strict=False)
    assert isinstance(ck, Checkpoint)
    assert ck.missing_in_files == ("ghost.weight",)
    assert sorted(ck.keys()) == ["x", "y", "z"]
    assert ck.total_bytes == DATA_BYTES


def test_file_tensor_not_in_index(tmp_path):
    d = _two_file_index(tmp_path / "ck", total_size=DATA_BYTES)
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    del doc["weight_map"]["z"]
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(DistLoadError, match="'z'.*does not list"):
        read_checkpoint(d, strict=True)
    ck = read_checkpoint(d, strict=False)
    assert "z" in ck.keys()  # still loaded, with a warning
    assert any("'z'" in w for w in ck.warnings)


def test_tensor_in_two_files_refused(tmp_path):
    d = tmp_path / "ck"
    _save(d / "a.safetensors", {"x": torch.ones(2)})
    _save(d / "b.safetensors", {"x": torch.ones(2), "y": torch.ones(1)})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    for strict in (True, False):
        with pytest.raises(DistLoadError, match="'x' is in both"):
            read_checkpoint(d, strict=strict)


# ---- dtypes: sizes of every safetensors dtype, sub-byte ones included ---------


@pytest.mark.parametrize("dtype,shape,nbytes,torch_shape", [
    ("F8_E4M3", [2, 3], 6, (2, 3)),
    ("F8_E5M2", [4], 4, (4,)),
    ("F8_E8M0", [5], 5, (5,)),
    ("F8_E4M3FNUZ", [1, 2], 2, (1, 2)),
    ("F8_E5M2FNUZ", [3], 3, (3,)),
    ("F4", [3, 8], 12, (3, 4)),  # 24 four-bit values; torch holds pairs: float4_e2m1fn_x2 [3, 4]
    ("F4", [0], 0, (0,)),
    ("F6_E2M3", [8], 6, (8,)),  # 48 bits; torch has no F6 dtype (refused when loaded, not here)
    ("U16", [3], 6, (3,)), ("U32", [3], 12, (3,)), ("U64", [3], 24, (3,)),
    ("I8", [3], 3, (3,)), ("I16", [3], 6, (3,)), ("BOOL", [2], 2, (2,)), ("C64", [2], 16, (2,)),
])
def test_parse_header_sizes_every_dtype(dtype, shape, nbytes, torch_shape):
    raw, size = _raw({"t": (dtype, shape, b"\x00" * nbytes)})
    (t,) = parse_header(raw, size, "d.safetensors").tensors
    assert (t.dtype, t.shape, t.nbytes) == (dtype, torch_shape, nbytes)


def test_parse_header_f4_agrees_with_safetensors(tmp_path):
    t = torch.arange(24, dtype=torch.uint8).reshape(3, 8).view(torch.float4_e2m1fn_x2)
    f = _save(tmp_path / "f4.safetensors", {"w": t})
    (entry,) = read_header(f).tensors
    assert entry.shape == tuple(load_file(f)["w"].shape) == (3, 8) and entry.nbytes == 24


@pytest.mark.parametrize("dtype,shape,nbytes,match", [
    ("F4", [3], 2, "12 bits, not a whole number of bytes"),
    ("F4", [], 1, "4 bits, not a whole number of bytes"),
    ("F4", [2, 3], 3, "last dimension divisible by 2"),
    ("F6_E3M2", [3], 3, "18 bits, not a whole number of bytes"),
    ("F4", [4], 4, "needs 2"),
])
def test_parse_header_refuses_sub_byte_sizes_naming_the_tensor(dtype, shape, nbytes, match):
    raw, size = _raw({"q.weight": (dtype, shape, b"\x00" * nbytes)})
    with pytest.raises(DistLoadError, match=match) as exc:
        parse_header(raw, size, "sub.safetensors")
    assert "'q.weight'" in str(exc.value) and "sub.safetensors" in str(exc.value)


# ---- caps across the whole checkpoint ------------------------------------------


def _many_files(d: Path, n_files: int, per_file: int = 1) -> Path:
    """``n_files`` hand-written files of ``per_file`` one-byte tensors each, and their index."""
    d.mkdir(parents=True)
    wmap = {}
    for i in range(n_files):
        tensors = {f"t{i}.{j}": ("U8", [1], bytes([j])) for j in range(per_file)}
        (d / f"f{i}.safetensors").write_bytes(st_bytes(tensors))
        wmap.update({k: f"f{i}.safetensors" for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return d


def test_index_naming_too_many_files_is_refused_before_opening_any(tmp_path, monkeypatch):
    d = _many_files(tmp_path / "ck", 3)
    monkeypatch.setattr(header, "MAX_FILES", 2)
    monkeypatch.setattr(header, "header_from", lambda *a, **k: pytest.fail("opened a file"))
    with pytest.raises(DistLoadError, match="names 3 files, over the 2 file limit"):
        read_checkpoint(d)


def test_index_listing_too_many_tensors_is_refused(tmp_path, monkeypatch):
    d = _many_files(tmp_path / "ck", 2, per_file=2)
    monkeypatch.setattr(header, "MAX_TENSORS", 3)
    with pytest.raises(DistLoadError, match="lists 4 tensors, over the 3 tensor limit"):
        read_checkpoint(d)


def test_files_holding_too_many_tensors_together_are_refused(tmp_path, monkeypatch):
    # the index lists few tensors, the headers hold more (unlisted: a warning without strict)
    d = _many_files(tmp_path / "ck", 2, per_file=2)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"t0.0": "f0.safetensors", "t1.0": "f1.safetensors"}}))
    monkeypatch.setattr(header, "MAX_TENSORS", 3)
    with pytest.raises(DistLoadError, match="over 3 tensors"):
        read_checkpoint(d, strict=False)


def test_one_header_with_too_many_tensors_is_refused(monkeypatch):
    raw, size = _raw({f"t{i}": ("U8", [1], b"\x00") for i in range(5)}, metadata={"format": "pt"})
    monkeypatch.setattr(header, "MAX_TENSORS", 4)
    with pytest.raises(DistLoadError, match="5 header entries exceed the 4 tensor limit"):
        parse_header(raw, size, "many.safetensors")


def test_headers_over_the_total_header_byte_cap_are_refused(tmp_path, monkeypatch):
    d = _many_files(tmp_path / "ck", 3)
    one = len(json.dumps({"t0.0": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}))
    monkeypatch.setattr(header, "MAX_TOTAL_HEADER_BYTES", 2 * one + 5)  # room for two headers, not three
    with pytest.raises(DistLoadError, match="f2.safetensors: header length .* limit on all headers together"):
        read_checkpoint(d)
    monkeypatch.setattr(header, "MAX_TOTAL_HEADER_BYTES", 3 * one)
    assert len(read_checkpoint(d).files) == 3


# ---- opening: the file opened is the file checked ------------------------------


def test_a_file_swapped_between_check_and_open_is_refused(tmp_path, monkeypatch):
    d = _two_file_index(tmp_path / "ck")
    other = _save(tmp_path / "other.safetensors", {"x": torch.zeros(2, 3)})
    real_open = files.open_regular

    def swap_then_open(path):
        os.replace(other, path)  # a different file now sits under the checked name
        return real_open(path)

    monkeypatch.setattr(files, "open_regular", swap_then_open)
    with pytest.raises(DistLoadError, match="a.safetensors changed between checking and opening"):
        files.open_checked(d, "a.safetensors")


def test_open_checked_returns_the_checked_file(tmp_path):
    d = _two_file_index(tmp_path / "ck")
    fd, path = files.open_checked(d, "b.safetensors")
    try:
        assert path == d / "b.safetensors"
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
    finally:
        os.close(fd)


# ---- the Hugging Face cache layout --------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str = "org/tiny") -> Path:
    """``_two_file_index`` laid out as the hub cache does: blobs, a snapshot of relative links, refs/main."""
    src = _two_file_index(cache.parent / "src")
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        os.replace(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def test_a_cache_snapshot_with_links_into_its_blobs_loads(tmp_path):
    snap = _cache_repo(tmp_path / "hub")
    ck = read_checkpoint(snap)
    assert sorted(ck.keys()) == ["x", "y", "z"] and ck.root == str(snap)


def test_a_snapshot_link_escaping_the_cache_repo_folder_is_refused(tmp_path):
    snap = _cache_repo(tmp_path / "hub")
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(snap / "b.safetensors", outside)
    (snap / "b.safetensors").symlink_to(outside)
    with pytest.raises(DistLoadError, match="outside the checkpoint directory .* or its Hugging Face cache folder"):
        read_checkpoint(snap)


def test_a_snapshot_link_into_another_cached_repo_is_refused(tmp_path):
    snap = _cache_repo(tmp_path / "hub")
    other = _cache_repo(tmp_path / "hub2" / "hub", "org/other")
    target = os.path.realpath(other / "b.safetensors")
    (snap / "b.safetensors").unlink()
    (snap / "b.safetensors").symlink_to(target)
    with pytest.raises(DistLoadError, match="outside the checkpoint directory"):
        read_checkpoint(snap)


def test_index_names_escaping_a_snapshot_are_still_refused(tmp_path):
    snap = _cache_repo(tmp_path / "hub")
    idx = snap / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["y"] = doc["weight_map"]["z"] = "../../blobs/" + os.readlink(snap / "b.safetensors").split("/")[-1]
    idx.unlink()
    idx.write_text(json.dumps(doc))
    with pytest.raises(DistLoadError, match="refusing file name"):
        read_checkpoint(snap)


def test_a_repo_id_resolves_from_the_cache_only(tmp_path, monkeypatch):
    snap = _cache_repo(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert discover.resolve_checkpoint("org/tiny") == snap
    assert discover.resolve_checkpoint("org/tiny", revision="main") == snap
    assert discover.resolve_checkpoint("org/tiny", revision=COMMIT) == snap
    assert sorted(read_checkpoint("org/tiny").keys()) == ["x", "y", "z"]
    assert discover.local_root("org/tiny") == snap


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    snap = _cache_repo(tmp_path / "home" / "hub")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert discover.resolve_checkpoint("org/tiny") == snap


@pytest.mark.parametrize("repo,revision", [("org/absent", None), ("org/tiny", "v9")])
def test_an_uncached_repo_id_says_how_to_download_it(tmp_path, monkeypatch, repo, revision):
    _cache_repo(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistLoadError) as exc:
        discover.resolve_checkpoint(repo, revision=revision)
    msg = str(exc.value)
    assert f"{repo}" in msg and "not in the local Hugging Face cache" in msg and "never downloads" in msg
    assert f"hf download {repo}" in msg and f"huggingface-cli download {repo}" in msg
    assert str(tmp_path / "hub") in msg


def test_a_missing_path_that_is_no_repo_id_is_a_plain_error(tmp_path):
    for p in (tmp_path / "nope", "a/b/c", "./x/y"):
        with pytest.raises(DistLoadError, match="does not exist"):
            discover.resolve_checkpoint(p)
