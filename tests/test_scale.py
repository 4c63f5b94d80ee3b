"""Scale, from the planner alone (no processes): what moves, what each rank computes and sends, at worlds of
8 to 16,384. The planner figures must hold for the real transfers, which tests/test_scale_dist.py checks."""

from __future__ import annotations

import io
import json
import math
import random
from contextlib import redirect_stdout

import pytest

from benchmarks.fake_checkpoint import llama_70b_tensors, write_fake_checkpoint
from distload.format.header import DTYPE_SIZES, Checkpoint, ShardFile, TensorEntry
from distload.plan.control import LOAD_REPORT, PLAN, EXTRA_LENGTH, names_extra
from distload.plan.dryrun import wire_bytes
from distload.plan.items import RankInfo
from distload.plan.load_plan import LoadPlan, build_plan
from distload.plan.save_plan import OutTensor, contributions, own_parts
from distload.plan.save_plan import build_plan as build_save_plan
from distload.plan.shard import Layout, LazyRegions, Placement, Sharding, _meets_box, layout_of
from distload.plan.shard_plan import build_shard_plan
from test_plan_size import _random_sharding

BUCKET = 64 << 20
WORLDS = (8, 128, 1024, 16384)


def _file(name: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> ShardFile:
    entries, pos = [], 0
    for tname, dtype, shape in tensors:
        n = DTYPE_SIZES[dtype] * math.prod(shape)
        entries.append(TensorEntry(tname, dtype, shape, pos, pos + n))
        pos += n
    return ShardFile(name, 8 + 64 + pos, 8 + 64, tuple(entries))


def _llama_slice() -> Checkpoint:
    """Llama-70B's embedding, first layer, norm and head: every shape of the model, two files."""
    tensors = [t for t in llama_70b_tensors(1)]
    return Checkpoint("/ck", (_file("a.safetensors", tensors[:6]), _file("b.safetensors", tensors[6:])))


def _ranks(world: int, per_node: int = 8) -> list[RankInfo]:
    return [RankInfo(r, f"node{r // per_node}", r % per_node) for r in range(world)]


def _sharded_plan(ckpt: Checkpoint, world: int, sharding: Sharding, policy: str = "scatter") -> LoadPlan:
    plan = build_plan(ckpt, _ranks(world), bucket_mb=BUCKET >> 20, wanted=set())
    layouts = {t.name: layout_of(t.shape, _fit(sharding, len(t.shape)), world) for f in ckpt.files for t in f.tensors}
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=world, bucket_bytes=plan.bucket_bytes,
                          read_policy=policy, local_storage=False)
    return LoadPlan(plan.root, world, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                    plan.missing_in_files, plan.warnings, plan.moved, sp)


def _fit(sharding: Sharding, ndim: int) -> Sharding:
    """The sharding a tensor of ``ndim`` dims gets on the mesh: placements on dims it lacks replicate (a norm
    weight under column-wise tensor parallelism)."""
    places = tuple(p if p.dim < ndim else Placement("replicate") for p in sharding.placements)
    return Sharding(sharding.mesh, sharding.mesh_shape, places)


def _meshes(world: int) -> dict[str, Sharding]:
    half = world // 2
    return {
        "fsdp": Sharding(tuple(range(world)), (world,), (Placement("shard", 0),)),
        "hsdp": Sharding(tuple(range(world)), (2, half), (Placement("replicate"), Placement("shard", 0))),
        "fsdp_x_tp": Sharding(tuple(range(world)), (half, 2), (Placement("strided", 0, 2), Placement("shard", 0))),
        "tp_cols": Sharding(tuple(range(world)), (half, 2), (Placement("shard", 0), Placement("shard", 1))),
    }


# FSDP x TP's _StridedShard has no closed-form summary: every rank enumerates the mesh once per layout
# (seconds at 16,384), so that case stops at 1,024 here.
CASES = [(w, m) for w in WORLDS for m in ("fsdp", "hsdp", "fsdp_x_tp", "tp_cols") if w <= 1024 or m != "fsdp_x_tp"]


