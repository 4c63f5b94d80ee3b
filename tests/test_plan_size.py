"""Pure tests of the plan's size and of each rank deriving its own schedule (no processes).

The reference here is the schedule as the coordinator used to spell it out
for every rank (world x chunks parts, every rank's slice reads); each rank's
derived schedule, after the plan's trip through pickle, must equal it.
"""

from __future__ import annotations

import math
import pickle
import random

import pytest

from benchmarks.fake_checkpoint import deepseek_v3_tensors
from distload.plan.dryrun import fsdp_layouts, measure
from distload.format.header import DTYPE_SIZES, Checkpoint, ShardFile, TensorEntry
from distload.plan.load_plan import LoadPlan, build_plan, wire_bytes
from distload.plan.items import RankInfo
from distload.plan.shard import Placement, Sharding, _enumerated_summary, _separable_summary, layout_of
from distload.plan.shard import intersect, length, position
from distload.plan.shard_plan import build_shard_plan

HEADER = 100


def _file(name: str, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> ShardFile:
    entries, pos = [], 0
    for tname, (dtype, shape) in tensors.items():
        n = DTYPE_SIZES[dtype] * math.prod(shape)
        entries.append(TensorEntry(tname, dtype, shape, pos, pos + n))
        pos += n
    return ShardFile(name, 8 + HEADER + pos, 8 + HEADER, tuple(entries))


def _ranks(world: int) -> list[RankInfo]:
    return [RankInfo(r, f"node{r // 2}", r % 2) for r in range(world)]


def _random_sharding(rng: random.Random, world: int, ndim: int, any_order: bool = False) -> Sharding:
    """A 1-D or 2-D mesh over some or all ranks, with Shard, strided Shard or Replicate placements.

    ``any_order``: meshes of either orientation whose ranks are in any order, not sorted.
    """
    if world >= 4 and rng.random() < (0.5 if any_order else 0.4):
        mesh_shape = (world // 2, 2) if any_order and rng.random() < 0.5 else (2, world // 2)
    else:
        mesh_shape = (rng.randint(1, world),)
    size = math.prod(mesh_shape)
    ranks = list(range(world))
    rng.shuffle(ranks)
    places = []
    for _ in mesh_shape:
        c = rng.random()
        if c < (0.25 if any_order else 0.2):
            places.append(Placement("replicate"))
        elif c < 0.85:
            places.append(Placement("shard", rng.randrange(ndim)))
        else:
            places.append(Placement("strided", rng.randrange(ndim), rng.randint(2, 3)))
    mesh = ranks[:size] if any_order else sorted(ranks[:size])
    return Sharding(tuple(mesh), mesh_shape, tuple(places))


def _random_checkpoint(rng: random.Random, world: int):
    """Files of F32 / BF16 / F8 tensors of uneven shapes, each with its own random sharding."""
    files, layouts = [], {}
    for fi in range(3):
        tensors = {}
        for ti in range(rng.randint(2, 6)):
            ndim = rng.randint(1, 3)
            shape = tuple(rng.choice([1, 3, 5, 7, 9, 16, 33]) for _ in range(ndim))
            name = f"f{fi}.t{ti}"
            tensors[name] = (rng.choice(["F32", "BF16", "F8_E4M3"]), shape)
            if rng.random() < 0.8:
                layouts[name] = layout_of(shape, _random_sharding(rng, world, ndim), world)
        files.append(_file(f"model-{fi:05d}.safetensors", tensors))
    return Checkpoint("/ck", tuple(files)), layouts


def _reference_parts(chunk, layouts, dtypes, world):
    """Every rank's parts of one scatter chunk, as the coordinator used to compute them."""
    out = []
    for rank in range(world):
        mine, off = [], 0
        for k, slab in enumerate(chunk.slabs):
            region = layouts[slab.name].regions[rank]
            if region is None or any(not r for r in region):
                continue
            rows = intersect(region[0], *slab.rows)
            if not rows:
                continue
            item = DTYPE_SIZES[dtypes[slab.name]]
            row_elems = math.prod(length(r) for r in region[1:])
            n = length(rows) * row_elems * item
            mine.append((k, slab.name, off, position(region[0], rows[0][0]) * row_elems * item, n, rows))
            off += n
        out.append(mine)
    return out


def _plan(ckpt, layouts, world, policy, bucket):
    plan = build_plan(ckpt, _ranks(world), bucket_mb=bucket / (1 << 20), wanted=set(ckpt.keys()) - set(layouts))
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=world, bucket_bytes=plan.bucket_bytes,
                          read_policy=policy)
    return LoadPlan(plan.root, plan.world_size, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                    plan.missing_in_files, plan.warnings, plan.moved, sp)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("policy", ["scatter", "slice"])
def test_each_ranks_derived_schedule_equals_the_full_one(world, policy):
    rng = random.Random(world * 10 + len(policy))
    for trial in range(6):
        ckpt, layouts = _random_checkpoint(rng, world)
        coordinator = _plan(ckpt, layouts, world, policy, bucket=rng.choice([64, 256, 4096]))
        dtypes = {t.name: t.dtype for f in ckpt.files for t in f.tensors}
        full = coordinator.sharded
        reference = [_reference_parts(c, full.layouts, dtypes, world) for c in full.scatters]
        for rank in range(world):
            mine = pickle.loads(pickle.dumps(coordinator))  # what the plan broadcast hands every rank
            assert mine.chunks == coordinator.chunks
            sp = mine.sharded
            assert sp.policies == full.policies
            assert [(c.file, c.owner, c.start, c.nbytes, c.slabs, c.recv_bound, c.send_bytes) for c in sp.scatters] \
                == [(c.file, c.owner, c.start, c.nbytes, c.slabs, c.recv_bound, c.send_bytes) for c in full.scatters]
            for chunk, ref in zip(sp.scatters, reference):
                got = [(p.slab, p.name, p.seg_offset, p.local_offset, p.nbytes, p.rows) for p in chunk.parts_of(rank)]
                assert got == ref[rank], (trial, rank)
                sizes = [sum(p[4] for p in parts) for parts in ref]
                assert chunk.recv_bound >= max(sizes)  # an upper bound every rank computes alike
                assert chunk.send_bytes == sum(sizes), "every holder's message, exactly"
                by_rank = chunk.parts_by_rank()  # the owner's walk over only the holders
                assert by_rank == {r: chunk.parts_of(r) for r in range(world) if ref[r]}
            assert sp.slices_of(rank) == tuple(c for c in full.slices if c.owner == rank)
            assert sp.bytes_of(rank) == sum(c.nbytes for c in full.scatters if c.owner == rank) + sum(
                c.nbytes for c in full.slices if c.owner == rank)


def test_segment_bound_is_exact_for_even_shard0_row_blocks():
    world = 4
    layouts = {"w": layout_of((64, 16), Sharding(tuple(range(world)), (world,), (Placement("shard", 0),)), world)}
    ckpt = Checkpoint("/ck", (_file("a.safetensors", {"w": ("F32", (64, 16))}),))
    sp = _plan(ckpt, layouts, world, "scatter", bucket=2048).sharded
    for chunk in sp.scatters:
        assert chunk.recv_bound == max(sum(p.nbytes for p in chunk.parts_of(r)) for r in range(world))


def test_layout_summary_in_closed_form_matches_looking_at_every_rank():
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        ndim = rng.randint(1, 3)
        shape = tuple(rng.choice([0, 1, 2, 3, 5, 7, 13]) for _ in range(ndim))
        world = rng.randint(1, 8)
        layout = layout_of(shape, _random_sharding(rng, world, ndim), world)
        fast = _separable_summary(layout)
        if fast is not None:
            checked += 1
            assert fast == _enumerated_summary(layout), (shape, layout.regions)
    assert checked > 500


def _checkpoint_of(tensors, files: int) -> Checkpoint:
    per = -(-len(tensors) // files)
    out = []
    for k in range(files):
        group = tensors[k * per:(k + 1) * per]
        out.append(_file(f"model-{k:05d}.safetensors", {n: (d, s) for n, d, s in group}))
    return Checkpoint("/ck", tuple(out))


@pytest.mark.parametrize("sharded", [False, True])
def test_plan_bytes_per_rank_do_not_grow_with_world(sharded):
    ckpt = _checkpoint_of([t for t in deepseek_v3_tensors() if ".layers.3." in t[0]], files=6)
    sizes = []
    for world in (8, 256, 4096, 16384):
        plan = build_plan(ckpt, _ranks(world), wanted=set() if sharded else None)
        if sharded:
            sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                                  bucket_bytes=plan.bucket_bytes)
            plan = LoadPlan(plan.root, world, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                            plan.missing_in_files, plan.warnings, plan.moved, sp)
        sizes.append(wire_bytes(plan))
    assert max(sizes) - min(sizes) <= 64, sizes


def test_plan_keeps_only_the_file_owners_rank_info_in_transit():
    ckpt = _checkpoint_of([t for t in deepseek_v3_tensors() if ".layers.0." in t[0]], files=3)
    plan = build_plan(ckpt, _ranks(64))
    got = pickle.loads(pickle.dumps(plan))
    assert len(plan.ranks) == 64 and {r.rank for r in got.ranks} == set(plan.owners)
    assert got.files == plan.files and got.chunks == plan.chunks and got.dtypes == plan.dtypes


def test_deepseek_v3_preset_has_the_real_checkpoints_tensors():
    tensors = deepseek_v3_tensors()
    assert len(tensors) == 91991 and len({n for n, _, _ in tensors}) == len(tensors)
    total = sum(DTYPE_SIZES[d] * math.prod(s) for _, d, s in tensors)
    assert 688e9 < total < 689e9
    kinds = {n: (d, s) for n, d, s in tensors}
    assert kinds["model.layers.3.mlp.experts.255.down_proj.weight"] == ("F8_E4M3", (7168, 2048))
    assert kinds["model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"] == ("F32", (56, 16))
    assert "model.layers.2.mlp.experts.0.up_proj.weight" not in kinds  # the first 3 layers are dense


def test_dry_run_measures_plan_bytes_and_seconds(tmp_path):
    from benchmarks.fake_checkpoint import write_fake_checkpoint
    from distload.load import main

    root = write_fake_checkpoint(tmp_path / "ck", files=12, layers=4)  # 3 dense layers, 1 MoE layer, MTP
    shards = list(root.glob("*.safetensors"))
    assert sum(p.stat().st_blocks for p in shards) * 512 < sum(p.stat().st_size for p in shards) / 1000  # sparse
    cost = measure(str(root), 64, sharded=True)
    assert cost.tensors == len(deepseek_v3_tensors(4)) and cost.files == 12 and 0 < cost.plan_bytes < 2_000_000
    assert cost.scatters > 0 and cost.rank0_s > 0
    assert main([str(root), "--dry-run", "--world", "16", "--bucket-mb", "256"]) == 0
