"""Pure tests of distload/plan/load_plan.py: file assignment, chunking and the shared schedule."""

from __future__ import annotations

import random

import pytest

from distload.format.header import Checkpoint, ShardFile, TensorEntry
from distload.plan.load_plan import assign_files, build_plan, chunk_file
from distload.plan.items import Chunk, Piece, RankInfo, interleave

HEADER = 100  # pretend every header is this long: data starts at 8 + HEADER


def shard(name: str, sizes: list[int] | None = None, *, size: int | None = None, prefix: str | None = None) -> ShardFile:
    """A ShardFile holding tensors of the given byte sizes (U8, 1-D), packed in order."""
    if sizes is None:
        sizes = [size - 8 - HEADER]
    tensors, pos = [], 0
    for i, n in enumerate(sizes):
        tensors.append(TensorEntry(f"{prefix or name}.t{i}", "U8", (n,), pos, pos + n))
        pos += n
    return ShardFile(name=name, size=8 + HEADER + pos, data_offset=8 + HEADER, tensors=tuple(tensors))


def ranks(n: int, hosts: list[str] | None = None) -> list[RankInfo]:
    hosts = hosts or ["node"] * n
    local: dict[str, int] = {}
    out = []
    for r in range(n):
        out.append(RankInfo(r, hosts[r], local.get(hosts[r], 0)))
        local[hosts[r]] = local.get(hosts[r], 0) + 1
    return out


def loads(files, owners, world) -> list[int]:
    out = [0] * world
    for f, o in zip(files, owners):
        out[o] += f.size
    return out


# ---- assignment --------------------------------------------------------------


def test_largest_file_first_onto_least_loaded_rank():
    files = tuple(shard(f"f{i}", size=s) for i, s in enumerate([1000, 900, 800, 700, 150]))
    # 1000 -> r0, 900 -> r1, 800 -> r1 (900 < 1000), 700 -> r0 (1000 < 1700), 150 -> r0 (1700 == 1700: lowest)
    assert assign_files(files, ranks(2)) == (0, 1, 1, 0, 0)


def test_assignment_is_deterministic_and_independent_of_input_order():
    rng = random.Random(0)
    files = [shard(f"model-{i:05d}.safetensors", size=rng.choice([500, 1000, 1000, 2000, 3000])) for i in range(23)]
    base = dict(zip((f.name for f in files), assign_files(tuple(files), ranks(5))))
    for _ in range(5):
        rng.shuffle(files)
        shuffled_ranks = ranks(5)
        rng.shuffle(shuffled_ranks)
        again = dict(zip((f.name for f in files), assign_files(tuple(files), shuffled_ranks)))
        assert again == base
    # same inputs, same answer, also through build_plan
    ck = Checkpoint("/ck", tuple(sorted(files, key=lambda f: f.name)))
    assert build_plan(ck, ranks(5)).owners == build_plan(ck, ranks(5)).owners


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_bytes_are_balanced(world):
    rng = random.Random(world)
    files = tuple(shard(f"f{i:03d}", size=rng.randint(1_000, 100_000)) for i in range(40))
    load = loads(files, assign_files(files, ranks(world)), world)
    assert sum(load) == sum(f.size for f in files)
    # longest-processing-time-first: the spread is at most one file
    assert max(load) - min(load) <= max(f.size for f in files)
    assert max(load) <= sum(load) / world + max(f.size for f in files)


def test_equal_files_spread_one_per_rank():
    files = tuple(shard(f"f{i}", size=5000) for i in range(8))
    assert sorted(assign_files(files, ranks(8))) == list(range(8))
    assert loads(files, assign_files(files, ranks(4)), 4) == [10000] * 4


def test_more_ranks_than_files_extra_ranks_read_nothing():
    files = (shard("a", size=3000), shard("b", size=2000))
    plan = build_plan(Checkpoint("/ck", files), ranks(5))
    assert plan.owners == (0, 1)
    for r in (2, 3, 4):
        assert plan.files_of(r) == [] and plan.bytes_of(r) == 0
        assert not [c for c in plan.chunks if c.owner == r]
    assert plan.bytes_of(0) + plan.bytes_of(1) == plan.total_bytes
    assert plan.world_size == 5


def test_no_ranks_means_one_process_reads_everything():
    files = (shard("a", size=3000), shard("b", size=2000))
    plan = build_plan(Checkpoint("/ck", files), [])
    assert plan.world_size == 1 and plan.owners == (0, 0)
    assert plan.bytes_of(0) == plan.total_bytes


def test_node_aware_spreads_over_hosts_first():
    files = tuple(shard(f"f{i}", size=1000) for i in range(2))
    # ranks 0,1 on host A, ranks 2,3 on host B: two files go to two different hosts
    owners = assign_files(files, ranks(4, ["A", "A", "B", "B"]))
    assert sorted(owners) == [0, 2]
    # hosts interleaved across rank numbers
    owners = assign_files(files, ranks(4, ["A", "B", "A", "B"]))
    assert sorted(owners) == [0, 1]
    owners = assign_files(files, ranks(6, ["A", "A", "A", "B", "B", "B"]))
    assert sorted(owners) == [0, 3]


