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

import hashlib
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .bootstrap import DEFAULT_TIMEOUT_S, make_comm, rank_info, resolve_device
from .comm import Comm, describe, format_traceback
from .dtypes import plan_dtypes
from .errors import DistLoadError, add_context
from .index import local_root, read_checkpoint
from .place import (
    Destinations,
    alias_groups,
    byte_view,
    can_take_direct,
    materialize,
    meta_buffers_not_loaded,
    model_signature,
    write_piece,
)
from .plan import DEFAULT_BUCKET_MB, Chunk, LoadPlan, build_plan
from .reader import BufferPool, ChunkReader, open_verified
from .scatter import transfer_sharded
from .shard_plan import READ_POLICIES
from .sharded import attach_sharded, local_bytes, sharded_destinations
from .report import LoadReport, peak_rss_bytes


# How long a survivor of a timed-out collective waits for the others to check in.
SILENT_WAIT_S = 3.0
_LOAD_SEQ = itertools.count()


@dataclass(frozen=True)
class _Match:
    """Rank 0's verdict on checkpoint keys versus the model's."""

    wanted: frozenset[str]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


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
) -> LoadReport:
    """(all ranks) Fill ``model`` from a safetensors checkpoint, reading each file once per job.

    Call it on every rank with the same arguments. Build the model under
    :func:`distload.empty_init` so parameters start on the meta device.

    Args:
        model: the module to fill; meta parameters get real memory on ``device``.
        path: a checkpoint directory, a ``.safetensors`` file or an index file.
        device: ``"cpu"`` (default) or ``"cuda"`` (this rank's GPU from ``LOCAL_RANK``).
        dtype: cast floating-point parameters to this dtype (e.g. ``torch.bfloat16``).
        strict: raise on missing or unexpected keys; otherwise report them
            (missing meta parameters are zero-filled; real ones keep their values).
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
            other layouts are scattered) or ``"auto"`` (default: slice pieces
            of at least 1 MiB on local disks, scatter on network or FUSE
            filesystems). Each byte is read once in every policy; the report's
            ``read_policy`` says what each tensor got.

    Example::

        with distload.empty_init():
            model = LlamaForCausalLM(config)
        report = distload.load_checkpoint(model, "/ckpt/llama", device="cuda")
        print(report.summary())
    """
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    if read_policy not in READ_POLICIES:
        raise DistLoadError(f"read_policy must be one of {', '.join(READ_POLICIES)}, not {read_policy!r}")
    return _Load(transport, dev, path, strict, bucket_mb, progress, model=model, dtype=dtype,
                 read_policy=read_policy).run()


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
) -> dict[str, torch.Tensor]:
    """(all ranks) Every tensor of the checkpoint, on every rank, as a dict.

    ``dtype`` casts floating-point tensors. Example::

        sd = distload.load_state_dict("/ckpt/llama", device="cpu")
    """
    return load_state_dict_with_report(path, device=device, dtype=dtype, bucket_mb=bucket_mb,
                                       timeout_s=timeout_s, process_group=process_group, progress=progress,
                                       comm=comm)[0]


def load_state_dict_with_report(path, *, device=None, dtype=None, bucket_mb=DEFAULT_BUCKET_MB,
                                timeout_s=DEFAULT_TIMEOUT_S, process_group=None, progress=None, comm="torch"):
    """(all ranks) :func:`load_state_dict`, plus this rank's :class:`LoadReport`."""
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    job = _Load(transport, dev, path, True, bucket_mb, progress, model=None, dtype=dtype)
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
) -> LoadPlan:
    """(all ranks) The plan a load would follow, without reading tensor data.

    With ``model``, the plan is the one :func:`load_checkpoint` would follow
    for it: only the keys the model has, checked against it (``strict``), and
    for DTensor (FSDP2 / TP) parameters the scatter and slice schedule in
    ``plan.sharded``.
    """
    dev = resolve_device(device)
    transport = make_comm(dev, process_group, timeout_s, comm)
    if read_policy not in READ_POLICIES:
        raise DistLoadError(f"read_policy must be one of {', '.join(READ_POLICIES)}, not {read_policy!r}")
    job = _Load(transport, dev, path, strict, bucket_mb, False, model=model, dtype=None, read_policy=read_policy)
    return job.make_plan()


