"""A load (and a save) at a world size this process does not have: ``--dry-run --world N``.

Pure and process-local: it emulates ``N`` ranks (``per_node`` to a node)
without a process group, with the code a load runs. The coordinator's work
(read every header, assign files, build the plan, pickle the answer the plan
broadcast sends) runs once; then a few chosen ranks (rank 0, the last file
owner, the last rank) each unpickle those exact bytes and derive their own
schedule (:func:`~distload.plan.schedule.schedule`): the broadcast chunks,
and with ``sharded`` the scatter chunks, their own parts of each and their
slice reads; the last owner also walks the holders of each chunk it sends
(:meth:`~distload.plan.shard_plan.ScatterChunk.parts_by_rank`), as it will
during the transfer. ``sharded`` gives every tensor a synthetic FSDP2
layout, ``Shard(0)`` over all ``N`` ranks. The save plan of the same tensors
(same layouts) is built and walked by the same ranks.

What it reports (:meth:`PlanCost.record`, one JSON object per mode):

- bytes on the wire, summed over ranks, and the ideal (the bytes each rank
  needs and does not read itself), from the schedule's chunks: a broadcast
  chunk reaches every other rank, a scatter chunk sends each holder its
  exact message (:attr:`~distload.plan.shard_plan.ScatterChunk.wire_bytes`);
- the largest send and receive buffers the transfer loop sizes from that
  schedule;
- the control bytes a rank sends and receives in one load: its fixed-size
  records (:mod:`distload.plan.control`), the plan answer, the status
  exchanges the schedule implies, counted as their payloads (a gather counts
  every record at rank 0, a broadcast its payload on each rank, a status
  exchange one integer each way); the transport's own relays and headers are
  not counted;
- the data steps a rank takes part in, and the status exchanges.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

from ..format.header import read_checkpoint
from ..storage.mounts import is_local_storage
from .control import LOAD_REPORT, PLAN, STATUS_BYTES, names_extra, record_bytes
from .items import RankInfo
from .load_plan import DEFAULT_BUCKET_MB, LoadPlan, build_plan
from .save_plan import OutTensor, contributions, own_parts
from .save_plan import build_plan as build_save_plan
from .schedule import BROADCAST, SCATTER, schedule, status_exchanges
from .shard import Layout, Placement, Sharding, layout_of
from .shard_plan import build_shard_plan

# Status exchanges a load runs besides the transfer loop's: after opening files, and before the reports.
PHASE_EXCHANGES = 2
SAVE_MAX_SHARD = 5 * 10**9  # save_pretrained's default file size


@dataclass(frozen=True)
class PlanCost:
    """What one emulated load costs."""

    world: int
    mode: str  # "replicated" | "sharded"
    read_policy: str
    tensors: int
    files: int
    plan_bytes: int  # what every rank receives: the pickled plan answer
    coordinator_s: float  # rank 0: headers, assignment, plan, pickle (wall seconds)
    rank_s: dict[int, float]  # rank -> wall seconds to unpickle and derive its own schedule
    coordinator_cpu_s: float  # the same in CPU seconds of this process (what a loaded machine does not inflate)
    rank_cpu_s: dict[int, float]
    chunks: int  # broadcast chunks
    scatters: int  # scatter chunks (sharded)
    slices: int  # slice reads of the slowest measured rank (sharded)
    send_buffer_bytes: int = 0  # the largest send buffer any rank sizes
    receive_buffer_bytes: int = 0  # the largest message any rank can receive
    wire_bytes: int = 0  # bytes on the wire, summed over ranks
    ideal_wire_bytes: int = 0  # the bytes each rank needs and does not read itself, summed
    collectives: dict[int, int] = field(default_factory=dict)  # rank -> data steps it takes part in
    status: int = 0  # status exchanges (every rank)
    control: dict[int, int] = field(default_factory=dict)  # rank -> control bytes sent and received
    owner_walk_s: float = 0.0  # the last owner's walk over its chunks' holders (transfer time, CPU seconds)
    save_s: dict[int, float] = field(default_factory=dict)  # rank -> save planning CPU seconds (coordinator on 0)

    @property
    def rank0_s(self) -> float:
        """Planning seconds on rank 0, the slowest rank: the coordinator's work plus its own schedule."""
        return self.coordinator_s + self.rank_s[0]

    @property
    def planning_s(self) -> float:
        """The most planning CPU seconds of any measured rank (rank 0: the coordinator's work and its own)."""
        return max([self.coordinator_cpu_s + self.rank_cpu_s[0], *self.rank_cpu_s.values()])

    def record(self) -> dict:
        """The JSON fields (``--dry-run --world N --json``); seconds are CPU seconds of this process, which
        a busy machine does not inflate (a rank's planning runs on one core)."""
        return {
            "world": self.world, "mode": self.mode, "read_policy": self.read_policy, "tensors": self.tensors,
            "files": self.files,
            "planning_seconds": round(self.planning_s, 3),
            "save_planning_seconds": round(max(self.save_s.values(), default=0.0), 3),
            "plan_bytes_per_rank": self.plan_bytes,
            "control_bytes_per_rank": max(self.control.values(), default=0),
            "send_buffer_bytes": self.send_buffer_bytes,
            "receive_buffer_bytes": self.receive_buffer_bytes,
            "wire_bytes": self.wire_bytes,
            "ideal_wire_bytes": self.ideal_wire_bytes,
            "collectives_per_rank": max(self.collectives.values(), default=0),
            "status_exchanges": self.status,
            "broadcast_chunks": self.chunks, "scatter_chunks": self.scatters, "slice_reads_per_rank": self.slices,
            "owner_walk_seconds": round(self.owner_walk_s, 3),
        }

    def line(self) -> str:
        worst = max((r for r in self.rank_s if r), key=lambda r: self.rank_s[r], default=0)
        ratio = f"{self.wire_bytes / self.ideal_wire_bytes:.3f}x ideal" if self.ideal_wire_bytes else "none needed"
        return (f"world {self.world:>6} {self.mode:<10} plan {self.plan_bytes / 1e6:6.3f} MB per rank; "
                f"planning {self.rank0_s:5.2f} s on rank 0 (cpu {self.coordinator_cpu_s + self.rank_cpu_s[0]:.2f} s: "
                f"coordinator {self.coordinator_cpu_s:.2f} + own schedule {self.rank_cpu_s[0]:.2f}), "
                f"{self.rank_s[worst]:.2f} s on rank {worst} (cpu {self.rank_cpu_s[worst]:.2f} s); "
                f"{self.chunks} broadcast chunk(s), {self.scatters} scatter(s), {self.slices} slice read(s) per rank; "
                f"wire {self.wire_bytes / 1e9:.2f} GB ({ratio}); largest send buffer "
                f"{self.send_buffer_bytes / 1e6:.1f} MB, receive {self.receive_buffer_bytes / 1e6:.1f} MB; "
                f"control {max(self.control.values(), default=0) / 1e6:.2f} MB per rank; "
                f"save planning {max(self.save_s.values(), default=0.0):.2f} s")


