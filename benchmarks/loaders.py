"""The loaders the benchmark compares, each filling the same Llama model.

Each loader has an untimed ``prepare`` (build the empty model, shard it) and a
timed ``load`` that returns the model it filled, or for the floor the raw
buffers. ``mode`` is ``"replicated"`` (every rank holds every parameter) or
``"fsdp"`` (FSDP2 ``fully_shard`` per decoder layer and the root; every rank
holds its Shard(0) pieces).

(all ranks) Every function here runs on every rank of the torchrun job.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

CHUNK = 64 << 20  # the floor's message size: distload's default bucket


@dataclass
class Ctx:
    """What a loader needs to know about this rank's job."""

    rank: int
    world: int
    mode: str  # "replicated" | "fsdp"
    path: Path  # this rank's view of the checkpoint directory
    device: torch.device
    ckpt: Path | None = None  # where config.json is read (the local copy, untimed)
    mesh: Any = None  # DeviceMesh in fsdp mode
    extra: dict = field(default_factory=dict)  # loader facts for the report (bytes read, policy ...)

    @functools.cached_property
    def config(self) -> Any:
        """The transformers LlamaConfig; imported only by loaders that build a model."""
        from transformers import LlamaConfig

        return LlamaConfig.from_pretrained(self.ckpt or self.path)

    @property
    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def meta_model(ctx: Ctx, how: str = "distload") -> nn.Module:
    """The bf16 Llama with parameters on meta and real buffers (rotary ``inv_freq``)."""
    from transformers import LlamaForCausalLM

    if how == "accelerate":
        from accelerate import init_empty_weights

        ctxm = init_empty_weights(include_buffers=False)
    else:
        import distload

        ctxm = distload.empty_init()
    with ctxm, _default_dtype(torch.bfloat16):
        return LlamaForCausalLM(ctx.config)


def shard(model: nn.Module, ctx: Ctx) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return model


