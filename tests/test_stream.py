"""stream_state_dict: tensors yielded one at a time on every rank, each file read once.

Real processes on gloo (``run_world``), worlds 1 to 3, every tensor compared
bit for bit with safetensors' own read; stopping early and consumer errors on
one rank; per-rank ``names=``; memory bounded by the buckets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distload
from ckpt import read_all, write_llama, write_sized, write_synthetic
from dist import run_world
from distload.format.header import read_checkpoint
from distload.plan.items import RankInfo
from distload.plan.load_plan import build_plan
from distload.plan.schedule import pieces_here, schedule
from distload.plan.stream_plan import Wishes, stream_plan, wanted_mask

TINY_MB = 4096 / (1 << 20)  # 4 KiB buckets: tensors split into segments and coalesced alike


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert _raw(got[k]) == _raw(w), k


# ---- children (every rank) -----------------------------------------------------------------


def _child_all(rank, world, path, bucket_mb, dtype=None):
    out, order = {}, []
    with distload.stream_state_dict(path, bucket_mb=bucket_mb, dtype=dtype) as tensors:
        for name, t in tensors:
            out[name] = t.clone()  # a view into a bucket: copy before the next step
            order.append(name)
    return out, order, tensors.bytes_read


def _child_raw(rank, world, path, dtype):
    return {n: (str(t.dtype), _raw(t)) for n, t in distload.stream_state_dict(path, dtype=dtype)}


def _child_names(rank, world, path, wanted):
    mine = wanted[rank]
    names = (lambda n: n in mine) if rank % 2 else sorted(mine)  # a predicate on odd ranks, a list on even
    s = distload.stream_state_dict(path, bucket_mb=TINY_MB, names=names)
    got = {n: t.clone() for n, t in s}
    return got, s.bytes_read


def _child_stop(rank, world, path, stopper, after):
    got = []
    try:
        s = distload.stream_state_dict(path, bucket_mb=TINY_MB)
        for name, _ in s:
            got.append(name)
            if rank == stopper and len(got) == after:
                break
        del s  # a break leaves the stream to the garbage collector, which closes it
        return ("ok", len(got))
    except distload.DistLoadError as e:
        return ("error", str(e), dict(e.failures), len(got))


def _child_raise(rank, world, path):
    try:
        with distload.stream_state_dict(path, bucket_mb=TINY_MB) as s:
            for i, _ in enumerate(s):
                if rank == world - 1 and i == 3:
                    raise ValueError("the consumer broke")
        return ("ok",)
    except ValueError as e:
        return ("own", str(e))
    except distload.DistLoadError as e:
        return ("error", str(e), sorted(e.failures))


def _child_all_stop(rank, world, path):
    s = distload.stream_state_dict(path, bucket_mb=TINY_MB)
    for i, _ in enumerate(s):
        if i == 4:
            s.close()
            break
    return "stopped"


def _child_close_first(rank, world, path):
    s = distload.stream_state_dict(path, bucket_mb=TINY_MB)
    if rank == 0:
        s.close("not needed here")
        return ("closed",)
    try:
        return ("ok", sum(1 for _ in s))
    except distload.DistLoadError as e:
        return ("error", str(e))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_memory(rank, world, path, bucket_mb):
    import gc

    stream = distload.stream_state_dict(path, bucket_mb=bucket_mb)  # planned: the group and transport are up
    gc.collect()
    base = peak = _rss()
    n = total = 0
    for _, t in stream:
        n += 1
        total += t.numel() * t.element_size()
        peak = max(peak, _rss())
    return n, total, peak - base


def _child_bad(rank, world, path):
    try:
        distload.stream_state_dict(path)
    except distload.DistLoadError as e:
        return e.phase, str(e)
    return None


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_tensor_equals_safetensors_read_in_one_order(tmp_path, world):
    path = write_synthetic(tmp_path / "s")
    want = read_all(path)
    results = run_world(_child_all, world, path, TINY_MB)
    for got, _, _ in results:
        _same(got, want)
    orders = [order for _, order, _ in results]
    assert all(o == orders[0] for o in orders)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    data = sum(t.numel() * t.element_size() for t in want.values())
    assert sum(r[2] for r in results) == data <= files  # each byte read once, by one rank


def test_sharded_llama_streams_bit_identical_at_world_3(tmp_path):
    path = write_llama(tmp_path / "llama", shard="100KB")
    want = read_all(path)
    for got, _, _ in run_world(_child_all, 3, path, 64 / 1024):
        _same(got, want)


def test_dtype_casts_floating_tensors_only(tmp_path):
    path = write_synthetic(tmp_path / "s")
    want = read_all(path)
    (got, _, _), = run_world(_child_all, 1, path, TINY_MB, torch.bfloat16)
    for k, w in want.items():
        assert got[k].dtype == (torch.bfloat16 if w.is_floating_point() else w.dtype), k
        assert torch.equal(got[k], w.to(got[k].dtype)), k


def test_each_rank_receives_only_what_it_asked_for_and_files_are_read_once(tmp_path):
    path = write_sized(tmp_path / "c", [40, 24, 12])  # layer0..2 .weight / .bias, one file each
    want = read_all(path)
    wanted = [{"layer0.weight", "layer1.bias"}, {"layer1.weight", "layer1.bias", "layer2.bias"},
              {"layer1.bias", "layer0.weight"}]
    results = run_world(_child_names, 3, path, wanted)
    for rank, (got, _) in enumerate(results):
        _same(got, {k: want[k] for k in wanted[rank]})
    asked = set().union(*wanted)
    assert sum(r[1] for r in results) == sum(want[k].numel() * want[k].element_size() for k in asked)


def test_a_rank_that_stops_early_ends_the_stream_on_every_rank(tmp_path):
    path = write_synthetic(tmp_path / "s")
    results = run_world(_child_stop, 3, path, 1, 2)
    assert results[1] == ("ok", 2)  # the rank that stopped stops quietly
    for r in (0, 2):
        kind, msg, failures, _ = results[r]
        assert kind == "error" and sorted(failures) == [1], results[r]
        assert "rank 1 stopped reading the stream" in msg


def test_a_consumer_error_on_one_rank_reaches_the_others(tmp_path):
    path = write_llama(tmp_path / "llama", shard="100KB")
    results = run_world(_child_raise, 3, path)
    assert results[2] == ("own", "the consumer broke")
    for r in (0, 1):
        kind, msg, failed = results[r]
        assert kind == "error" and failed == [2], results[r]
        assert "ValueError: the consumer broke" in msg


def test_every_rank_stopping_is_a_clean_stop(tmp_path):
    path = write_synthetic(tmp_path / "s")
    assert run_world(_child_all_stop, 3, path) == ["stopped"] * 3


def test_a_rank_closing_before_iterating_still_takes_part(tmp_path):
    path = write_synthetic(tmp_path / "s")
    results = run_world(_child_close_first, 2, path)
    assert results[0] == ("closed",)
    assert results[1][0] == "error" and "not needed here" in results[1][1]


def test_memory_is_bounded_by_the_buckets_not_the_checkpoint(tmp_path):
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    weight_map = {}
    for k in range(3):  # 48 MiB in 3 files, against buckets of 1 MiB
        part = {f"w{k}.{i}": torch.randn(1024, 256) for i in range(16)}
        save_file(part, str(ckpt / f"part{k}.safetensors"))
        weight_map.update(dict.fromkeys(part, f"part{k}.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for n, total, grew in run_world(_child_memory, 2, ckpt, 1.0):
        assert n == 48 and total == 48 << 20
        assert grew < 12 << 20, f"RSS grew by {grew / 2**20:.1f} MiB for a 48 MiB checkpoint"


def test_a_missing_checkpoint_fails_every_rank_in_the_plan(tmp_path):
    results = run_world(_child_bad, 2, tmp_path / "nope")
    assert all(r is not None and r[0] == "plan" and "does not exist" in r[1] for r in results)


# ---- the plan (pure) ---------------------------------------------------------------------------


def _plan(path: Path, world: int):
    ranks = [RankInfo(r, "h", r) for r in range(world)]
    return build_plan(read_checkpoint(path), ranks, bucket_mb=TINY_MB)


def test_plan_moves_each_tensor_to_exactly_the_ranks_that_want_it(tmp_path):
    path = write_synthetic(tmp_path / "s")
    base = _plan(path, 4)
    sizes = {t.name: t.nbytes for f in base.files for t in f.tensors}
    wanted = [None, {"big.weight", "ids"}, {"big.weight", "ids"}, {"scalar", "empty", "bf.weight"}]
    masks = [wanted_mask(base.files, w) for w in wanted]
    plan = stream_plan(base, Wishes((masks[0], masks[1], masks[3]), (0, 1, 1, 2)))
    for rank, w in enumerate(wanted):
        got: dict[str, int] = {}
        for step in schedule(plan, rank):
            for p in pieces_here(step, rank):
                got[p.name] = got.get(p.name, 0) + p.nbytes
        asked = set(sizes) if w is None else w
        assert got == {k: sizes[k] for k in asked if sizes[k]}, rank
    read = sum(s.item.nbytes for r in range(4) for s in schedule(plan, r) if s.item.owner == r)
    assert read == sum(sizes.values())  # every wanted byte read once, nothing else


def test_plan_gives_each_file_to_a_rank_that_wants_it(tmp_path):
    path = write_sized(tmp_path / "c", [40, 24, 12, 8])
    base = _plan(path, 2)
    stage = [lambda n: n[5] in "01", lambda n: n[5] in "23"]  # layer0/1 on rank 0, layer2/3 on rank 1
    masks = tuple(wanted_mask(base.files, s) for s in stage)
    plan = stream_plan(base, Wishes(masks, (0, 1)))
    assert [plan.owners[i] for i in range(4)] == [0, 0, 1, 1]
    assert plan.sharded is not None and not plan.sharded.scatters  # nothing crosses: every read is a slice


def test_names_the_checkpoint_lacks_are_refused_by_name(tmp_path):
    base = _plan(write_synthetic(tmp_path / "s"), 1)
    with pytest.raises(distload.DistLoadError, match="does not hold: nope"):
        wanted_mask(base.files, ["ids", "nope"])
    with pytest.raises(distload.DistLoadError, match="not the string"):
        wanted_mask(base.files, "ids")


def test_fp8_weights_and_their_scales_pass_through_unchanged(tmp_path):
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {"layer.weight": torch.randn(64, 32, generator=g).to(torch.float8_e4m3fn),
               "layer.weight_scale": torch.rand(64, 1, generator=g), "norm.weight": torch.randn(32, generator=g)}
    save_file(tensors, str(ckpt / "model.safetensors"))
    got, = run_world(_child_raw, 1, ckpt, torch.bfloat16)
    assert got["layer.weight"] == (str(torch.float8_e4m3fn), _raw(tensors["layer.weight"]))
    assert got["layer.weight_scale"] == (str(torch.float32), _raw(tensors["layer.weight_scale"]))  # kept as stored
    assert got["norm.weight"] == (str(torch.bfloat16), _raw(tensors["norm.weight"].to(torch.bfloat16)))