def emulated_ranks(world: int, per_node: int = 8) -> list[RankInfo]:
    return [RankInfo(r, f"node{r // per_node}", r % per_node) for r in range(world)]


def fsdp_sharding(world: int) -> Sharding:
    """FSDP2's layout on a 1-D mesh of every rank: ``Shard(0)``."""
    return Sharding(tuple(range(world)), (world,), (Placement("shard", 0),))


def fsdp_layouts(plan: LoadPlan) -> dict[str, Layout]:
    """``Shard(0)`` over every rank for every tensor, as FSDP2 lays out a 1-D mesh (one shared Sharding)."""
    sharding = fsdp_sharding(plan.world_size)
    memo: dict[tuple[int, ...], Layout] = {}
    out = {}
    for f in plan.files:
        for t in f.tensors:
            if t.shape not in memo:
                memo[t.shape] = layout_of(t.shape, sharding, plan.world_size)
            out[t.name] = memo[t.shape]
    return out


def derive(blob: bytes, rank: int) -> tuple[LoadPlan, int, int]:
    """(one rank) Unpickle the plan answer and derive everything this rank walks.

    Returns the plan, its slice reads and the data steps it takes part in
    (what :class:`~distload.transfer.loop.Transfer` counts).
    """
    plan: LoadPlan = pickle.loads(blob)[1][0]
    plan.dtypes  # noqa: B018 - derived on first use
    steps = schedule(plan, rank)
    slices = 0
    taking_part = sum(1 for s in steps if s.kind == BROADCAST)
    sp = plan.sharded
    if sp is not None:
        for s in steps:
            if s.kind == SCATTER and (s.item.owner == rank or s.item.parts_of(rank)):
                taking_part += 1
        slices = len(sp.slices_of(rank))
        for layout in sp.layouts.values():  # what a rank checks its local shards against
            layout.local_shape(rank)
    return plan, slices, taking_part