class _Load:
    """One load on one rank. ``run`` is collective."""

    def __init__(self, comm: Comm, device: torch.device, path, strict: bool, bucket_mb: float,
                 progress: bool | None, *, model: nn.Module | None, dtype: torch.dtype | None,
                 read_policy: str = "auto"):
        self.comm, self.device, self.path, self.strict = comm, device, path, strict
        self.read_policy = read_policy
        self.local_bytes = 0
        self.bucket_mb, self.model, self.dtype = bucket_mb, model, dtype
        self.progress = (sys.stderr.isatty() if progress is None else progress) and comm.rank == 0
        self.phase = "start"
        self.seq = next(_LOAD_SEQ)  # the same on every rank: all run the same loads in order
        self.state_dict: dict[str, torch.Tensor] = {}
        self.match = _Match(frozenset(), (), ())

    # ---- phases -------------------------------------------------------------

    def run(self) -> LoadReport:
        t0 = time.perf_counter()
        dests: Destinations | None = None
        fds: dict[int, int] = {}
        ok = False
        try:
            plan = self.make_plan()
            self.phase = "open"
            error = None
            step = f"allocating this rank's tensors on {self.device}"
            try:
                dests = self._destinations(plan)
                step = "opening this rank's files"
                fds = self._open_files(plan, fds)
            except Exception as e:
                error = add_context(e, step)
            self.comm.agree("open", error)
            self.phase = "transfer"
            bytes_read, chunks = self._transfer(plan, dests, fds)
            if plan.sharded is not None:
                assert dests is not None
                more_read, more_chunks = transfer_sharded(self.comm, plan, plan.sharded, dests.tensors, fds)
                bytes_read, chunks = bytes_read + more_read, chunks + more_chunks
            seconds = time.perf_counter() - t0
            self.phase = "finish"
            # The report travels in the one gather this phase needs; a rank that
            # cannot build its report sends its error instead, so none waits.
            report: LoadReport | None = None
            local: Exception | None = None
            try:
                report = self._report(plan, bytes_read, chunks, seconds)
                mine = (report.to_dict(), None, None)
            except Exception as e:
                local, mine = e, (None, describe(e), format_traceback(e))
            gathered = self.comm.all_gather_object(mine)
            failed = {r: g[1] for r, g in enumerate(gathered) if g[1] is not None}
            if failed:
                raise DistLoadError.from_failures("finish", failed, {r: gathered[r][2] for r in failed}) from local
            assert report is not None
            report.ranks = [g[0] for g in gathered]
            for r in report.ranks:
                r.pop("ranks", None)
            ok = True
            return report
        except DistLoadError:
            raise
        except Exception as e:  # a collective broke: a peer died, timed out or diverged
            raise self._broken(e) from e
        finally:
            for fd in fds.values():
                os.close(fd)
            if not ok:
                self.state_dict = {}
                if dests is not None:
                    dests.restore()

    def _broken(self, e: Exception) -> DistLoadError:
        """(each surviving rank, alone) The error for a collective that broke instead of agreeing.

        A timeout means some rank stopped answering: check in through the
        store for a few seconds and name the ranks that did not. A dead peer
        (connection reset) is reported at once: the launcher names it, and
        torchrun stops the survivors within moments of the death.
        """
        text = describe(e)
        failures = {self.comm.rank: text}
        hint = " (did another rank die or time out?)"
        if "timed out" in text.lower() or "timeout" in text.lower():
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            silent = self.comm.silent_ranks(f"{restart}.{self.seq}", SILENT_WAIT_S)
            if silent:
                hint = f"; rank(s) {', '.join(map(str, silent))} did not respond (hung or dead)"
                failures.update({r: "did not respond" for r in silent})
        return DistLoadError(f"distload {self.phase} failed on rank {self.comm.rank}: {text}{hint}",
                             phase=self.phase, failures=failures)

    def make_plan(self) -> LoadPlan:
        """(all ranks) Exchange rank info; rank 0 validates and plans; all receive the plan."""
        self.phase = "plan"
        # Any rank's local failure rides in the first gather, so no rank is
        # left waiting for the plan broadcast.
        local: Exception | None = None
        sig: dict = {}
        try:
            me = rank_info(self.comm.rank)
            sig = model_signature(self.model) if self.model is not None else {}
            digest = hashlib.sha256(repr(sorted(sig.items())).encode()).hexdigest()
            mine = (me, digest, None)
        except Exception as e:
            local, mine = e, (None, None, (describe(e), format_traceback(e)))
        gathered = self.comm.all_gather_object(mine)
        bad = {r: g[2] for r, g in enumerate(gathered) if g[2] is not None}
        if bad:
            raise DistLoadError.from_failures("plan", {r: m[0] for r, m in bad.items()},
                                              {r: m[1] for r, m in bad.items()}) from local
        result: tuple | None = None
        error: Exception | None = None
        if self.comm.rank == 0:
            try:
                differ = [r for r, (_, d, _) in enumerate(gathered) if d != digest]
                if differ:
                    raise DistLoadError(f"the model differs between rank 0 and rank(s) {differ}; "
                                        "every rank must build the same model")
                ckpt = read_checkpoint(self.path, strict=self.strict)
                match = self._match(ckpt, sig) if self.model is not None else None
                if self.model is None:  # the dtype each tensor lands in; refusals name the key
                    plan_dtypes({t.name: t.dtype for f in ckpt.files for t in f.tensors}, None, self.dtype)
                wanted = set(match.wanted) if match else None
                plan = attach_sharded(self.model, ckpt, self.comm, [i for i, _, _ in gathered], wanted,
                                      bucket_mb=self.bucket_mb, read_policy=self.read_policy) \
                    if self.model is not None else None
                if plan is None:
                    plan = build_plan(ckpt, [i for i, _, _ in gathered], bucket_mb=self.bucket_mb, wanted=wanted)
                result = (plan, match, None)
            except Exception as e:
                error = e
                result = (None, None, (describe(e), format_traceback(e)))
        plan, match, msg = self.comm.broadcast_object(result, src=0)
        if msg is not None:
            raise DistLoadError.from_failures("plan", {0: msg[0]}, {0: msg[1]}) from error
        if match is not None:
            self.match = match
        return plan

    def _match(self, ckpt, sig: dict) -> _Match:
        """(coordinator) Compare checkpoint keys with the model's; raise under strict."""
        assert self.model is not None
        shapes = {t.name: t.shape for f in ckpt.files for t in f.tensors}
        aliases = alias_groups(self.model)
        have = set(shapes)
        wanted = have & set(sig)
        bad = [f"{k}: checkpoint {list(shapes[k])} vs model {list(sig[k][0])}"
               for k in sorted(wanted) if tuple(shapes[k]) != sig[k][0]]
        if bad:
            raise DistLoadError("shape mismatch for " + "; ".join(bad))
        plan_dtypes({t.name: t.dtype for f in ckpt.files for t in f.tensors},  # refusals name the key
                    {k: (v.dtype, isinstance(v, nn.Parameter))
                     for k, v in self.model.state_dict(keep_vars=True).items() if k in wanted}, self.dtype)
        missing = sorted(k for k in sig if not any(a in have for a in aliases.get(k, (k,))))
        unexpected = sorted(have - set(sig))
        if self.strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            raise DistLoadError("checkpoint does not match the model: " + "; ".join(parts)
                                + " (pass strict=False to load what matches)")
        unfilled = meta_buffers_not_loaded(self.model, wanted)
        if unfilled:
            raise DistLoadError(
                f"buffers {unfilled} are on the meta device and the checkpoint does not hold them; "
                "build the model under distload.empty_init(), which keeps buffers real")
        return _Match(frozenset(wanted), tuple(missing), tuple(unexpected))

    def _open_files(self, plan: LoadPlan, fds: dict[int, int]) -> dict[int, int]:
        """(owner ranks) Open and verify this rank's files under its own view of the path.

        Fills ``fds`` as it goes, so the caller closes whatever was opened
        even if a later file fails.
        """
        mine = [i for i, o in enumerate(plan.owners) if o == self.comm.rank]
        if plan.sharded is not None:  # files this rank reads its own slices from
            mine += sorted({c.file for c in plan.sharded.slices if c.owner == self.comm.rank} - set(mine))
        if not mine:
            return fds
        root = local_root(self.path)
        for i in mine:
            fds[i] = open_verified(plan, i, root)
        return fds

    def _destinations(self, plan: LoadPlan) -> Destinations:
        """(every rank) Real memory for everything this rank will receive."""
        if self.model is None:
            tensors = {}
            wants = plan_dtypes({k: plan.dtypes[k] for k in plan.shapes}, None, self.dtype)
            for name, shape in plan.shapes.items():
                tensors[name] = torch.empty(shape, dtype=wants[name], device=self.device)
            self.state_dict = tensors
            return Destinations(tensors, {}, lambda: None)
        was_meta = {k for k, v in self.model.state_dict(keep_vars=True).items() if v.device.type == "meta"}
        dests = sharded_destinations(self.model, self.device, self.dtype, plan, materialize, self.comm.rank)
        for name in self.match.missing:  # strict=False: reported as missing
            if name in was_meta:  # defined values; real tensors (computed buffers) keep theirs
                dests.tensors[name].zero_()
        self.local_bytes = local_bytes(dests.tensors)
        return dests

    def _transfer(self, plan: LoadPlan, dests: Destinations, fds: dict[int, int]) -> tuple[int, int]:
        """(all ranks) Walk the shared schedule: owners read, everyone receives and places."""
        comm, rank = self.comm, self.comm.rank
        host = torch.device("cpu")
        on_host = comm.device.type == "cpu"
        # On CPU one pool serves reading and receiving; on GPU the reads stage
        # through pinned host buffers and chunks land in a device buffer.
        pool = BufferPool(2, plan.bucket_bytes, host, pin=not on_host)
        dev_pool = pool if on_host else BufferPool(1, plan.bucket_bytes, comm.device)
        chunks = [c for c in plan.chunks if c.nbytes]
        mine = [c for c in chunks if c.owner == rank]

        def in_place(chunk: Chunk, device: torch.device) -> torch.Tensor | None:
            if not chunk.direct:
                return None
            p = chunk.pieces[0]
            dest = dests.tensors[p.name]
            if not can_take_direct(dest, plan.dtypes[p.name], device):
                return None
            return byte_view(dest)[p.tensor_offset : p.tensor_offset + p.nbytes]

        reader = ChunkReader(plan, fds, mine, pool, lambda c: in_place(c, host) if on_host else None)
        bar = _progress_bar(plan.total_bytes) if self.progress else None
        error: BaseException | None = None
        try:
            for chunk in chunks:
                buf, release = None, []
                if error is None:
                    try:
                        buf, release = self._source(chunk, reader, pool, dev_pool, in_place)
                    except Exception as e:
                        error = e
                if comm.failed_ranks(error is not None):
                    comm.raise_agreed("transfer", error)
                comm.broadcast_(buf, chunk.owner)
                try:
                    if release or in_place(chunk, comm.device) is None:
                        for p in chunk.pieces:
                            try:
                                write_piece(dests.tensors[p.name], p, buf, plan.dtypes[p.name])
                            except Exception as e:
                                raise add_context(e, f"placing {p.name!r} from {plan.files[chunk.file].name}")
                except Exception as e:
                    error = e
                for p_, b in release:
                    p_.release(b)
                if bar is not None:
                    bar.update(chunk.nbytes)
            comm.agree("transfer", error)
        finally:
            reader.close()
            if bar is not None:
                bar.close()
        return reader.bytes_read, len(chunks)

    def _source(self, chunk: Chunk, reader: ChunkReader, pool: BufferPool, dev_pool: BufferPool,
                in_place: Callable) -> tuple[torch.Tensor, list]:
        """(every rank, per chunk) The buffer this rank passes to the broadcast.

        Owners get it from the reader (moving it to the device on GPUs);
        receivers take the destination's own memory when they can, else a
        pool buffer. Returns the buffer and the (pool, buffer) pairs to free.
        """
        comm = self.comm
        if chunk.owner == comm.rank:
            got, buf, pooled, err = reader.next()
            if err is not None:
                raise err
            assert got is chunk, "reader and schedule disagree"
            release = [(pool, buf)] if pooled else []
            if comm.device.type == "cpu":
                return buf, release
            target = in_place(chunk, comm.device)
            if target is None:
                target = dev_pool.acquire(chunk.nbytes)
                release_dev = [(dev_pool, target)]
            else:
                release_dev = []
            target.copy_(buf)  # synchronous: the pinned buffer can be reused at once
            for p_, b in release:
                p_.release(b)
            return target, release_dev
        target = in_place(chunk, comm.device)
        if target is not None:
            return target, []
        buf = dev_pool.acquire(chunk.nbytes)
        return buf, [(dev_pool, buf)]

    def _report(self, plan: LoadPlan, bytes_read: int, chunks: int, seconds: float) -> LoadReport:
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
            total_bytes=plan.total_bytes + (plan.sharded.total_bytes if plan.sharded else 0),
            seconds=seconds,
            local_bytes=self.local_bytes,
            read_policy=dict(plan.sharded.policies) if plan.sharded else {},
            missing_keys=sorted(set(self.match.missing)),
            unexpected_keys=list(self.match.unexpected),
            warnings=list(plan.warnings) + [f"index lists {k} but its file lacks it" for k in plan.missing_in_files],
            peak_rss_bytes=peak_rss_bytes(),
            chunks=chunks,
        )


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="distload", leave=False)