@pytest.mark.parametrize("world,mesh", CASES)
def test_scatter_wire_is_the_ideal_and_every_buffer_about_one_bucket(world, mesh):
    plan = _sharded_plan(_llama_slice(), world, _meshes(world)[mesh])
    sp = plan.sharded
    wire, ideal = wire_bytes(plan)
    assert wire == ideal, "exact messages: each holder gets its bytes, nobody gets padding"
    assert ideal == sum(  # every byte to every holder but what the file's owner holds
        t.nbytes * (2 if mesh == "hsdp" or (mesh == "tp_cols" and len(t.shape) == 1) else 1)
        - sp.layouts[t.name].local_numel(plan.owners[i]) * 2 for i, f in enumerate(plan.files) for t in f.tensors)
    for c in sp.scatters:  # the read, the send buffer and any one message stay within a bucket
        assert c.nbytes <= BUCKET and c.send_buffer <= BUCKET and c.recv_bound <= BUCKET
    biggest = max(sp.scatters, key=lambda c: c.send_bytes)
    assert biggest.send_bytes <= BUCKET


@pytest.mark.parametrize("world,mesh", CASES)
def test_an_owners_walk_gives_each_holder_exactly_what_it_derives_for_itself(world, mesh):
    plan = _sharded_plan(_llama_slice(), world, _meshes(world)[mesh])
    rng = random.Random(world)
    chunks = plan.sharded.scatters
    for c in [chunks[0], chunks[-1], *rng.sample(chunks, 6)]:
        by_rank = c.parts_by_rank()
        assert sum(p.nbytes for parts in by_rank.values() for p in parts) == c.send_bytes
        holders = sorted(by_rank)
        for r in {*holders[:3], *holders[-3:], *rng.sample(range(world), 8)}:
            assert c.parts_of(r) == by_rank.get(r, ()), (c.slabs[0], r)


def test_the_embedding_of_llama_70b_at_world_8_travels_once_not_eight_times():
    """The issue's figures: 15.7 GiB on the wire and a 512 MiB send buffer for this 2 GiB tensor."""
    tensors = llama_70b_tensors(0)[:1]
    plan = _sharded_plan(Checkpoint("/ck", (_file("a.safetensors", tensors),)), 8, _meshes(8)["fsdp"])
    size = 128256 * 8192 * 2
    assert wire_bytes(plan) == (size // 8 * 7, size // 8 * 7)
    assert max(c.send_buffer for c in plan.sharded.scatters) == BUCKET


class _Counting(LazyRegions):
    """Regions that count which ranks' regions were looked up."""

    __slots__ = ("seen",)

    def __init__(self, shape, sharding, world):
        super().__init__(shape, sharding, world)
        self.seen: set[int] = set()

    def _at(self, rank):
        self.seen.add(rank)
        return super()._at(rank)


def test_a_rank_derives_its_parts_from_its_own_region_only_at_world_16384():
    world = 16384
    sharding = _meshes(world)["fsdp"]
    ckpt = _llama_slice()
    counted: dict[tuple, _Counting] = {}

    def layout(shape):
        if shape not in counted:
            counted[shape] = _Counting(shape, sharding, world)
        return Layout(shape, counted[shape])

    plan = build_plan(ckpt, _ranks(world), bucket_mb=64, wanted=set())
    layouts = {t.name: layout(t.shape) for f in ckpt.files for t in f.tensors}
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=world, bucket_bytes=plan.bucket_bytes,
                          read_policy="scatter")
    for c in sp.scatters:
        c.parts_of(777)
        c.parts_by_rank()  # the owner's walk goes by mesh coordinates, not by looking at regions
    assert set().union(*(r.seen for r in counted.values())) == {777}


def test_a_save_sender_works_out_its_parts_from_its_own_region_only_at_world_16384():
    world = 16384
    sharding = _meshes(world)["hsdp"]
    tensors = llama_70b_tensors(1)
    outs = [OutTensor(n, n, d, s, tuple((0, x) for x in s)) for n, d, s in tensors]
    plan = build_save_plan(outs, {o.name: sharding for o in outs}, {o.name: o.shape for o in outs}, _ranks(world),
                           max_shard_size=5 * 10**9, bucket_bytes=BUCKET, stage="/x")
    seen: dict[tuple, _Counting] = {}
    for o in outs:  # what plan.layout caches, with counting regions
        key = (o.shape, sharding)
        if key not in seen:
            seen[key] = _Counting(o.shape, sharding, world)
            plan._layouts[key] = Layout(o.shape, seen[key])
    # Rank 808 is on replica 0, as every writer here is: it sends its rows (rank 8 + 8192 holds the same ones).
    sent = sum(len(own_parts(plan, c, 808)) for c in plan.chunks if c.remote and c.writer != 808)
    assert sent > 0 and set().union(*(r.seen for r in seen.values())) == {808}