def measure(path: str, world: int, *, sharded: bool, per_node: int = 8, bucket_mb: float = DEFAULT_BUCKET_MB,
            read_policy: str = "auto", save: bool = True) -> PlanCost:
    """Plan ``path`` for an emulated world of ``world`` ranks; time each side and count what moves."""
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = read_checkpoint(path)
    ranks = emulated_ranks(world, per_node)
    plan = build_plan(ckpt, ranks, bucket_mb=bucket_mb, wanted=set() if sharded else None)
    if sharded:
        sp = build_shard_plan(plan.files, plan.owners, fsdp_layouts(plan), world_size=world,
                              bucket_bytes=plan.bucket_bytes, read_policy=read_policy,
                              local_storage=is_local_storage(ckpt.root))
        plan = LoadPlan(plan.root, plan.world_size, plan.files, plan.owners, plan.bucket_bytes, plan.ranks,
                        plan.missing_in_files, plan.warnings, plan.moved, sp)
    # What the loader's plan broadcast sends: (kind, (plan, keys, submeshes, ranks per node), error, traceback).
    blob = pickle.dumps(("plan", (plan, None, {}, per_node), None, None), protocol=pickle.HIGHEST_PROTOCOL)
    coordinator_s, coordinator_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    measured = sorted({0, max(plan.owners), world - 1})
    rank_s: dict[int, float] = {}
    rank_cpu_s: dict[int, float] = {}
    collectives: dict[int, int] = {}
    slices = 0
    got = plan
    for r in measured:
        t, c = time.perf_counter(), time.process_time()
        got, n, collectives[r] = derive(blob, r)
        rank_s[r], rank_cpu_s[r] = time.perf_counter() - t, time.process_time() - c
        slices = max(slices, n)
    steps = schedule(got, 0)
    broadcasts = [s.item for s in steps if s.kind == BROADCAST]
    scatters = [s.item for s in steps if s.kind == SCATTER]
    wire, ideal = wire_bytes(got)
    walk = 0.0
    last = max(got.owners)
    if scatters:  # the owner's walk over the holders of what it sends, as the transfer loop does it
        t = time.process_time()
        for c in scatters:
            if c.owner == last:
                c.parts_by_rank()
        walk = time.process_time() - t
    status = status_exchanges(steps) + PHASE_EXCHANGES
    control = {r: _control_bytes(r, world, per_node, len(blob), status) for r in measured}
    save_s = _save_planning(ckpt, ranks, world, sharded, got.bucket_bytes, measured) if save else {}
    return PlanCost(world, "sharded" if sharded else "replicated", read_policy if sharded else "",
                    sum(len(f.tensors) for f in plan.files), len(plan.files), len(blob), coordinator_s, rank_s,
                    coordinator_cpu_s, rank_cpu_s, len(got.chunks), len(scatters), slices,
                    send_buffer_bytes=max([0, *(c.nbytes for c in broadcasts), *(c.send_buffer for c in scatters)]),
                    receive_buffer_bytes=max([0, *(c.nbytes for c in broadcasts), *(c.recv_bound for c in scatters)]),
                    wire_bytes=wire, ideal_wire_bytes=ideal,
                    collectives=collectives, status=status, control=control, owner_walk_s=walk, save_s=save_s)