def test_node_aware_balances_nodes_then_ranks():
    files = tuple(shard(f"f{i}", size=1000) for i in range(8))
    info = ranks(8, ["A"] * 4 + ["B"] * 4)
    owners = assign_files(files, info)
    per_host = {"A": 0, "B": 0}
    for o in owners:
        per_host[info[o].host] += 1
    assert per_host == {"A": 4, "B": 4}
    assert sorted(owners) == list(range(8))
    # unequal nodes: one host with 1 rank, one with 3; bytes still split between the hosts
    info = ranks(4, ["A", "B", "B", "B"])
    files = tuple(shard(f"f{i}", size=1000) for i in range(6))
    owners = assign_files(files, info)
    assert sum(1 for o in owners if info[o].host == "A") == 3


def test_describe_lists_file_to_rank_and_bytes_per_rank():
    files = (shard("first.safetensors", size=3000), shard("second.safetensors", size=2000))
    text = build_plan(Checkpoint("/ck", files), ranks(3, ["h0", "h1", "h1"])).describe()
    assert "first.safetensors" in text and "second.safetensors" in text
    assert "-> rank 0" in text and "-> rank 1" in text
    for r in range(3):
        assert f"rank {r}" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("rank 2"))
    assert "h1" in line and "0 file(s)" in line


# ---- chunking -------------------------------------------------------------------


def _covered(chunks: list[Chunk], f: ShardFile) -> dict[str, list[tuple[int, int]]]:
    """tensor name -> sorted (tensor_offset, nbytes) ranges carried, checking chunk/piece geometry."""
    got: dict[str, list[tuple[int, int]]] = {}
    by_name = {t.name: t for t in f.tensors}
    for c in chunks:
        assert sum(p.nbytes for p in c.pieces) <= c.nbytes
        for p in c.pieces:
            t = by_name[p.name]
            # the piece's bytes are exactly where the tensor's bytes are in the file
            assert c.start + p.chunk_offset == f.data_offset + t.start + p.tensor_offset
            assert p.chunk_offset + p.nbytes <= c.nbytes
            got.setdefault(p.name, []).append((p.tensor_offset, p.nbytes))
    return {k: sorted(v) for k, v in got.items()}


def test_small_tensors_coalesced_into_buckets():
    f = shard("f", [100] * 25)  # 2500 bytes of small tensors
    chunks = chunk_file(0, f, 3, None, bucket_bytes=1024)
    assert all(c.nbytes <= 1024 and c.owner == 3 and c.file == 0 for c in chunks)
    assert len(chunks) == 3  # 10 + 10 + 5 tensors
    assert [len(c.pieces) for c in chunks] == [10, 10, 5]
    assert not any(c.direct for c in chunks)
    cov = _covered(chunks, f)
    assert cov == {t.name: [(0, 100)] for t in f.tensors}
    # chunks are contiguous file ranges, in file order
    assert chunks[0].start == f.data_offset
    for a, b in zip(chunks, chunks[1:]):
        assert b.start == a.start + a.nbytes


def test_large_tensors_split_into_direct_segments():
    f = shard("f", [10, 5000, 20, 1024, 300])
    chunks = chunk_file(0, f, 0, None, bucket_bytes=1024)
    assert all(c.nbytes <= 1024 for c in chunks)
    big = [c for c in chunks if c.pieces[0].name == "f.t1"]
    assert [c.nbytes for c in big] == [1024, 1024, 1024, 1024, 904]
    assert all(c.direct for c in big)
    assert [c.pieces[0].tensor_offset for c in big] == [0, 1024, 2048, 3072, 4096]
    exact = [c for c in chunks if c.pieces[0].name == "f.t3"]
    assert len(exact) == 1 and exact[0].direct and exact[0].nbytes == 1024
    # a quarter bucket or more travels alone
    quarter = [c for c in chunks if c.pieces[0].name == "f.t4"]
    assert len(quarter) == 1 and quarter[0].direct
    cov = _covered(chunks, f)
    assert cov["f.t1"] == [(o, min(1024, 5000 - o)) for o in range(0, 5000, 1024)]
    # every byte of every tensor, exactly once, in file order
    assert sum(c.nbytes for c in chunks) == sum(t.nbytes for t in f.tensors)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)


def test_small_tensors_around_large_ones_are_not_merged_across_them():
    f = shard("f", [10, 20, 4000, 30, 40])
    chunks = chunk_file(0, f, 0, None, bucket_bytes=1024)
    names = [[p.name for p in c.pieces] for c in chunks]
    assert names[0] == ["f.t0", "f.t1"] and names[-1] == ["f.t3", "f.t4"]