def test_layout_meeting_finds_exactly_the_ranks_whose_region_meets_a_box():
    rng = random.Random(7)
    for _ in range(3000):
        world = rng.randint(1, 9)
        ndim = rng.randint(1, 3)
        shape = tuple(rng.choice([0, 1, 3, 5, 8, 13, 33]) for _ in range(ndim))
        parts = [_random_sharding(rng, world, ndim, any_order=True)]
        if world >= 4 and rng.random() < 0.2:  # two disjoint meshes, each holding the tensor once
            half = world // 2
            parts = [Sharding(tuple(range(half)), (half,), (Placement("shard", 0),)),
                     Sharding(tuple(range(half, 2 * half)), (half,), (Placement("shard", 0),))]
        layout = layout_of(shape, parts if len(parts) > 1 else parts[0], world)
        box = tuple(sorted((rng.randint(0, n), rng.randint(0, n))) for n in shape)
        want = [] if any(a >= b for a, b in box) else [
            (r, reg) for r, reg in enumerate(layout.regions) if reg is not None and all(reg) and _meets_box(reg, box)]
        assert layout.meeting(box) == want, (shape, parts, box)
        writer = rng.randrange(world)
        picked = layout.meeting(box, replica_of=writer)
        assert sorted(map(repr, {reg for _, reg in picked})) == sorted(map(repr, {reg for _, reg in want}))
        assert len(picked) == len({reg for _, reg in picked}), "one rank per distinct region"
        assert all((r, reg) in picked for r, reg in want if r == writer), "the writer sends what it holds"
        assert all(layout.sends_own(r, writer) == ((r, reg) in picked) for r, reg in want)


def test_each_save_sender_derives_alone_what_the_writer_expects_of_it():
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        world = rng.randint(2, 9)
        outs, shardings = [], {}
        for i in range(rng.randint(1, 4)):
            ndim = rng.randint(1, 3)
            shape = tuple(rng.choice([1, 3, 5, 8, 13]) for _ in range(ndim))
            outs.append(OutTensor(f"t{i}", f"t{i}", rng.choice(["F32", "BF16"]), shape, tuple((0, n) for n in shape)))
            if rng.random() < 0.85:
                shardings[f"t{i}"] = _random_sharding(rng, world, ndim, any_order=True)
        plan = build_save_plan(outs, shardings, {o.name: o.shape for o in outs}, _ranks(world, 2),
                               max_shard_size=rng.choice([64, 10**6]), bucket_bytes=rng.choice([64, 256, 1 << 20]),
                               stage="/x")
        for chunk in plan.chunks:
            if not chunk.remote:
                continue
            want = contributions(plan, chunk)  # also checks every element is covered once
            got = {r: own_parts(plan, chunk, r) for r in range(world) if r != chunk.writer}
            got = {r: parts for r, parts in got.items() if parts}
            if chunk.writer in want:
                got[chunk.writer] = want[chunk.writer]
            assert got == want, (chunk, shardings)
            checked += 1
    assert checked > 200


def _dry_run(path, world: int) -> list[dict]:
    from distload.load import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([str(path), "--model", "none", "--dry-run", "--world", str(world), "--json",
                     "--read-policy", "scatter"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


FIELDS = {"world", "mode", "planning_seconds", "save_planning_seconds", "plan_bytes_per_rank",
          "control_bytes_per_rank", "send_buffer_bytes", "receive_buffer_bytes", "wire_bytes", "ideal_wire_bytes",
          "collectives_per_rank"}


def test_dry_run_json_gives_every_field_per_mode_and_control_grows_only_by_rank_0s_records(tmp_path):
    root = write_fake_checkpoint(tmp_path / "ck", files=6, layers=3)  # the dense layers and the MTP module
    small, large = _dry_run(root, 64), _dry_run(root, 4096)
    assert [r["mode"] for r in small] == ["replicated", "sharded"] and all(FIELDS <= set(r) for r in small + large)
    for a, b in zip(small, large):
        assert b["wire_bytes"] == b["ideal_wire_bytes"] and b["send_buffer_bytes"] <= BUCKET
        assert a["plan_bytes_per_rank"] - 256 <= b["plan_bytes_per_rank"] <= a["plan_bytes_per_rank"] + 256
        # Rank 0 receives one record per rank in each gather and one name per node; nothing else grows.
        per_rank = PLAN.size + EXTRA_LENGTH.size + LOAD_REPORT.size
        grown = (4096 - 64) * per_rank + (4096 - 64) // 8 * len(names_extra("node511", "node511"))
        status = 2 * 4 * (b["status_exchanges"] - a["status_exchanges"])
        assert abs(b["control_bytes_per_rank"] - a["control_bytes_per_rank"] - grown - status) <= 4096, (a, b)