def wire_bytes(plan: LoadPlan) -> tuple[int, int]:
    """(pure) ``(wire, ideal)``: the bytes ``plan``'s schedule puts on the wire, summed over ranks, and the ideal.

    The wire, from the schedule's chunks: a broadcast chunk reaches every
    other rank; a scatter chunk sends each holder its exact message
    (:attr:`~distload.plan.shard_plan.ScatterChunk.wire_bytes`). The ideal,
    from the tensors and layouts alone (not the chunks): every byte each rank
    needs and does not read itself: a broadcast tensor's bytes for every
    other rank; a scattered tensor's bytes times its replication, less what
    its file's owner holds of it; a sliced tensor's nothing.
    """
    world = plan.world_size
    broadcast = sum(c.nbytes for c in plan.chunks) * (world - 1)
    sp = plan.sharded
    if sp is None:
        return broadcast, broadcast
    wire = broadcast + sum(c.wire_bytes for c in sp.scatters)
    ideal = broadcast
    for i, f in enumerate(plan.files):
        owner = plan.owners[i]
        for t in f.tensors:
            if sp.policies.get(t.name) == "scatter" and t.nbytes:
                layout = sp.layouts[t.name]
                ideal += t.nbytes * layout.replication - layout.local_numel(owner) * sp.itemsizes[t.name]
    return wire, ideal


def _control_bytes(rank: int, world: int, per_node: int, answer: int, status: int) -> int:
    """Control bytes ``rank`` sends and receives in one load (see the module note)."""
    plan_send, plan_got = record_bytes(world, PLAN)
    report_send, report_got = record_bytes(world, LOAD_REPORT, extras=False)
    names = len(names_extra(f"node{world // per_node}", f"node{world // per_node}"))
    leaders = -(-world // per_node)
    size = 8  # the object broadcast's size message
    exchanges = status * 2 * STATUS_BYTES
    if rank == 0:
        return plan_got + (leaders - 1) * names + answer + size + exchanges + report_got
    return plan_send + (names if rank % per_node == 0 else 0) + answer + size + exchanges + report_send


def _save_planning(ckpt, ranks: list[RankInfo], world: int, sharded: bool, bucket: int,
                   measured: list[int]) -> dict[int, float]:
    """Save planning of the same tensors at this world, in CPU seconds per measured rank: the coordinator's
    plan and its pickle (rank 0), then on each rank the unpickling and its walk: a writer's
    :func:`contributions` for its chunks, :func:`own_parts` for everyone else's."""
    t = time.process_time()
    outs = [OutTensor(e.name, e.name, e.dtype, e.shape, tuple((0, n) for n in e.shape))
            for f in ckpt.files for e in f.tensors]
    sharding = fsdp_sharding(world)
    shardings = {o.name: sharding for o in outs} if sharded else {}
    plan = build_save_plan(outs, shardings, {o.name: o.shape for o in outs}, ranks, max_shard_size=SAVE_MAX_SHARD,
                           bucket_bytes=bucket, stage="/dry-run")
    blob = pickle.dumps(("plan", plan), protocol=pickle.HIGHEST_PROTOCOL)  # what the plan broadcast sends
    coordinator = time.process_time() - t
    out: dict[int, float] = {}
    for r in sorted({*measured, max(plan.writers)}):
        t = time.process_time()
        mine = pickle.loads(blob)[1]
        for chunk in mine.chunks:
            if chunk.remote:
                contributions(mine, chunk) if chunk.writer == r else own_parts(mine, chunk, r)
        out[r] = time.process_time() - t + (coordinator if r == 0 else 0.0)
    return out