def test_unwanted_tensors_are_skipped():
    f = shard("f", [10, 20, 30, 5000, 40, 50])
    wanted = {"f.t0", "f.t2", "f.t4", "f.t5"}
    chunks = chunk_file(0, f, 0, wanted, bucket_bytes=1024)
    cov = _covered(chunks, f)
    assert set(cov) == wanted
    # a skipped tensor breaks coalescing: its bytes are never read
    skipped = {t.name: t for t in f.tensors if t.name not in wanted}
    for c in chunks:
        for t in skipped.values():
            lo, hi = f.data_offset + t.start, f.data_offset + t.end
            assert c.start + c.nbytes <= lo or c.start >= hi
    assert sum(c.nbytes for c in chunks) == 10 + 30 + 40 + 50


def test_nothing_wanted_means_no_chunks():
    assert chunk_file(0, shard("f", [10, 5000]), 0, set(), bucket_bytes=1024) == []


def test_zero_size_tensors_are_carried():
    f = shard("f", [0, 16, 0])
    chunks = chunk_file(0, f, 0, None, bucket_bytes=1024)
    assert set(_covered(chunks, f)) == {"f.t0", "f.t1", "f.t2"}


@pytest.mark.parametrize("mb,expect", [(64, 64 << 20), (0.001, 1024), (1e-9, 64), (0.0010001, 1024)])
def test_bucket_bytes_rounded_to_64(mb, expect):
    plan = build_plan(Checkpoint("/ck", (shard("f", [10]),)), ranks(1), bucket_mb=mb)
    assert plan.bucket_bytes == expect and plan.bucket_bytes % 64 == 0


# ---- the shared schedule --------------------------------------------------------


def test_interleave_keeps_every_owner_stream_in_order():
    rng = random.Random(3)
    streams = {}
    for r in range(4):
        n = rng.randint(0, 12)
        streams[r] = [Chunk(r, r, i * 1000, rng.randint(1, 1000), (Piece(f"{r}.{i}", 0, 0, 1),)) for i in range(n)]
    streams[5] = []
    out = interleave(streams)
    assert len(out) == sum(len(s) for s in streams.values())
    for r, s in streams.items():
        assert [c for c in out if c.owner == r] == s


def test_interleave_lets_least_sent_owner_go_next():
    mk = lambda r, n, k: [Chunk(r, r, i, n, (Piece(f"{r}.{i}", 0, 0, n),)) for i in range(k)]
    out = interleave({0: mk(0, 10, 3), 1: mk(1, 10, 3)})
    assert [c.owner for c in out] == [0, 1, 0, 1, 0, 1]
    out = interleave({0: mk(0, 30, 2), 1: mk(1, 10, 6)})
    assert [c.owner for c in out] == [0, 1, 1, 1, 0, 1, 1, 1]


def test_build_plan_schedule_covers_every_tensor_once():
    rng = random.Random(7)
    files = tuple(shard(f"model-{i:05d}.safetensors", [rng.choice([0, 8, 64, 300, 3000, 9000]) for _ in range(9)])
                  for i in range(6))
    ck = Checkpoint("/ck", files)
    plan = build_plan(ck, ranks(3), bucket_mb=1024 / (1 << 20))
    assert plan.bucket_bytes == 1024
    cov: dict[str, list[tuple[int, int]]] = {}
    for c in plan.chunks:
        assert c.owner == plan.owners[c.file] and c.nbytes <= 1024
        for p in c.pieces:
            cov.setdefault(p.name, []).append((p.tensor_offset, p.nbytes))
    for f in files:
        for t in f.tensors:
            pieces = sorted(cov.pop(t.name))
            pos = 0
            for off, n in pieces:
                assert off == pos
                pos += n
            assert pos == t.nbytes
    assert not cov
    assert sum(plan.bytes_of(r) for r in range(3)) == plan.total_bytes == ck.total_bytes
    # each owner reads its files in name order, each file front to back
    for r in range(3):
        mine = [(plan.files[c.file].name, c.start) for c in plan.chunks if c.owner == r]
        assert mine == sorted(mine)
    assert plan.dtypes == {t.name: "U8" for f in files for t in f.tensors}
    assert plan.shapes == {t.name: t.shape for f in files for t in f.tensors}


def test_build_plan_wanted_subset_and_warnings_travel():
    files = (shard("a", [100, 200]), shard("b", [300]))
    ck = Checkpoint("/ck", files, missing_in_files=("ghost",), warnings=("stale total_size",))
    plan = build_plan(ck, ranks(2), wanted={"a.t1", "b.t0"})
    assert {p.name for c in plan.chunks for p in c.pieces} == {"a.t1", "b.t0"}
    assert plan.total_bytes == 500
    assert plan.missing_in_files == ("ghost",) and plan.warnings == ("stale total_size",)
    assert plan.ranks == tuple(ranks(2))


@pytest.mark.parametrize("mb", [0, -1, float("nan")])
def test_bucket_size_must_be_positive(mb):
    from distload import DistLoadError

    with pytest.raises(DistLoadError, match="bucket_mb"):
        build_plan(Checkpoint("/ck", (shard("f", [10]),)), ranks(1), bucket_mb=mb)
