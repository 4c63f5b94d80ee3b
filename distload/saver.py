"""The save driver: plan -> open -> transfer -> write -> commit, the only place that sequences a save.

(all ranks) :func:`save_checkpoint` writes a Hugging Face-format sharded
safetensors checkpoint from a replicated, FSDP2, tensor-parallel or 2-D mesh
model. Files are spread over ranks (balanced by bytes, nodes first); a
DTensor's pieces travel point to point to the writer of their file, each
rank sending exactly the elements it holds; plain tensors are written by the
writer from its own memory. See :mod:`distload.io.writer` for staging and
:mod:`distload.io.commit` for how the result replaces the folder, and what a
failure leaves there. A save to ``s3://bucket/prefix`` writes through the
object-storage sink (:mod:`distload.storage.s3`) instead: multipart uploads,
completed once every writer is done, the index last.

The CLI (load a checkpoint, save it again) is :mod:`distload.save`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import pickle
import secrets
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import DistLoadError, add_context
from .format.discover import expand_path
from .format.dtypes import TORCH_DTYPES
from .io.commit import REPLACED, CommitError, commit_directory, observe, resolve_target, stage_identity
from .io.writer import (
    OutFile,
    StagingPool,
    WriteQueue,
    remove_stage,
    stage_dir,
    target_of,
    write_small,
)
from .model.dtensor import is_dtensor, shardings
from .model.save_keys import output_tensors, signature, state_tensors
from .plan.control import SAVE_REPORT, PlanEntry, digest32, digest64, names_extra, roster
from .plan.save_plan import (
    INDEX_NAME,
    Chunk,
    SavePlan,
    build_plan,
    contributions,
    local_box,
    own_parts,
    parse_size,
)
from .report import peak_rss_bytes
from .save_report import SaveReport
from .storage.base import Output, Sink, is_object_uri
from .transport.bootstrap import make_comm, rank_info
from .transport.comm import (
    DEFAULT_TIMEOUT_S,
    Comm,
    broken_error,
    describe,
    format_traceback,
)

DEFAULT_BUCKET_MB = 64
# Chunks with shard pieces per status exchange: a failure is agreed at most this many chunks late,
# while every rank keeps sending and receiving with stand-in bytes (never a wait on a failed peer).
AGREE_EVERY = 16
_SAVE_SEQ = itertools.count()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    process_group=None,
    comm: str = "torch",
) -> SaveReport:
    """(all ranks) Write ``model`` as a sharded safetensors checkpoint in directory ``path``.

    Call it on every rank. The result is what ``save_pretrained`` writes for
    a transformers model (same keys, MoE experts per expert, tied weights
    once, ``config.json`` and ``generation_config.json``), always as
    ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``,
    and it loads with ``from_pretrained``, ``safetensors`` and
    :func:`distload.load_checkpoint`.

    Args:
        model: a plain, DDP-style replicated, FSDP2, tensor-parallel or 2-D mesh model;
            every non-meta tensor of its state dict is written (non-persistent buffers are not).
        path: the checkpoint directory, or ``s3://bucket/prefix`` (``pip install 'distload[s3]'``;
            see the README for what a concurrent reader of the prefix can observe). An existing
            checkpoint there is replaced only once the
            new one is complete; its other files (a tokenizer, a README) are kept. A symlink is
            followed: the save replaces the checkpoint in the folder it points to, and the link stays.
            ``~`` and ``$VARS`` are expanded (:func:`distload.format.discover.expand_path`).
        max_shard_size: the largest file, as bytes or ``"5GB"`` / ``"500MiB"``
            (a single larger tensor gets a file of its own, as in transformers).
        dtype: cast floating-point tensors to this dtype as they are written.
        bucket_mb: the size of each transfer and of each of the (two) staging buffers a writer holds.
        timeout_s: collective timeout when distload creates the process group.
        process_group: the group to save over (default: the default group, created from the
            launcher's environment if missing). ``comm="mpi"``: an mpi4py communicator.
        comm: ``"torch"`` (torch.distributed) or ``"mpi"`` (mpi4py) transport.

    Any failure on any rank raises the same :class:`DistLoadError` on every rank,
    and leaves no index and no temporary file. A failure while rank 0 swaps the new
    checkpoint in says what the folder holds now (see :mod:`distload.io.commit`).

    Example::

        report = distload.save_checkpoint(model, "/ckpt/step-1000", max_shard_size="5GB")
        if report.rank == 0:
            print(report.summary())
    """
    device = _model_device(model)
    transport = make_comm(device, process_group, timeout_s, comm)
    if not bucket_mb > 0:
        raise DistLoadError(f"bucket_mb must be a positive number of MiB, not {bucket_mb}")
    target = str(path) if is_object_uri(path) else expand_path(path)  # s3://b/p is never a relative path
    return _Save(transport, model, target, parse_size(max_shard_size), dtype,
                 int(bucket_mb * (1 << 20))).run()


def _model_device(model: nn.Module) -> torch.device:
    for v in model.state_dict(keep_vars=True).values():
        local = v._local_tensor if is_dtensor(v) else v
        if not local.is_meta:
            return local.device
    return torch.device("cpu")


def _torch_dtype(st: str) -> torch.dtype:
    return TORCH_DTYPES[st]


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def _shape(box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _noted(err: DistLoadError, rank: int, note: str) -> DistLoadError:
    """``err`` with ``note`` (what the target holds) added to its message and to this rank's cause."""
    failures = dict(err.failures)
    failures[rank] = f"{failures.get(rank, str(err))}; {note}"
    return DistLoadError(f"{err}\n  {note}", phase=err.phase, failures=failures, agreed=err.agreed,
                         tracebacks=err.tracebacks)


def _contiguous_within(sub, box) -> int | None:
    """Element offset of ``sub`` inside ``box`` when ``sub`` is one contiguous run of ``box``'s
    row-major order, else None."""
    lens, full = _shape(sub), _shape(box)
    d = next((j for j, n in enumerate(lens) if n != 1), len(lens))
    if any(lens[j] != full[j] for j in range(d + 1, len(lens))):
        return None
    flat = 0
    for (a, _), (pa, _), n in zip(sub, box, full):
        flat = flat * n + (a - pa)
    return flat


class _Save:
    """One save on one rank. ``run`` is collective."""

    def __init__(self, comm: Comm, model: nn.Module, target: Path | str, max_shard_size: int,
                 dtype: torch.dtype | None, bucket_bytes: int):
        self.comm, self.model, self.target = comm, model, target
        self.max_shard_size, self.dtype, self.bucket_bytes = max_shard_size, dtype, bucket_bytes
        self.phase = "start"
        self.seq = next(_SAVE_SEQ)
        self.error: BaseException | None = None  # a local failure, agreed on at the next check
        self.sent = self.received = self.gathered = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.stage: Path | None = None  # rank 0: the staging directory it created, until the commit takes it
        self.plan_stage: str | None = None  # the staging directory, from the plan
        self.stage_id: tuple[int, int] | None = None  # the staging directory's (device, inode), as seen here
        self.outcome: str | None = None  # what the target holds, once this rank knows (commit onwards)
        self.warnings: list[str] = []
        self.remote = isinstance(target, str)  # object storage: files go through self.sink
        self.sink: Sink | None = None
        self.began = False  # rank 0 began the sink, so a failure discards what it wrote
        self.roster: list = []  # rank 0: every rank's place, from the plan phase's records

    def run(self) -> SaveReport:
        t0 = time.perf_counter()
        plan: SavePlan | None = None
        files: dict[int, Output] = {}
        queue: WriteQueue | None = None
        ok = False
        try:
            plan = self.make_plan()
            self.plan_stage = plan.stage
            self.phase = "open"
            err = None
            try:
                if self.remote:
                    self.sink = self.sink or _object_sink(str(self.target))
                else:
                    self.stage_id = stage_identity(Path(plan.stage))
                queue = WriteQueue()
                for i in plan.files_of(self.comm.rank):
                    spec = plan.files[i]
                    files[i] = (self.sink.create(spec.name, spec.size) if self.sink is not None
                                else OutFile(Path(plan.stage), spec.name, spec.size))
                    files[i].write(0, memoryview(spec.header))
            except Exception as e:
                err = add_context(e, f"creating this rank's files in {plan.stage}")
            self.comm.agree("open", err)
            self.phase = "transfer"
            self.transfer(plan, files, queue)
            self.phase = "write"
            err = queue.close() or self.error
            written = queue.bytes_written + sum(len(plan.files[i].header) for i in files)
            queue = None
            if err is None:
                try:
                    for f in files.values():
                        f.finish()
                except Exception as e:
                    err = add_context(e, "fsync and rename")
            self.comm.agree("write", err)
            if self.remote:  # every part of every file is uploaded: only now may they replace older objects
                self.phase = "publish"
                err = None
                try:
                    for f in files.values():
                        f.publish()
                except Exception as e:
                    err = add_context(e, "completing this rank's uploads")
                self.comm.agree("publish", err)
            self.phase = "commit"
            err = None
            if self.comm.rank == 0:
                try:
                    self.commit(plan)
                except CommitError as e:  # its message says what the folder holds
                    err = add_context(e, "committing")
                except Exception as e:
                    err = add_context(e, f"committing {self.target} (it is unchanged)")
            self.comm.agree("commit", err)
            where = self.target if self.remote else target_of(Path(plan.stage))
            self.outcome = f"{where} holds the new checkpoint, complete"
            ok = True
            self.phase = "report"
            return self.report(plan, files, written, time.perf_counter() - t0)
        except DistLoadError:
            raise
        except Exception as e:  # a collective broke: a peer died, timed out or diverged
            raise self._broken(e) from e
        finally:
            if not ok:
                self._cleanup(plan, files, queue)
            if self.sink is not None:
                self.sink.close()

    # ---- plan ----------------------------------------------------------------

    def make_plan(self) -> SavePlan:
        """(all ranks) Each rank sends rank 0 one record; rank 0 checks, plans and stages; all receive the plan.

        The record (:class:`~distload.plan.control.PlanEntry`) carries the
        rank's node and a digest of its model's state dict; names come from
        each node's local rank 0 and errors from failed ranks only, so no rank
        but rank 0 receives anything that grows with the world.
        """
        self.phase = "plan"
        comm = self.comm
        local: Exception | None = None
        info = None
        try:
            self.tensors = state_tensors(self.model)
            digest = hashlib.sha256(repr(signature(self.tensors)).encode()).hexdigest()
            info = rank_info(comm.rank)
            # The device type decides the agreement schedule: a mix would hang. It rides as a digest.
            entry = PlanEntry(digest64(info.node_key), digest32(digest), digest32(comm.device.type), 0,
                              info.local_rank, False)
            extra = names_extra(info.host, info.node_key) if info.local_rank == 0 else None
        except Exception as e:
            local, entry = e, PlanEntry(0, 0, 0, 0, 0, True)
            extra = pickle.dumps((describe(e), format_traceback(e)), protocol=pickle.HIGHEST_PROTOCOL)
        got = comm.gather_records(entry.pack(), extra)
        answer = self._plan_on_coordinator(got, info) if got is not None else None
        answer = comm.broadcast_object(answer)
        if answer[0] == "fail":
            raise DistLoadError.from_failures("plan", answer[1], answer[2]) from local
        return answer[1]

    def _plan_on_coordinator(self, got: list[tuple[bytes, bytes | None]], mine) -> tuple:
        """(rank 0) ``("plan", plan)``, or ``("fail", failures, tracebacks)`` naming the ranks to blame."""
        entries, failed, self.roster = roster(got, mine)
        if failed:
            return "fail", {r: m[0] for r, m in failed.items()}, {r: m[1] for r, m in failed.items()}
        mine_type = self.comm.device.type
        names = {digest32(t): t for t in (mine_type, "cpu", "cuda", "xpu", "mps", "hpu", "meta")}
        devices = {r: names.get(e.path, "another device type") for r, e in enumerate(entries)
                   if e.path != entries[0].path}
        if devices:
            return "fail", {r: f"its model is on {d} but rank 0's is on {mine_type}; every rank must save from "
                               "the same device type" for r, d in devices.items()}, None
        odd = {r: "its model's state dict (names, shapes, dtypes or sharding) differs from rank 0's"
               for r, e in enumerate(entries) if e.check != entries[0].check}
        if odd:
            return "fail", odd, None
        try:
            outs = output_tensors(self.model, self.tensors, self.dtype)
            used = {o.source for o in outs}
            sh = {k: v for k, v in shardings(self.model, getattr(self.comm, "group", None)).items() if k in used}
            shapes = {k: tuple(v.shape) for k, v in self.tensors.items() if k in used}
            if self.remote:
                self.sink = _object_sink(str(self.target))
                self.began = True
                stage = self.sink.begin()
            else:
                target = resolve_target(self.target)  # a symlink: the folder it points to
                target.parent.mkdir(parents=True, exist_ok=True)
                stage = stage_dir(target, secrets.token_hex(6))
                os.mkdir(stage)
                self.stage = stage
            return "plan", build_plan(outs, sh, shapes, self.roster, max_shard_size=self.max_shard_size,
                                      bucket_bytes=self.bucket_bytes, stage=str(stage))
        except Exception as e:
            return "fail", {0: describe(e)}, {0: format_traceback(e)}

    # ---- transfer --------------------------------------------------------------

    def _local(self, source: str) -> torch.Tensor:
        v = self.tensors[source]
        return (v._local_tensor if is_dtensor(v) else v).detach()

    def transfer(self, plan: SavePlan, files: dict[int, Output], queue: WriteQueue) -> None:
        """(all ranks) Walk the chunks: writers assemble and queue writes; holders of shards send theirs.

        A writer works out who sends it what (:func:`contributions`); any
        other rank only what it sends (:func:`own_parts`), and ranks with
        nothing in a chunk skip it. A failure anywhere (a write error on the
        writer thread included) is agreed on every :data:`AGREE_EVERY`
        chunks with shard pieces: meanwhile a failed rank still sends and
        receives every message, with stand-in bytes, so no peer is left
        waiting, and nothing it received is written.

        The scratch buffer (one chunk of received or packed bytes, on the
        transport's device) is reserved before the first such chunk, so a
        rank whose allocation fails says so at that chunk's agreement, and a
        rank whose step fails later still takes part in the chunk's
        messages with it, allocating nothing.
        """
        rank = self.comm.rank
        cap = max((c.nbytes for c in plan.chunks), default=0)
        pool = StagingPool(cap, 2)
        scratch: torch.Tensor | None = None  # one chunk's worth of received or packed bytes
        if any(c.remote for c in plan.chunks):
            try:
                scratch = torch.empty(cap, dtype=torch.uint8, device=self.comm.device)
            except Exception as e:  # agreed at the first remote chunk, before any message
                self.error = add_context(e, f"allocating a {cap}-byte transfer buffer on {self.comm.device}")

        def scratch_of(n: int) -> torch.Tensor:
            assert scratch is not None, "reserved before the first remote chunk's agreement"
            return scratch[:n]

        remote = 0
        for chunk in plan.chunks:
            if chunk.remote:
                if remote % AGREE_EVERY == 0:
                    self.comm.agree("transfer", self.error or queue.error())
                remote += 1
                if rank == chunk.writer:
                    self._gather(plan, chunk, contributions(plan, chunk), files, queue, pool, scratch_of)
                else:
                    mine = own_parts(plan, chunk, rank)
                    if mine:
                        self._send(plan, chunk, mine, scratch_of)
            elif rank == chunk.writer and self.error is None:  # after a failure, on to the next agreement
                self._write_local(plan, chunk, files, queue, pool)

    def _piece_view(self, plan: SavePlan, chunk: Chunk, buf: torch.Tensor, k: int) -> torch.Tensor:
        piece = chunk.pieces[k]
        t = plan.tensors[piece.tensor]
        n = math.prod(_shape(piece.box)) * _torch_dtype(t.dtype).itemsize
        return buf[piece.offset: piece.offset + n].view(_torch_dtype(t.dtype)).view(_shape(piece.box))

    def _region(self, plan: SavePlan, source: str):
        layout = plan.layout(source)
        return None if layout is None else layout.regions[self.comm.rank]

    def _copy_part(self, plan: SavePlan, chunk: Chunk, k: int, sub, dst_piece: torch.Tensor) -> None:
        """Copy this rank's elements ``sub`` (global coords) of piece ``k`` into its place in the piece."""
        piece = chunk.pieces[k]
        source = plan.tensors[piece.tensor].source
        region = self._region(plan, source)
        src_box = sub if region is None else local_box(region, sub)
        rel = tuple((a - pa, b - pa) for (a, b), (pa, _) in zip(sub, piece.box))
        dst_piece[_slices(rel)].copy_(self._local(source)[_slices(src_box)])

    def _write_local(self, plan: SavePlan, chunk: Chunk, files, queue: WriteQueue, pool: StagingPool) -> None:
        """(writer) A chunk of plain tensors: straight from the tensor's memory, or through staging to cast."""
        try:
            f = files[chunk.file]
            if len(chunk.pieces) == 1:
                piece = chunk.pieces[0]
                t = plan.tensors[piece.tensor]
                src = self._local(t.source)[_slices(piece.box)]
                if src.device.type == "cpu" and src.dtype == _torch_dtype(t.dtype) and src.is_contiguous():
                    queue.submit(f, chunk.offset, _as_bytes(src), what=f.name)
                    return
            buf = pool.get()
            try:
                for k, piece in enumerate(chunk.pieces):
                    self._copy_part(plan, chunk, k, piece.box, self._piece_view(plan, chunk, buf, k))
            except BaseException:
                pool.put(buf)
                raise
            queue.submit(f, chunk.offset, buf[: chunk.nbytes], lambda: pool.put(buf), f.name)
        except Exception as e:
            self.error = self.error or add_context(e, f"writing {plan.files[chunk.file].name}")

    def _gather(self, plan: SavePlan, chunk: Chunk, parts, files, queue: WriteQueue, pool: StagingPool,
                scratch_of) -> None:
        """(writer) Assemble a chunk from its own parts and every other holder's message, queue the write."""
        buf: torch.Tensor | None = None
        cpu = self.comm.device.type == "cpu"
        recvs, unpack = [], []
        pos = 0
        try:
            buf = pool.get()
            for src, mine in sorted(parts.items()):
                if src == self.comm.rank:
                    for k, sub in mine:
                        self._copy_part(plan, chunk, k, sub, self._piece_view(plan, chunk, buf, k))
                    continue
                sizes = [math.prod(_shape(sub)) * _torch_dtype(plan.tensors[chunk.pieces[k].tensor].dtype).itemsize
                         for k, sub in mine]
                if len(mine) == 1 and cpu:
                    k, sub = mine[0]
                    piece = chunk.pieces[k]
                    flat = _contiguous_within(sub, piece.box)
                    if flat is not None:
                        start = piece.offset + flat * _torch_dtype(plan.tensors[piece.tensor].dtype).itemsize
                        recvs.append((buf[start: start + sizes[0]], src))
                        self.received += sizes[0]
                        continue
                seg = scratch_of(pos + sum(sizes))[pos:]
                recvs.append((seg, src))
                unpack.append((seg, mine, sizes))
                pos += sum(sizes)
                self.received += sum(sizes)
        except Exception as e:
            self.error = self.error or add_context(e, f"assembling {plan.files[chunk.file].name}")
            # Still take every message, so the senders are not left waiting: into the scratch
            # buffer, which holds a whole chunk, allocating nothing.
            recvs, unpack, at = [], [], 0
            for s, n in self._message_sizes(plan, chunk, parts):
                recvs.append((scratch_of(at + n)[at:], s))
                at += n
        self.comm.exchange_([], recvs)
        self.gathered += 1
        if buf is None:
            return
        try:
            for seg, mine, sizes in unpack:
                off = 0
                for (k, sub), n in zip(mine, sizes):
                    t = plan.tensors[chunk.pieces[k].tensor]
                    data = seg[off: off + n].view(_torch_dtype(t.dtype)).view(_shape(sub))
                    rel = tuple((a - pa, b - pa) for (a, b), (pa, _) in zip(sub, chunk.pieces[k].box))
                    self._piece_view(plan, chunk, buf, k)[_slices(rel)].copy_(data)
                    off += n
            if self.error is None:
                queue.submit(files[chunk.file], chunk.offset, buf[: chunk.nbytes], lambda: pool.put(buf),
                             files[chunk.file].name)
                return
        except Exception as e:
            self.error = self.error or add_context(e, f"assembling {plan.files[chunk.file].name}")
        pool.put(buf)

    def _message_sizes(self, plan: SavePlan, chunk: Chunk, parts) -> list[tuple[int, int]]:
        return [(src, sum(math.prod(_shape(sub)) * _torch_dtype(plan.tensors[chunk.pieces[k].tensor].dtype).itemsize
                          for k, sub in mine))
                for src, mine in sorted(parts.items()) if src != self.comm.rank]

    def _send(self, plan: SavePlan, chunk: Chunk, mine, scratch_of) -> None:
        """(a holder) Send this rank's parts of a chunk to its writer as one message."""
        n = sum(math.prod(_shape(sub)) * _torch_dtype(plan.tensors[chunk.pieces[k].tensor].dtype).itemsize
                for k, sub in mine)
        msg = None
        try:
            if len(mine) == 1:
                k, sub = mine[0]
                t = plan.tensors[chunk.pieces[k].tensor]
                region = self._region(plan, t.source)
                src = self._local(t.source)[_slices(sub if region is None else local_box(region, sub))]
                if src.dtype == _torch_dtype(t.dtype) and src.is_contiguous() and src.device == self.comm.device:
                    msg = _as_bytes(src)
            if msg is None:
                msg = scratch_of(n)
                off = 0
                for k, sub in mine:
                    t = plan.tensors[chunk.pieces[k].tensor]
                    region = self._region(plan, t.source)
                    size = math.prod(_shape(sub)) * _torch_dtype(t.dtype).itemsize
                    dst = msg[off: off + size].view(_torch_dtype(t.dtype)).view(_shape(sub))
                    dst.copy_(self._local(t.source)[_slices(sub if region is None else local_box(region, sub))])
                    off += size
        except Exception as e:
            self.error = self.error or add_context(e, f"packing shards for {plan.files[chunk.file].name}")
            msg = scratch_of(n)  # the writer still expects n bytes (reserved: no allocation here)
        self.comm.exchange_([(msg, chunk.writer)], [])
        self.sent += n

    # ---- commit and report -------------------------------------------------------

    def configs(self) -> dict[str, bytes]:
        """``config.json`` (and ``generation_config.json``) as ``save_pretrained`` writes them; none for other models."""
        out: dict[str, bytes] = {}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            config = copy.deepcopy(config)
            config.architectures = [type(self.model).__name__.removeprefix("FSDP")]
            dtype = self.dtype or getattr(self.model, "dtype", None)
            if isinstance(dtype, torch.dtype):
                config.dtype = str(dtype).split(".")[1]
            out["config.json"] = config.to_json_string(use_diff=True).encode()
            gen = getattr(self.model, "generation_config", None)
            can_generate = getattr(self.model, "can_generate", lambda: False)
            if gen is not None and can_generate():
                out["generation_config.json"] = gen.to_json_string(use_diff=True).encode()
        return out

    def commit(self, plan: SavePlan) -> None:
        """(rank 0, once every file is complete on every rank) Configs, the index, then swap the directory in.

        On object storage: the configs, then the index (the object that makes the prefix a checkpoint),
        then the previous checkpoint's objects that the new one does not have are removed.
        """
        if self.sink is not None:
            for name, data in self.configs().items():
                self.sink.put_small(name, data)
            self.warnings = self.sink.commit(INDEX_NAME, plan.index_json().encode(), [f.name for f in plan.files])
            for w in self.warnings:
                warnings.warn(f"distload save: {w}", stacklevel=4)
            return
        stage = Path(plan.stage)
        for name, data in self.configs().items():
            write_small(stage / name, data)
        write_small(stage / INDEX_NAME, plan.index_json().encode())
        self.stage = None  # from here on the commit decides what is removed
        try:
            self.warnings = commit_directory(stage, target_of(stage))
        except CommitError as e:
            self.outcome = str(e)
            raise
        self.outcome = f"{target_of(stage)} holds the new checkpoint, complete"
        for w in self.warnings:
            warnings.warn(f"distload save: {w}", stacklevel=4)

    def report(self, plan: SavePlan, files: dict[int, Output], written: int, seconds: float) -> SaveReport:
        """(all ranks) This rank's report; rank 0's also holds every rank's figures, sent as one record each."""
        error, record, report = None, b"", None
        try:
            info = rank_info(self.comm.rank)
            report = SaveReport(rank=self.comm.rank, world_size=self.comm.world_size, host=info.host,
                                node=info.node_key, path=str(self.target),
                                files=sorted(plan.files[i].name for i in files), bytes_written=written,
                                bytes_sent=self.sent, bytes_received=self.received,
                                total_bytes=sum(f.size for f in plan.files), seconds=seconds,
                                peak_rss_bytes=peak_rss_bytes(), chunks=self.gathered,
                                warnings=list(self.warnings))
            record = SAVE_REPORT.pack(written, self.sent, self.received, self.gathered,
                                      report.peak_rss_bytes // 1024, seconds)
        except Exception as e:
            error = e
        self.comm.agree("report", error)
        assert report is not None
        got = self.comm.gather_records(record, extras=False)
        if got is not None:
            names: dict[int, list[str]] = {}
            for spec, w in zip(plan.files, plan.writers):
                names.setdefault(w, []).append(spec.name)
            for r, (rec, _) in enumerate(got):
                wrote, sent, received, chunks, kib, secs = SAVE_REPORT.unpack(rec)
                place = self.roster[r]
                report.ranks.append(dict(
                    rank=r, world_size=report.world_size, host=place.host, node=place.node_key,
                    path=report.path, files=sorted(names.get(r, [])), bytes_written=wrote, bytes_sent=sent,
                    bytes_received=received, total_bytes=report.total_bytes, seconds=secs,
                    gbps=report.total_bytes / secs / 1e9 if secs > 0 else 0.0, peak_rss_bytes=kib * 1024,
                    chunks=chunks))
        return report

    # ---- failure -------------------------------------------------------------------

    def _cleanup(self, plan: SavePlan | None, files: dict[int, Output], queue: WriteQueue | None) -> None:
        """(each rank, alone) Stop writing, remove this rank's temporary files; rank 0 removes the stage
        unless its commit has begun (finished files are never removed here: they may be the checkpoint).
        On object storage each rank aborts its uploads, and rank 0 removes the configs it wrote."""
        if queue is not None:
            queue.close()
        for f in files.values():
            f.abort()
        if self.stage is not None:  # rank 0, even when the plan never reached the others
            remove_stage(self.stage)
        if self.began and self.sink is not None:
            self.sink.discard()

    def _broken(self, e: Exception) -> DistLoadError:
        """(each surviving rank, alone) See :func:`distload.transport.comm.broken_error`.

        From the commit on, the error also says what the target holds: rank 0
        knows; a rank that lost contact while rank 0 was committing says what
        it sees (:func:`distload.io.commit.observe`); after the commit
        agreement every rank knows the new checkpoint is in place.
        """
        err = broken_error(self.comm, "distload save", self.phase, f"save.{self.seq}", e)
        if self.phase not in ("commit", "report") or self.plan_stage is None or self.remote:
            return err
        stage = Path(self.plan_stage)
        note = self.outcome
        if note is None:
            note = (f"{target_of(stage)} is unchanged" if self.comm.rank == 0
                    else observe(target_of(stage), stage, self.stage_id))
        return _noted(err, self.comm.rank, note)


def _object_sink(uri: str) -> Sink:
    """(every rank of a save to object storage) Where this rank's files go: multipart uploads under ``uri``.

    The previous checkpoint's objects it removes after the new index are the ones a local save
    replaces (:data:`distload.io.commit.REPLACED`) and those the previous index names.
    """
    from .storage.s3 import S3Sink

    return S3Sink(uri, REPLACED)
