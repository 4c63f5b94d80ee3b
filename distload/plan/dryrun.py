"""Plan size and planning time at a world size this process does not have (``--dry-run --world N``).

Pure and process-local: it emulates ``N`` ranks (``per_node`` to a node)
without a process group. The coordinator's work (read every header, assign
files, build the plan, pickle it) runs once; then the exact bytes the plan
broadcast would send are unpickled as a few chosen ranks would (rank 0, the
last file owner, the last rank), each deriving its own schedule: the
broadcast chunks, and with ``sharded`` its scatter chunks, its parts of each
and its slice reads. ``sharded`` gives every tensor a synthetic FSDP2 layout,
``Shard(0)`` over all ``N`` ranks, so the sharded schedule is measured too.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

from ..format.header import read_checkpoint
from ..storage.mounts import is_local_storage
from .items import RankInfo
from .load_plan import DEFAULT_BUCKET_MB, LoadPlan, build_plan
from .shard import Layout, Placement, Sharding, layout_of
from .shard_plan import build_shard_plan


@dataclass(frozen=True)
class PlanCost:
    """What one emulated plan costs."""

    world: int
    mode: str  # "replicated" | "sharded"
    tensors: int
    files: int
    plan_bytes: int  # what every rank receives (the pickle the plan broadcast sends)
    coordinator_s: float  # rank 0: headers, assignment, plan, pickle (wall seconds)
    rank_s: dict[int, float]  # rank -> wall seconds to unpickle and derive its own schedule
    coordinator_cpu_s: float  # the same in CPU seconds of this process (what a loaded machine does not inflate)
    rank_cpu_s: dict[int, float]
    chunks: int  # broadcast chunks
    scatters: int  # scatter chunks (sharded)
    slices: int  # slice reads of the slowest measured rank (sharded)
    send_bytes: int = 0  # the largest padded scatter send buffer (sharded): seg_bytes x world

    @property
    def rank0_s(self) -> float:
        """Planning seconds on rank 0, the slowest rank: the coordinator's work plus its own schedule."""
        return self.coordinator_s + self.rank_s[0]

    def line(self) -> str:
        worst = max((r for r in self.rank_s if r), key=lambda r: self.rank_s[r], default=0)
        return (f"world {self.world:>6} {self.mode:<10} plan {self.plan_bytes / 1e6:6.3f} MB per rank; "
                f"planning {self.rank0_s:5.2f} s on rank 0 (cpu {self.coordinator_cpu_s + self.rank_cpu_s[0]:.2f} s: "
                f"coordinator {self.coordinator_cpu_s:.2f} + own schedule {self.rank_cpu_s[0]:.2f}), "
                f"{self.rank_s[worst]:.2f} s on rank {worst} (cpu {self.rank_cpu_s[worst]:.2f} s); "
                f"{self.chunks} broadcast chunk(s), {self.scatters} scatter(s), {self.slices} slice read(s) per rank"
                + (f"; largest padded send buffer {self.send_bytes / 1e9:.2f} GB" if self.scatters else ""))


def emulated_ranks(world: int, per_node: int = 8) -> list[RankInfo]:
    return [RankInfo(r, f"node{r // per_node}", r % per_node) for r in range(world)]


def fsdp_layouts(plan: LoadPlan) -> dict[str, Layout]:
    """``Shard(0)`` over every rank for every tensor, as FSDP2 lays out a 1-D mesh (one shared Sharding)."""
    sharding = Sharding(tuple(range(plan.world_size)), (plan.world_size,), (Placement("shard", 0),))
    memo: dict[tuple[int, ...], Layout] = {}
    out = {}
    for f in plan.files:
        for t in f.tensors:
            if t.shape not in memo:
                memo[t.shape] = layout_of(t.shape, sharding, plan.world_size)
            out[t.name] = memo[t.shape]
    return out


def derive(blob: bytes, rank: int) -> tuple[LoadPlan, int]:
    """(one rank) Unpickle the plan and derive everything this rank walks; returns it and its slice reads."""
    plan: LoadPlan = pickle.loads(blob)
    plan.chunks  # noqa: B018 - derived on first use
    plan.dtypes  # noqa: B018
    slices = 0
    sp = plan.sharded
    if sp is not None:
        for chunk in sp.scatters:
            chunk.parts_of(rank)
        slices = len(sp.slices_of(rank))
        for layout in sp.layouts.values():  # what a rank checks its local shards against
            layout.local_shape(rank)
    return plan, slices


def measure(path: str, world: int, *, sharded: bool, per_node: int = 8, bucket_mb: float = DEFAULT_BUCKET_MB,
            read_policy: str = "auto") -> PlanCost:
    """Plan ``path`` for an emulated world of ``world`` ranks and time each side."""
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = read_checkpoint(path)
    plan = build_plan(ckpt, emulated_ranks(world, per_node), bucket_mb=bucket_mb,
                      wanted=set() if sharded else None)
    if sharded:
        sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                              bucket_bytes=plan.bucket_bytes, read_policy=read_policy,
                              local_storage=is_local_storage(ckpt.root))
        plan = LoadPlan(plan.root, plan.world_size, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                        plan.missing_in_files, plan.warnings, plan.moved, sp)
    blob = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
    coordinator_s, coordinator_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ranks = sorted({0, max(plan.owners), world - 1})
    rank_s: dict[int, float] = {}
    rank_cpu_s: dict[int, float] = {}
    slices = 0
    got = plan
    for r in ranks:
        t, c = time.perf_counter(), time.process_time()
        got, n = derive(blob, r)
        rank_s[r], rank_cpu_s[r] = time.perf_counter() - t, time.process_time() - c
        slices = max(slices, n)
    return PlanCost(world, "sharded" if sharded else "replicated", sum(len(f.tensors) for f in plan.files),
                    len(plan.files), len(blob), coordinator_s, rank_s, coordinator_cpu_s, rank_cpu_s, len(got.chunks),
                    len(got.sharded.scatters) if got.sharded is not None else 0, slices,
                    got.sharded.send_bytes if got.sharded is not None else 0)