def alloc_empty(model: nn.Module, device: torch.device) -> nn.Module:
    """Give meta parameters uninitialized memory, keeping the real buffers' values."""
    keep = {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in keep:
                b.copy_(keep[n])
    return model


def hf_dtype_kw() -> str:
    """The name transformers gives a model's dtype (``from_pretrained`` keyword, config attribute).

    ``dtype`` from 4.56; before, ``torch_dtype``, and an unknown ``dtype=`` is
    silently ignored there (the model then loads in float32).
    """
    import transformers

    release = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if release >= (4, 56) else "torch_dtype"


class Loader:
    """One way of loading; ``owned`` says whether it returns its own memory or page-cache views."""

    name = ""
    modes: tuple[str, ...] = ("replicated", "fsdp")
    extra = False  # run only when a config names it (world 1, CUDA, --loaders), not by default
    requires: tuple[str, ...] = ()  # modules it imports: a machine without one skips it

    def missing(self) -> str | None:
        """Why this machine cannot run the loader (a peer's package is not installed), or None."""
        for mod in self.requires:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"{mod} is not installed"
        return None

    def prepare(self, ctx: Ctx) -> Any:
        """(untimed) Everything a user would have before calling the loader."""
        return None

    def load(self, ctx: Ctx, state: Any) -> nn.Module | dict[str, torch.Tensor]:
        """(timed) Fill the model; return it (or the tensors it filled)."""
        raise TypeError(f"{type(self).__name__} must define load")


class Distload(Loader):
    name = "distload"

    def prepare(self, ctx: Ctx) -> nn.Module:
        model = meta_model(ctx)
        return shard(model, ctx) if ctx.mode == "fsdp" else model

    def load(self, ctx: Ctx, model: nn.Module) -> nn.Module:
        import distload

        kw = {}
        if ctx.extra.get("read_policy"):
            kw["read_policy"] = ctx.extra["read_policy"]
        if ctx.extra.get("io_threads"):
            kw["io_threads"] = ctx.extra["io_threads"]
        report = distload.load_checkpoint(model, ctx.path, device=ctx.device, progress=False, **kw)
        ctx.extra["reported_bytes_read"] = report.bytes_read
        policy = getattr(report, "read_policy", None) or {}
        if policy:  # tensor -> "scatter" | "slice": keep the counts
            ctx.extra["policy_counts"] = {p: list(policy.values()).count(p) for p in sorted(set(policy.values()))}
        return model


class Transformers(Loader):
    """``from_pretrained`` on every rank; in fsdp mode, then ``fully_shard`` (load everything, then shard)."""

    name = "transformers"
    requires = ("transformers",)

    def load(self, ctx: Ctx, state: Any) -> nn.Module:
        from transformers import LlamaForCausalLM

        kw = {"device_map": str(ctx.device)} if ctx.device.type == "cuda" else {}
        kw[hf_dtype_kw()] = torch.bfloat16
        model = LlamaForCausalLM.from_pretrained(ctx.path, **kw)
        return shard(model, ctx) if ctx.mode == "fsdp" else model


class Accelerate(Loader):
    """``init_empty_weights`` + ``load_checkpoint_in_model`` on every rank (replicated only)."""

    name = "accelerate"
    modes = ("replicated",)
    requires = ("accelerate",)

    def prepare(self, ctx: Ctx) -> nn.Module:
        return meta_model(ctx, "accelerate")

    def load(self, ctx: Ctx, model: nn.Module) -> nn.Module:
        from accelerate.utils import load_checkpoint_in_model

        load_checkpoint_in_model(model, str(ctx.path), device_map={"": str(ctx.device)})
        return model


class DCP(Loader):
    """torch DCP ``dcp.load`` with ``HuggingFaceStorageReader`` into the (sharded) model."""

    name = "dcp"

    def missing(self) -> str | None:
        import torch.distributed.checkpoint as dcp

        if not hasattr(dcp, "HuggingFaceStorageReader"):
            return f"torch {torch.__version__} has no HuggingFaceStorageReader"
        return None

    def prepare(self, ctx: Ctx) -> nn.Module:
        model = meta_model(ctx)
        return shard(model, ctx) if ctx.mode == "fsdp" else model

    def load(self, ctx: Ctx, model: nn.Module) -> nn.Module:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        alloc_empty(model, ctx.device)
        dcp.load(model.state_dict(), storage_reader=HuggingFaceStorageReader(str(ctx.path)))
        return model


class FastSafetensors(Loader):
    """fastsafetensors: files split over ranks, then ``get_tensor`` (broadcast) or ``get_sharded`` (scatter)."""

    name = "fastsafetensors"
    requires = ("fastsafetensors",)

    def prepare(self, ctx: Ctx) -> nn.Module:
        model = meta_model(ctx)
        return shard(model, ctx) if ctx.mode == "fsdp" else model

    def load(self, ctx: Ctx, model: nn.Module) -> nn.Module:
        from fastsafetensors import SafeTensorsFileLoader

        files = [str(f) for f in ctx.files]
        device = str(ctx.device) if ctx.device.type == "cuda" else "cpu"  # it wants "cuda:N", not "cuda"
        loader = SafeTensorsFileLoader(dist.group.WORLD, device, nogds=True, set_numa=False)
        try:
            loader.add_filenames({r: files[r::ctx.world] for r in range(ctx.world)})
            fb = loader.copy_files_to_device()
            try:
                if ctx.mode == "replicated":
                    sd = {k: fb.get_tensor(k) for k in loader.get_keys()}
                    model.load_state_dict(sd, assign=True, strict=True)
                else:
                    alloc_empty(model, ctx.device)
                    params = dict(model.state_dict(keep_vars=True))
                    with torch.no_grad():
                        for k in loader.get_keys():
                            piece = fb.get_sharded(k, 0)
                            params[k].to_local().copy_(piece)
                            del piece
            finally:
                fb.close()
        finally:
            loader.close()
        return model


class Rank0Broadcast(Loader):
    """accelerate's FSDP2 path: rank 0 loads the full state dict, then per parameter
    ``broadcast`` + ``distribute_tensor`` and ``load_state_dict(assign=True)``."""

    name = "rank0_bcast"
    modes = ("fsdp",)

    def prepare(self, ctx: Ctx) -> nn.Module:
        return shard(meta_model(ctx), ctx)

    def load(self, ctx: Ctx, model: nn.Module) -> nn.Module:
        from safetensors.torch import load_file
        from torch.distributed.tensor import distribute_tensor

        full: dict[str, torch.Tensor] = {}
        if ctx.rank == 0:
            for f in ctx.files:
                full.update(load_file(f, device=str(ctx.device)))
        out = {}
        for name, meta in model.state_dict().items():
            t = full.pop(name) if ctx.rank == 0 else torch.empty(meta.shape, dtype=meta.dtype, device=ctx.device)
            dist.broadcast(t, src=0)
            out[name] = nn.Parameter(distribute_tensor(t, meta.device_mesh, meta.placements),
                                     requires_grad=meta.requires_grad)
            del t
        model.load_state_dict(out, assign=True)
        return model


def owners_of(sizes: list[int], world: int) -> list[int]:
    """Largest file first onto the least-loaded rank (distload's balancing, for the floor)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda x: (load[x], x))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def schedule(sizes: list[int], owners: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """(file, offset, nbytes) chunks, interleaved so every owner's reads stay in flight."""
    streams: dict[int, list[tuple[int, int, int]]] = {}
    for i, size in enumerate(sizes):
        streams.setdefault(owners[i], []).extend((i, off, min(chunk, size - off)) for off in range(0, size, chunk))
    sent = {r: 0 for r in streams}
    out = []
    while any(streams.values()):
        r = min((r for r in streams if streams[r]), key=lambda x: (sent[x], x))
        c = streams[r].pop(0)
        sent[r] += c[2]
        out.append(c)
    return out


def _read_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at {offset + done}")
        done += n


class Floor(Loader):
    """The transport floor: owners read their files' real bytes (on a thread, ahead of
    the sender) and broadcast them, or scatter equal pieces, into fresh memory."""

    name = "floor"

    def load(self, ctx: Ctx, state: Any) -> dict[str, torch.Tensor]:
        files = ctx.files
        sizes = [f.stat().st_size for f in files]
        owners = owners_of(sizes, ctx.world)
        sched = schedule(sizes, owners, ctx.extra.get("chunk", CHUNK))
        mine = [c for c in sched if owners[c[0]] == ctx.rank]
        fds = {i: os.open(files[i], os.O_RDONLY) for i in range(len(files)) if owners[i] == ctx.rank}
        try:
            if ctx.mode == "replicated":
                return self._broadcast(ctx, files, sizes, owners, sched, mine, fds)
            return self._scatter(ctx, files, sizes, owners, sched, mine, fds)
        finally:
            for fd in fds.values():
                os.close(fd)

    @staticmethod
    def _reader(fds: dict, mine: list, target, out: queue.Queue, ahead: threading.Semaphore | None) -> threading.Thread:
        def run() -> None:
            for c in mine:
                if ahead is not None:
                    ahead.acquire()
                buf = target(c)
                try:
                    _read_into(fds[c[0]], buf, c[1])
                    out.put((c, buf, None))
                except BaseException as e:
                    out.put((c, buf, e))
                    return

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def _broadcast(self, ctx, files, sizes, owners, sched, mine, fds) -> dict[str, torch.Tensor]:
        dest = {f.name: torch.empty(s, dtype=torch.uint8, device=ctx.device) for f, s in zip(files, sizes)}
        got: queue.Queue = queue.Queue()
        thread = self._reader(fds, mine, lambda c: dest[files[c[0]].name][c[1]: c[1] + c[2]], got, None)
        for c in sched:
            buf = dest[files[c[0]].name][c[1]: c[1] + c[2]]
            if owners[c[0]] == ctx.rank:
                _, buf, err = got.get()
                if err is not None:
                    raise err
            dist.broadcast(buf, src=owners[c[0]])
        thread.join()
        return dest

    def _scatter(self, ctx, files, sizes, owners, sched, mine, fds) -> dict[str, torch.Tensor]:
        w = ctx.world
        piece = lambda n: -(-n // w)  # noqa: E731
        dest = {}
        for i, f in enumerate(files):
            total = sum(piece(c[2]) for c in sched if c[0] == i)
            dest[f.name] = torch.empty(total, dtype=torch.uint8, device=ctx.device)
        pos = {f.name: 0 for f in files}
        pool: queue.Queue = queue.Queue()
        chunk = ctx.extra.get("chunk", CHUNK)
        for _ in range(2):
            pool.put(torch.empty(piece(chunk) * w, dtype=torch.uint8, device=ctx.device))
        ahead = threading.Semaphore(2)
        got: queue.Queue = queue.Queue()

        def target(c):
            buf = pool.get()
            return buf[: c[2]]

        thread = self._reader(fds, mine, target, got, ahead)
        for c in sched:
            name = files[c[0]].name
            n = piece(c[2])
            out = dest[name][pos[name]: pos[name] + n]
            pos[name] += n
            if owners[c[0]] == ctx.rank:
                _, buf, err = got.get()
                if err is not None:
                    raise err
                full = buf._base if buf._base is not None else buf
                dist.scatter(out, list(full[: n * w].split(n)), src=owners[c[0]])
                pool.put(full)
                ahead.release()
            else:
                dist.scatter(out, None, src=owners[c[0]])
        thread.join()
        return dest


class HostToDevice(Loader):
    """GPU reference: one copy of the checkpoint's bytes from pinned host memory onto the device.

    The bytes are read into pinned memory untimed; the timer covers the copy only.
    """

    name = "h2d_copy"
    modes = ("replicated",)

    def prepare(self, ctx: Ctx) -> list[torch.Tensor]:
        out = []
        for f in ctx.files:
            buf = torch.empty(f.stat().st_size, dtype=torch.uint8, pin_memory=True)
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(memoryview(buf.numpy()))
            out.append(buf)
        return out

    def load(self, ctx: Ctx, host: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for i, buf in enumerate(host):
            out[str(i)] = torch.empty_like(buf, device=ctx.device).copy_(buf, non_blocking=True)
        torch.cuda.synchronize(ctx.device)
        return out


class DistloadStateDict(Loader):
    """``distload.load_state_dict``: every tensor in a dict, no model (the read-floor comparison)."""

    name = "distload_sd"
    modes = ("replicated",)
    extra = True

    def load(self, ctx: Ctx, state: Any) -> dict[str, torch.Tensor]:
        from distload.loader import load_state_dict_with_report

        kw = {"io_threads": ctx.extra["io_threads"]} if ctx.extra.get("io_threads") else {}
        sd, report = load_state_dict_with_report(ctx.path, device=ctx.device, progress=False, **kw)
        ctx.extra["reported_bytes_read"] = report.bytes_read
        return sd


class SafetensorsLoadFile(Loader):
    """``safetensors.torch.load_file(f, device=...)`` for every file, on every rank."""

    name = "safetensors"
    modes = ("replicated",)
    extra = True

    def load(self, ctx: Ctx, state: Any) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in ctx.files:
            out.update(load_file(f, device=str(ctx.device)))
        return out


READ_PIECE = 8 << 20  # the read floors' request size


class ReadFloor(Loader):
    """The read floor: this rank's files (distload's balancing) read with ``threads`` threads.

    On CPU into fresh memory allocated inside the timer, so first-touch page
    faults count as they do for every owned-memory loader; on CUDA into pinned
    host memory allocated untimed (what a loader's reusable staging costs).
    """

    modes = ("replicated",)
    extra = True

    def __init__(self, threads: int):
        self.threads = threads
        self.name = f"read{threads}"

    def _mine(self, ctx: Ctx) -> list[Path]:
        files = ctx.files
        owners = owners_of([f.stat().st_size for f in files], ctx.world)
        return [f for f, o in zip(files, owners) if o == ctx.rank]

    def prepare(self, ctx: Ctx) -> dict[str, torch.Tensor] | None:
        if ctx.device.type != "cuda":
            return None
        return {f.name: torch.empty(f.stat().st_size, dtype=torch.uint8, pin_memory=True) for f in self._mine(ctx)}

    def load(self, ctx: Ctx, pinned: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        from concurrent.futures import ThreadPoolExecutor

        mine = self._mine(ctx)
        dest = pinned if pinned is not None else {
            f.name: torch.empty(f.stat().st_size, dtype=torch.uint8) for f in mine}
        fds = {f.name: os.open(f, os.O_RDONLY) for f in mine}
        try:
            jobs = [(fds[f.name], dest[f.name][off: off + READ_PIECE], off)
                    for f in mine for off in range(0, dest[f.name].numel(), READ_PIECE)]
            with ThreadPoolExecutor(self.threads) as pool:
                for _ in pool.map(lambda j: _read_into(*j), jobs):
                    pass
        finally:
            for fd in fds.values():
                os.close(fd)
        return dest


LOADERS: dict[str, Loader] = {L.name: L for L in (
    Distload(), Transformers(), Accelerate(), DCP(), FastSafetensors(), Rank0Broadcast(), Floor(),
    DistloadStateDict(), SafetensorsLoadFile(), *(ReadFloor(n) for n in (1, 2, 4, 8)))}
FLOORS = ("floor", "h2d_copy", "read1", "read2", "read4", "read8")  # references, not loaders


def loaders_for(mode: str) -> list[str]:
    """The loaders every run of ``mode`` measures (extras run when a config names them)."""
    return [n for n, L in LOADERS.items() if mode in L.modes and not L.extra]
