"""The driver: the only code that sequences planning, IO, communication and placement.

Note on failure handling:
    Each phase that can fail locally (planning, opening files and allocating,
    each chunk's read and placement) records its exception instead of raising,
    and every rank then joins a tiny status collective before the next data
    collective. If any rank failed, all ranks gather the messages and raise the
    same :class:`DistLoadError`, so nobody is left blocked in a broadcast the
    failed rank will never join. A peer that dies outright surfaces as a
    collective error or timeout (``timeout_s``), which is also re-raised as a
    :class:`DistLoadError` naming the phase. On any failure the model is put
    back on the meta device: nothing half-loaded looks usable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import pickle
import sys
import time
import warnings

import torch
from torch import nn

from .errors import DistLoadError, add_context, clip_names
from .format.discover import owner_store, resolve_checkpoint
from .format.dtypes import check_converted, plan_dtypes
from .format.header import read_checkpoint
from .io.reader import check_io_threads, open_verified
from .io.stage import release_pinned, wait_for_device
from .model.convert import KeyedPlacement, Region, keyed_placement
from .model.dtensor import (
    has_dtensors,
    other_submeshes,
    sharded_layouts,
    shardings,
    submesh_view,
)
from .model.place import (
    Placement,
    local_bytes,
    meta_buffers_not_loaded,
    model_placement,
    model_signature,
)
from .plan.control import LOAD_REPORT, PlanEntry, digest32, digest64, names_extra, roster
from .plan.items import RankInfo
from .plan.keys import KeyHook, KeyMap, build_key_map
from .plan.load_plan import DEFAULT_BUCKET_MB, LoadPlan, build_plan
from .plan.op_plan import choose_op_ranks
from .plan.shard import Layout, layout_of
from .plan.shard_plan import READ_POLICIES, build_shard_plan
from .report import LoadReport, peak_rss_bytes
from .storage.base import Source
from .storage.mounts import is_local_storage
from .transfer.loop import transfer
from .transfer.results import run_gathered
from .transport.bootstrap import make_comm, rank_info, resolve_device
from .transport.comm import DEFAULT_TIMEOUT_S, Comm, TorchComm, broken_error, describe, format_traceback
from .transport.groups import argument_mismatch, load_arguments

_LOAD_SEQ = itertools.count()


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    process_group=None,
    progress: bool | None = None,
    comm: str = "torch",
    read_policy: str = "auto",
    io_threads: int | None = None,
    key_map: KeyHook | None = None,
    subset: bool = False,
    revision: str | None = None,
) -> LoadReport:
    """(all ranks) Fill ``model`` from a safetensors checkpoint, reading each file once per job.

    Call it on every rank with the same arguments. Build the model under
    :func:`distload.empty_init` so parameters start on the meta device.

    Args:
        model: the module to fill; meta parameters get real memory on ``device``.
        path: a checkpoint directory, a ``.safetensors`` file, an index file, or a
            Hub repo id (``org/name``) in the local cache; ``~`` and ``$VARS`` are expanded.
        device: ``"cpu"`` (default) or ``"cuda"`` (this rank's GPU from ``LOCAL_RANK``).
        dtype: cast floating-point parameters to this dtype (e.g. ``torch.bfloat16``).
        strict: raise on missing or unexpected keys; otherwise report them
            (missing meta parameters are zero-filled, and a ``UserWarning`` on
            rank 0 and the report's ``missing_keys`` name them; real ones keep their values).
        bucket_mb: size of the coalescing buckets and of each transfer.
        timeout_s: collective timeout when distload creates the process group
            (a rank that stops answering fails the load after this long). A
            group you created keeps its own timeout: pass
            ``dist.new_group(timeout=...)`` as ``process_group`` to bound the
            load differently from training. With ``comm="mpi"`` it is the
            deadline for each MPI collective.
        comm: the transport: ``"torch"`` (torch.distributed, default) or
            ``"mpi"`` (mpi4py; ``process_group`` is then an MPI communicator,
            default ``COMM_WORLD``). Both follow the same plan.
        process_group: the group to load over; default the default group, which
            is created (:func:`distload.init_distributed`) from the torchrun,
            SLURM ``srun`` or ``mpiexec`` environment if it does not exist yet.
        progress: show a progress bar on rank 0; default when stderr is a terminal.
        read_policy: how DTensor (FSDP2 / TP) shards are read: ``"scatter"``
            (each file's owner reads it and sends every rank its piece),
            ``"slice"`` (each rank reads its own contiguous ``Shard(0)`` piece;
            other layouts are scattered) or ``"auto"`` (default: on local
            disks slice pieces of at least 1 MiB, and smaller ones that no
            scatter would coalesce; scatter on network or FUSE filesystems).
            Each byte is read once in every policy; the report's
            ``read_policy`` says what each tensor got.
        io_threads: threads each file owner reads with. Default: one per core (at
            most 8) for a rank's own slice reads; the node's cores shared among
            its ranks for reads that feed a broadcast or scatter.
        key_map: for models that are not transformers models, checkpoint key ->
            model key, as a dict (unlisted keys keep their name) or a callable
            (``None`` drops the key), e.g. torchtitan <-> Hugging Face names.
            transformers models are mapped as ``from_pretrained`` maps them
            (renames, base-model prefix, fused experts; see
            :mod:`distload.plan.keys`); ``key_map`` applies first.
        subset: the model holds part of the checkpoint (a pipeline stage, a
            model with layers removed): checkpoint keys it has no place for are
            neither read nor errors (the report lists them as ignored).
            Every model key must still be filled under ``strict``.
        revision: with a Hub repo id as ``path``: the branch, tag or commit (or a
            unique prefix of a cached commit) to load from the local cache (default: ``main``).

    Example::

        with distload.empty_init():
            model = LlamaForCausalLM(config)
        report = distload.load_checkpoint(model, "/ckpt/llama", device="cuda")
        print(report.summary())
    """
    _check_read_policy(read_policy)
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    return _Load(transport, dev, path, strict, bucket_mb, progress, model=model, dtype=dtype,
                 read_policy=read_policy, io_threads=io_threads, key_map=key_map, subset=subset,
                 revision=revision).run()


def load_state_dict(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    process_group=None,
    progress: bool | None = None,
    comm: str = "torch",
    io_threads: int | None = None,
    revision: str | None = None,
) -> dict[str, torch.Tensor]:
    """(all ranks) Every tensor of the checkpoint, on every rank, as a dict.

    ``dtype`` casts floating-point tensors; ``revision`` picks a cached
    revision of a Hub repo id. Example::

        sd = distload.load_state_dict("/ckpt/llama", device="cpu")
    """
    return load_state_dict_with_report(path, device=device, dtype=dtype, bucket_mb=bucket_mb,
                                       timeout_s=timeout_s, process_group=process_group, progress=progress,
                                       comm=comm, io_threads=io_threads, revision=revision)[0]


def load_state_dict_with_report(path, *, device=None, dtype=None, bucket_mb=DEFAULT_BUCKET_MB,
                                timeout_s=DEFAULT_TIMEOUT_S, process_group=None, progress=None, comm="torch",
                                io_threads=None, revision=None):
    """(all ranks) :func:`load_state_dict`, plus this rank's :class:`LoadReport`."""
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    job = _Load(transport, dev, path, True, bucket_mb, progress, model=None, dtype=dtype, io_threads=io_threads,
                revision=revision)
    report = job.run()
    return job.state_dict, report


def plan_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    process_group=None,
    comm: str = "torch",
    model: nn.Module | None = None,
    strict: bool = True,
    read_policy: str = "auto",
    key_map: KeyHook | None = None,
    subset: bool = False,
    revision: str | None = None,
) -> LoadPlan:
    """(all ranks) The plan a load would follow, without reading tensor data.

    With ``model``, the plan is the one :func:`load_checkpoint` would follow
    for it: only the keys the model has, checked against it (``strict``), and
    for DTensor (FSDP2 / TP) parameters the scatter and slice schedule in
    ``plan.sharded``; ``plan.conversions`` says how keys map onto the model.
    """
    _check_read_policy(read_policy)
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    job = _Load(transport, dev, path, strict, bucket_mb, False, model=model, dtype=None, read_policy=read_policy,
                key_map=key_map, subset=subset, revision=revision)
    return job.make_plan()


def _check_read_policy(read_policy: str) -> None:
    """(every rank, before any collective) Refuse an unknown ``read_policy``."""
    if read_policy not in READ_POLICIES:
        raise DistLoadError(f"read_policy must be one of {', '.join(READ_POLICIES)}, not {read_policy!r}")


class _Load:
    """One load on one rank. ``run`` is collective."""

    def __init__(self, comm: Comm, device: torch.device, path, strict: bool, bucket_mb: float,
                 progress: bool | None, *, model: nn.Module | None, dtype: torch.dtype | None,
                 read_policy: str = "auto", io_threads: int | None = None, key_map: KeyHook | None = None,
                 subset: bool = False, revision: str | None = None):
        self.comm, self.device, self.path, self.strict = comm, device, path, strict
        self.revision = revision  # of a Hub repo id: resolved on each rank in the plan phase
        self.io_threads = None if io_threads is None else check_io_threads(io_threads)  # None: per reader
        self.ranks_here = 1  # ranks on this rank's node, from the plan gather (the default read threads)
        self.read_policy, self.key_hook, self.subset = read_policy, key_map, subset
        self.local_bytes = 0
        self.buffer_bytes = 0
        self.bucket_mb, self.model, self.dtype = bucket_mb, model, dtype
        self.progress = (sys.stderr.isatty() if progress is None else progress) and comm.rank == 0
        self.phase = "start"
        self.seq = next(_LOAD_SEQ)  # the same on every rank: all run the same loads in order
        self.state_dict: dict[str, torch.Tensor] = {}
        self.keys = KeyMap()  # how checkpoint keys map onto the model (distload.plan.keys), from rank 0
        self.submeshes: dict = {}  # other ranks' meshes of gathered ops' targets, from rank 0
        self.roster: list[RankInfo] = []  # (rank 0) every rank's place, from the plan phase's records
        self._views: dict = {}  # (rank 0) the distinct submesh views, by a rank that holds each
        self._ranks_per_node = 1  # (rank 0) the most ranks any node runs
        self._plan_error: Exception | None = None  # (rank 0) why planning failed, kept as the cause
        self.ops_run: list[str] = []  # gathered conversions this rank ran (distload.transfer.results)
        self.op_source_bytes = 0

    # ---- phases -------------------------------------------------------------

    def run(self) -> LoadReport:
        """(all ranks) plan -> open -> transfer -> finish.

        On any failure, in any phase, every parameter goes back to the meta
        device (``Placement.restore``; the placement undoes itself if it
        fails part-way) and every rank raises the same :class:`DistLoadError`.
        """
        t0 = time.perf_counter()
        placement: Placement | None = None
        sources: dict[int, Source] = {}
        ok = False
        try:
            plan = self.make_plan()
            self.phase = "open"
            error = None
            step = f"allocating this rank's tensors on {self.device}"
            target_layouts: dict[str, Layout] = {}
            try:
                placement = self._placement(plan)
                step = "opening this rank's files"
                self._open_files(plan, sources)
                if self.keys.gathered:  # agreed here, so no rank meets a failure alone inside the ops' collectives
                    step = "finding where converted DTensors' pieces go"
                    target_layouts = self._target_layouts()
            except Exception as e:
                error = add_context(e, step)
            self.comm.agree("open", error)
            assert placement is not None
            self.phase = "transfer"
            bar = _progress_bar(self._total_bytes(plan)) if self.progress else None
            try:
                bytes_read, chunks, self.buffer_bytes = transfer(self.comm, plan, placement, sources, bar,
                                                                 io_threads=self.io_threads,
                                                                 ranks_here=self.ranks_here)
                if isinstance(placement, KeyedPlacement):  # each gathered op on its rank, then its results
                    self.phase = "convert"
                    got, n, buffers, self.ops_run = run_gathered(self.comm, plan, self.keys.gathered, placement,
                                                                 sources, target_layouts,
                                                                 io_threads=self.io_threads,
                                                                 ranks_here=self.ranks_here, progress=bar)
                    bytes_read, chunks = bytes_read + got, chunks + n
                    self.buffer_bytes = max(self.buffer_bytes, buffers)
                    self.op_source_bytes = placement.source_bytes
            finally:
                if bar is not None:
                    bar.close()
            if self.device.type == "cuda":  # the seconds cover bytes in place, not just queued
                wait_for_device(self.device, self.comm.wait_s)
            seconds = time.perf_counter() - t0
            self.phase = "finish"
            report = self._finish(plan, bytes_read, chunks, seconds)
            if self.keys.missing and self.comm.rank == 0:
                warnings.warn("distload: " + _missing_warning(self.keys.missing), stacklevel=3)
            ok = True
            return report
        except DistLoadError:
            raise
        except Exception as e:  # a collective broke: a peer died, timed out or diverged
            raise self._broken(e) from e
        finally:
            for src in sources.values():
                src.close()
            if not ok:
                self.state_dict = {}
                if placement is not None:
                    placement.restore()
            if self.device.type == "cuda":
                release_pinned()

    def _broken(self, e: Exception) -> DistLoadError:
        """(each surviving rank, alone) See :func:`distload.transport.comm.broken_error`."""
        return broken_error(self.comm, "distload", self.phase, f"load.{self.seq}", e)

    def make_plan(self) -> LoadPlan:
        """(all ranks) Every rank sends rank 0 one record; rank 0 checks and plans; all receive the plan.

        Note on the plan phase's messages:
            Each rank sends one fixed-size record (:class:`~distload.plan.control.PlanEntry`:
            its node, local rank and digests of its arguments, model, path and
            submesh view) to rank 0 only, plus its host names if it is its
            node's local rank 0, or its error if it failed. Rank 0 then
            broadcasts one answer: the plan, or the failures, or (when digests
            differ) a request for the texts, which only then all ranks gather
            to name every difference. Ranks holding DTensors on partial meshes
            send their view only when rank 0 asks, one rank per distinct view.
            So no rank but rank 0 receives anything that grows with the world,
            and rank 0 receives a record per rank.
        """
        self.phase = "plan"
        comm, rank = self.comm, self.comm.rank
        sig: dict = {}
        args: tuple[str, ...] | None = None
        digest = ""
        view = None
        info = None
        error: Exception | None = None
        try:
            if self.revision is not None:  # this rank's own cache; a miss fails every rank
                self.path = resolve_checkpoint(self.path, self.revision)
            sig = model_signature(self.model) if self.model is not None else {}
            digest = hashlib.sha256(repr(sorted(sig.items())).encode()).hexdigest()
            args = load_arguments(self.path, self.dtype, self.strict, self.read_policy, self.bucket_mb, self.subset,
                                  self.device)
            group = comm.group if isinstance(comm, TorchComm) else None
            view = submesh_view(self.model, group, comm.world_size) if self.model is not None else None
            info = rank_info(rank)
            entry = PlanEntry(digest64(info.node_key), digest32(args[1:], digest), digest32(args[0]),
                              digest32(view) if view is not None else 0, info.local_rank, False)
            extra = names_extra(info.host, info.node_key) if info.local_rank == 0 else None
        except Exception as e:
            error = e
            entry = PlanEntry(0, 0, 0, 0, 0, True)
            extra = pickle.dumps((describe(e), format_traceback(e)), protocol=pickle.HIGHEST_PROTOCOL)
        got = comm.gather_records(entry.pack(), extra)
        answer = None
        if rank == 0:
            assert got is not None
            answer = self._check_roster(got, info, view)
            if answer[0] == "views":  # ask one rank per distinct view for it
                answer = comm.broadcast_object(answer)
            else:
                answer = comm.broadcast_object(self._answer(answer, sig))
        else:
            answer = comm.broadcast_object(None)
        if answer[0] == "views":
            asked = answer[1]
            views = comm.collect_(pickle.dumps(view, protocol=pickle.HIGHEST_PROTOCOL) if rank in asked else None,
                                  asked) if (rank == 0 or rank in asked) else None
            if rank == 0:
                assert views is not None
                self._views.update({r: pickle.loads(v) for r, v in views.items()})
                answer = comm.broadcast_object(self._answer(("go",), sig))
            else:
                answer = comm.broadcast_object(None)
        kind = answer[0]
        if kind == "fail":
            raise DistLoadError.from_failures("plan", answer[1], answer[2]) from error
        if kind == "mismatch":
            raise self._mismatch(args, digest, info)
        value, msg, tb = answer[1:]
        if msg is not None:
            raise DistLoadError.from_failures("plan", {0: msg}, {0: tb}) from (error or self._plan_error)
        plan, keys, self.submeshes, self.ranks_here = value
        if keys is not None:
            self.keys = keys
        return plan

    def _check_roster(self, got: list[tuple[bytes, bytes | None]], mine: RankInfo | None, view) -> tuple:
        """(rank 0) From every rank's record: its failures, a disagreement, the views to ask for, or go.

        Keeps every rank's place (``self.roster``, :func:`~distload.plan.control.roster`).
        """
        entries, failed, self.roster = roster(got, mine)
        if failed:
            return "fail", {r: m[0] for r, m in failed.items()}, {r: m[1] for r, m in failed.items()}
        first_on_node: dict[int, int] = {}
        for r, e in enumerate(entries):
            peer = first_on_node.setdefault(e.node, r)
            if e.check != entries[0].check or e.path != entries[peer].path:
                return ("mismatch",)
        per_node: dict[int, int] = {}
        for e in entries:
            per_node[e.node] = per_node.get(e.node, 0) + 1
        self._ranks_per_node = max(per_node.values())
        asked: dict[int, int] = {}
        for r, e in enumerate(entries):
            if e.view and e.view != entries[0].view:
                asked.setdefault(e.view, r)
        self._views = {0: view} if view is not None else {}
        return ("views", sorted(asked.values())) if asked else ("go",)

    def _answer(self, decision: tuple, sig: dict) -> tuple:
        """(rank 0) The broadcast that ends the plan phase: failures, a mismatch, or the plan (or its error)."""
        if decision[0] != "go":
            return decision
        try:
            value = (*self._plan_on_coordinator(self.roster, sig), self._ranks_per_node)
            return "plan", value, None, None
        except Exception as e:
            self._plan_error = e  # rank 0 raises the agreed error from it
            return "plan", None, describe(e), format_traceback(e)

    def _mismatch(self, args, digest: str, info) -> DistLoadError:
        """(all ranks, after rank 0 saw digests differ) Gather the texts and name every difference, alike everywhere."""
        got = self.comm.all_gather_object((args, digest, info.node_key if info is not None else ""))
        mismatch = argument_mismatch([g[0] for g in got], [g[2] for g in got])
        if mismatch is not None:
            return mismatch
        differ = {r: "its model (names, shapes, dtypes or sharding) differs from rank 0's; every rank must "
                     "build the same model" for r, g in enumerate(got) if g[1] != got[0][1]}
        return DistLoadError.from_failures("plan", differ or {0: "ranks disagree on the load's arguments"})

    def _plan_on_coordinator(self, ranks: list[RankInfo], sig: dict) -> tuple[LoadPlan, KeyMap | None, dict]:
        """(coordinator) Validate the checkpoint against the model and build the plan.

        Also returns the other ranks' meshes of gathered ops' targets that
        some rank holds on a partial mesh (usually none), so that every rank
        agrees on where the results go (:meth:`_target_layouts`).
        """
        ckpt = read_checkpoint(self.path, strict=self.strict)
        if self.model is None:
            # The dtype each tensor lands in; refusals name the key.
            plan_dtypes({t.name: t.dtype for f in ckpt.files for t in f.tensors}, None, self.dtype)
            return build_plan(ckpt, ranks, bucket_mb=self.bucket_mb), None, {}
        keys = self._match(ckpt)
        # Sources of gathered ops move in their own phase, to their op rank only (distload.transfer.results).
        wanted = set(keys.wanted) - {k for g in keys.gathered for k in g.sources}
        submeshes = other_submeshes(self.model, list(self._views.values()))
        if not has_dtensors(self.model):
            plan = build_plan(ckpt, ranks, bucket_mb=self.bucket_mb, wanted=wanted)
        else:
            layouts = self._source_layouts(keys, submeshes)
            plan = build_plan(ckpt, ranks, bucket_mb=self.bucket_mb, wanted=wanted - set(layouts))
            sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=self.comm.world_size,
                                  bucket_bytes=plan.bucket_bytes, read_policy=self.read_policy,
                                  local_storage=is_local_storage(ckpt.root))
            plan = dataclasses.replace(plan, sharded=sp)
        op_targets = {t for g in keys.gathered for t in g.targets}
        plan = dataclasses.replace(plan, conversions=tuple(keys.describe()),
                                   op_ranks=choose_op_ranks(keys.gathered, plan.files, plan.owners))
        return plan, keys, {k: v for k, v in submeshes.items() if k in op_targets}

    def _source_layouts(self, keys: KeyMap, submeshes: dict) -> dict[str, Layout]:
        """(coordinator) The layout of every checkpoint key that fills a sharded DTensor.

        A key filling a box of a DTensor (one expert of a fused tensor) takes
        the DTensor's layout restricted to its box. Sources of gathered
        conversions move in their own phase (distload.transfer.results); keys whose
        piece every rank holds are broadcast.
        """
        assert self.model is not None
        group = self.comm.group if isinstance(self.comm, TorchComm) else None
        model_shapes = {k: tuple(v.shape) for k, v in self.model.state_dict(keep_vars=True).items()}
        targets = {r.target for r in keys.routes.values()}
        by_target = sharded_layouts(self.model, model_shapes, targets, group, self.comm.world_size, submeshes)
        layouts = {}
        for ckey, route in keys.routes.items():
            layout = by_target.get(route.target)
            if layout is not None and route.box is not None:
                layout = route.box.restrict(layout)
            if layout is not None and not layout.replicated:
                layouts[ckey] = layout
        return layouts

    def _match(self, ckpt) -> KeyMap:
        """(coordinator) Map checkpoint keys onto the model's (distload.plan.keys); raise under strict."""
        assert self.model is not None
        shapes = {t.name: tuple(t.shape) for f in ckpt.files for t in f.tensors}
        keys = build_key_map(self.model, shapes, key_map=self.key_hook)
        params = {k: (v.dtype, isinstance(v, nn.Parameter)) for k, v in self.model.state_dict(keep_vars=True).items()}
        stored = {t.name: t.dtype for f in ckpt.files for t in f.tensors}
        plan_dtypes(stored, {k: params[r.target] for k, r in keys.routes.items()}, self.dtype)  # refusals name the key
        check_converted(stored, [(g.op, g.sources, g.targets) for g in keys.gathered], params, self.dtype)
        unexpected = () if self.subset else keys.unexpected
        if self.strict and (keys.missing or unexpected):
            parts = []
            if keys.missing:
                parts.append(f"missing keys ({len(keys.missing)}): {clip_names(keys.missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {clip_names(unexpected)}")
            hint = "pass strict=False to load what matches"
            if unexpected and not keys.missing:
                hint += ", or subset=True if the model holds part of the checkpoint"
            raise DistLoadError("checkpoint does not match the model: " + "; ".join(parts) + f" ({hint})")
        unfilled = meta_buffers_not_loaded(self.model, set(keys.filled))
        if unfilled:
            raise DistLoadError(
                f"buffers {clip_names(unfilled)} are on the meta device and the checkpoint does not hold them; "
                "build the model under distload.empty_init(), which keeps buffers real")
        return keys

    def _open_files(self, plan: LoadPlan, sources: dict[int, Source]) -> None:
        """(owner ranks) Open and verify this rank's files under its own view of the path.

        Fills ``sources`` as it goes, so the caller closes whatever was opened
        even if a later file fails.
        """
        mine = [i for i, o in enumerate(plan.owners) if o == self.comm.rank]
        if plan.sharded is not None:  # files this rank reads its own slices from
            mine += sorted({c.file for c in plan.sharded.slices_of(self.comm.rank)} - set(mine))
        if not mine:
            return
        store = owner_store(self.path, plan.root)
        for i in mine:
            sources[i] = open_verified(plan, i, store)

    def _placement(self, plan: LoadPlan) -> Placement:
        """(every rank, locally) Real memory for everything this rank will receive."""
        if self.model is None:
            tensors = {}
            wants = plan_dtypes({k: plan.dtypes[k] for k in plan.shapes}, None, self.dtype)
            for name, shape in plan.shapes.items():
                tensors[name] = torch.empty(shape, dtype=wants[name], device=self.device)
            self.state_dict = tensors
            return Placement(tensors, plan.dtypes)
        was_meta = {k for k, v in self.model.state_dict(keep_vars=True).items() if v.device.type == "meta"}
        shards = plan.sharded.layouts if plan.sharded is not None else {}
        whole = {k for k, r in self.keys.routes.items() if r.box is None and r.source == r.target}
        placement = model_placement(
            self.model, self.device, self.dtype, plan.dtypes,
            local_shapes={k: v.local_shape(self.comm.rank) for k, v in shards.items() if k in whole},
            # strict=False: missing ones get defined values; real tensors (computed buffers) keep theirs
            zero={k for k in self.keys.missing if k in was_meta})
        self.local_bytes = local_bytes(placement.dests)
        if self.keys.identity:
            return placement
        try:  # checkpoint key -> the view of its model tensor (distload.model.convert)
            regions = self._regions() if shards or self.keys.gathered else {}
            keyed = keyed_placement(placement, self.keys, self.model, self.device, plan.shapes, regions)
            for name, layout in shards.items():
                if name not in whole and tuple(keyed.dests[name].shape) != layout.local_shape(self.comm.rank):
                    raise DistLoadError(f"{name}: local piece is {list(keyed.dests[name].shape)} but the plan "
                                        f"expects {list(layout.local_shape(self.comm.rank))}; does every rank "
                                        "shard the model the same way?")
        except BaseException:
            placement.restore()
            raise
        return keyed

    def _regions(self) -> dict[str, Region | None]:
        """(every rank, locally) This rank's global region of every DTensor, by model key."""
        return {k: layout.regions[self.comm.rank] for k, layout in self._layouts().items()}

    def _layouts(self, wanted: set[str] | None = None) -> dict[str, Layout]:
        """(every rank, locally) Every rank's region of each DTensor (those in ``wanted``), by model key."""
        assert self.model is not None
        if not has_dtensors(self.model):
            return {}
        group = self.comm.group if isinstance(self.comm, TorchComm) else None
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict(keep_vars=True).items()}
        extra = self.submeshes
        return {k: layout_of(shapes[k], [sharding, *extra.get(k, ())], self.comm.world_size)
                for k, sharding in shardings(self.model, group).items() if wanted is None or k in wanted}

    def _target_layouts(self) -> dict[str, Layout]:
        """(every rank, locally) The layout of every DTensor that a gathered op fills."""
        return self._layouts({t for g in self.keys.gathered for t in g.targets})

    def _total_bytes(self, plan: LoadPlan) -> int:
        """Bytes the load moves: the plan's items, its sharded items, and the gathered ops' sources."""
        return plan.total_bytes + (plan.sharded.total_bytes if plan.sharded else 0) + self._op_bytes(plan)

    def _op_bytes(self, plan: LoadPlan) -> int:
        """Bytes of the gathered ops' sources, which move outside ``plan``'s own items."""
        sources = {k for g in self.keys.gathered for k in g.sources}
        return sum(t.nbytes for f in plan.files for t in f.tensors if t.name in sources) if sources else 0

    def _report(self, plan: LoadPlan, bytes_read: int, chunks: int, seconds: float) -> LoadReport:
        """(every rank, locally) This rank's report; its lists of keys are the same on every rank."""
        me = rank_info(self.comm.rank)
        return LoadReport(
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            host=me.host,
            node=me.node_key,
            local_rank=me.local_rank,
            device=str(self.device),
            files=[f.name for f in plan.files_of(self.comm.rank)],
            bytes_read=bytes_read,
            total_bytes=self._total_bytes(plan),
            seconds=seconds,
            local_bytes=self.local_bytes,
            read_policy=dict(plan.sharded.policies) if plan.sharded else {},
            missing_keys=list(self.keys.missing),
            unexpected_keys=[] if self.subset else list(self.keys.unexpected),
            ignored_keys=list(self.keys.ignored) + (list(self.keys.unexpected) if self.subset else []),
            converted_keys=[k for g in self.keys.gathered for k in g.sources],
            ops_run=list(self.ops_run),
            op_source_bytes=self.op_source_bytes,
            # missing keys are in missing_keys (and the summary), not repeated here
            warnings=list(plan.warnings) + [f"index lists {k} but its file lacks it" for k in plan.missing_in_files],
            peak_rss_bytes=peak_rss_bytes(),
            chunks=chunks,
            buffer_bytes=self.buffer_bytes,
        )

    def _finish(self, plan: LoadPlan, bytes_read: int, chunks: int, seconds: float) -> LoadReport:
        """(all ranks) This rank's report; every rank's figures go to rank 0 only, one fixed-size record each.

        Rank 0's :attr:`LoadReport.ranks` gets one dict per rank: the numbers
        from the records; host, node and local rank from the plan phase's;
        files and gathered ops from the plan, which says which rank reads and
        runs what. The other ranks' ``ranks`` stay empty.
        """
        error, record, report = None, b"", None
        try:
            report = self._report(plan, bytes_read, chunks, seconds)
            record = LOAD_REPORT.pack(report.bytes_read, report.local_bytes, report.buffer_bytes, report.chunks,
                                      report.peak_rss_bytes // 1024, report.seconds)
        except Exception as e:
            error = e
        self.comm.agree("finish", error)
        assert report is not None
        got = self.comm.gather_records(record, extras=False)
        if got is not None:
            report.ranks = self._figures(plan, report, got)
        return report

    def _figures(self, plan: LoadPlan, report: LoadReport, got: list[tuple[bytes, bytes | None]]) -> list[dict]:
        """(rank 0) One dict of figures per rank, from the records and the plan."""
        files: dict[int, list[str]] = {}
        for f, owner in zip(plan.files, plan.owners):
            files.setdefault(owner, []).append(f.name)
        ops: dict[int, list[str]] = {}
        sources: dict[int, int] = {}
        sizes = {t.name: t.nbytes for f in plan.files for t in f.tensors} if self.keys.gathered else {}
        for g, r in zip(self.keys.gathered, plan.op_ranks):
            ops.setdefault(r, []).append(g.layer)
            sources[r] = sources.get(r, 0) + sum(sizes.get(k, 0) for k in g.sources)
        rows = []
        for r, (rec, _) in enumerate(got):
            bytes_read, local, buffers, chunks, kib, seconds = LOAD_REPORT.unpack(rec)
            info = self.roster[r]
            rows.append(dict(rank=r, world_size=report.world_size, host=info.host, node=info.node_key,
                             local_rank=info.local_rank, files=files.get(r, []), bytes_read=bytes_read,
                             total_bytes=report.total_bytes, seconds=seconds,
                             gbps=report.total_bytes / seconds / 1e9 if seconds > 0 else 0.0,
                             peak_rss_bytes=kib * 1024, local_bytes=local, chunks=chunks, buffer_bytes=buffers,
                             op_source_bytes=sources.get(r, 0), ops_run=ops.get(r, [])))
        return rows


def _missing_warning(missing: tuple[str, ...]) -> str:
    return (f"{len(missing)} model key(s) are not in the checkpoint and were not loaded "
            f"(zero-filled where they had no values): {clip_names(missing)}")


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="distload", leave=False)
