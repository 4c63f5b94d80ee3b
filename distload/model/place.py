"""Placement: meta-initialized models, destination tensors, and writing bytes into them.

Runs on every rank, locally. :func:`empty_init` builds models whose parameters
live on the meta device (no memory, no init cost) while buffers stay real, so
values computed in ``__init__`` (rotary ``inv_freq``, ``position_ids``)
survive. :func:`model_placement` then gives every parameter real,
uninitialized memory on the target device, exactly once, keeping tied
weights tied, and returns the :class:`Placement` the transfer loop writes
through. Nothing here talks to other ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import DistLoadError
from ..format.dtypes import TORCH_DTYPES, param_dtypes, torch_dtype
from ..plan.keys import alias_groups
from .dtensor import is_dtensor


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Build modules with parameters on the meta device and real buffers.

    ``accelerate.init_empty_weights(include_buffers=False)`` under distload's
    name: buffers computed in ``__init__`` (rotary ``inv_freq``,
    ``position_ids``) keep their values. One difference: a parameter that is
    already on meta is registered as itself, so weights tied by assignment
    inside the block (``head.weight = embed.weight``) stay one object
    (accelerate would make a second meta parameter and untie them).

    Example::

        with distload.empty_init():
            model = MyModel(config)        # no parameter memory, no init cost
        distload.load_checkpoint(model, "/ckpt")
    """
    from accelerate import init_empty_weights

    plain = nn.Module.register_parameter
    with init_empty_weights(include_buffers=False):
        to_meta = nn.Module.register_parameter

        def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and param.device.type == "meta":
                plain(module, name, param)
            else:
                to_meta(module, name, param)

        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = to_meta  # type: ignore[method-assign]


class Placement:
    """(every rank, locally) Where each checkpoint key's bytes go on this rank, and putting them there.

    The transfer loop asks only two things, and learns nothing else about
    the model (casts, DTensor local shards, tied names, key conversions):

    - :meth:`resolve`: a byte view of the destination's own memory when a
      byte range of a checkpoint tensor can land there unchanged, else None;
    - :meth:`commit`: that byte range landed in a buffer instead; copy it
      into place, casting from the checkpoint dtype.

    ``dests[key]`` is a view of the tensor that checkpoint key ``key`` fills
    on this rank: a whole parameter, a DTensor's local shard, or a slice of a
    larger tensor (one expert of a fused weight), contiguous or not.
    ``dtypes[key]`` is the key's safetensors dtype. ``restore`` puts the
    model back on the meta device, so a failed load never leaves a
    half-filled model that looks usable.
    """

    def __init__(self, dests: dict[str, torch.Tensor], dtypes: dict[str, str],
                 restore: Callable[[], None] = lambda: None):
        self.dests, self.dtypes, self.restore = dests, dtypes, restore

    def resolve(self, name: str, offset: int, nbytes: int, device: torch.device) -> torch.Tensor | None:
        """Bytes ``[offset, offset + nbytes)`` of ``name``'s checkpoint data, as destination memory.

        None when they cannot land in place: a cast is needed, the destination
        is not contiguous, or it lives on another device than ``device``.
        """
        dest = self.dests[name]
        if dest.dtype != TORCH_DTYPES.get(self.dtypes[name]) or not dest.is_contiguous() or dest.device != device:
            return None
        return byte_view(dest)[offset : offset + nbytes]

    def commit(self, name: str, offset: int, src: torch.Tensor) -> None:
        """Bytes ``[offset, offset + len(src))`` of ``name``'s checkpoint data landed in ``src``: place them.

        ``src`` is a flat uint8 tensor (any device); ``offset`` is element-aligned.
        """
        dest = self.dests[name]
        st = torch_dtype(self.dtypes[name])
        if dest.dtype == st and dest.is_contiguous():
            byte_view(dest)[offset : offset + src.numel()].copy_(src)
            return
        if src.storage_offset() % st.itemsize:
            src = src.clone()  # reinterpreting needs element alignment; rare in real files
        write_flat(dest, offset // st.itemsize, src.view(st))


def write_flat(dest: torch.Tensor, first: int, values: torch.Tensor) -> None:
    """Write 1-D ``values`` at row-major positions ``[first, first + len)`` of ``dest``, in place.

    ``dest`` may be any strided view (a non-contiguous slice of a larger
    tensor); ``values`` is cast to ``dest``'s dtype.
    """
    n = values.numel()
    if n == 0:
        return
    if dest.is_contiguous():
        dest.view(-1)[first : first + n].copy_(values)
        return
    if dest.dim() == 1:
        dest[first : first + n].copy_(values)
        return
    row = math.prod(dest.shape[1:])
    r, o = divmod(first, row)
    done = 0
    if o:  # the tail of a partly covered first row
        done = min(row - o, n)
        write_flat(dest[r], o, values[:done])
        r += 1
    full = (n - done) // row
    if full:
        dest[r : r + full].copy_(values[done : done + full * row].view(full, *dest.shape[1:]))
        done += full * row
        r += full
    if done < n:  # the head of a partly covered last row
        write_flat(dest[r], 0, values[done:])


def model_signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) for every parameter and persistent buffer."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict(keep_vars=True).items()}


def tied_duplicates(model: nn.Module, stored: set[str]) -> set[str]:
    """Stored names that fill a tensor another stored name fills too: they are not loaded.

    When a checkpoint stores tied weights under several names, the tensor's
    own name wins (as in transformers), whatever the values; otherwise the
    first stored alias in state-dict order.
    """
    skip: set[str] = set()
    for group in set(alias_groups(model).values()):
        present = [n for n in group if n in stored]
        skip.update(present[1:])
    return skip


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype | None,
                undo: list, stored: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """(every rank) Give meta parameters real memory on ``device``; move buffers there.

    ``dtype`` casts floating-point parameters (not buffers such as masks).
    ``stored`` (state-dict name -> safetensors dtype, the plan's ``dtypes``)
    applies :func:`distload.format.dtypes.target_dtype`: only parameters stored as
    F16/BF16/F32/F64 are cast; FP8/FP4 tensors and their scales get the
    stored dtype.
    Parameters that were already real are moved, not reallocated, if needed,
    and stay the same objects when nothing needs to change (then the load
    writes into their memory). Meta parameters get their memory in place
    (:func:`torch.utils.swap_tensors`), so they stay the same objects too:
    a model whose failed load put it back on meta keeps its parameter
    objects through the retry. Appends to ``undo`` before each change, so
    :func:`restore_plain` undoes even a materialization that failed
    part-way. Returns every state-dict name's tensor; DTensors are left to
    :func:`distload.model.dtensor.materialize_dtensors`.
    """
    replaced: dict[int, nn.Parameter] = {}
    want_of = param_dtypes(model.named_parameters(remove_duplicate=False), dtype, stored)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or is_dtensor(p):
                continue
            new = replaced.get(id(p))
            if new is None:
                want = want_of(p)
                if p.device.type == "meta":
                    data = torch.empty(p.shape, dtype=want, device=device)
                elif p.device != device or p.dtype != want or not p.is_contiguous():
                    data = p.detach().to(device=device, dtype=want).contiguous()
                else:
                    data = None  # already right: the parameter itself is the destination
                new = p if data is None else nn.Parameter(data, requires_grad=p.requires_grad)
                if p.device.type == "meta" and _swap(p, new):
                    new = p  # the same object, now with real memory
                replaced[id(p)] = new
            undo.append((module, "_parameters", name, p))
            module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            if b is None or is_dtensor(b):
                continue
            if b.device.type == "meta":
                new_b = torch.empty(b.shape, dtype=b.dtype, device=device)  # must come from the checkpoint
            elif b.device != device or not b.is_contiguous():
                new_b = b.to(device).contiguous()
            else:
                continue
            undo.append((module, "_buffers", name, b))
            module._buffers[name] = new_b
    return {k: v.data if isinstance(v, nn.Parameter) else v for k, v in model.state_dict(keep_vars=True).items()}


def restore_plain(undo: list) -> None:
    """Undo :func:`materialize`: every slot gets its original parameter object back, on meta; buffers
    get their original tensors.

    Parameters may share memory that was partly written, so none keeps it.
    Each original parameter goes to meta once, in place
    (:func:`torch.utils.swap_tensors`), so it stays the same object, of the
    same type, in every slot that held it: weights tied before the load stay
    tied, an optimizer's references stay valid, and a retry loads strictly.
    Original buffers were only copied from, so they keep their values.
    """
    real: dict[int, torch.Tensor] = {}
    for module, slot, name, old in reversed(undo):
        getattr(module, slot)[name] = old
        if slot == "_parameters" and old.device.type != "meta":
            real[id(old)] = old
    for p in real.values():
        if not _swap(p, _meta_twin(p)):  # it cannot be swapped: one new meta parameter in all its slots, still tied
            twin = _meta_twin(p)
            for module, slot, name, old in undo:
                if old is p:
                    getattr(module, slot)[name] = twin
    undo.clear()


def _swap(p: torch.Tensor, new: torch.Tensor) -> bool:
    """Give ``p`` the contents of ``new`` of the same type, keeping the Python object; False if it cannot be.

    ``swap_tensors`` refuses objects with weak references or other holders of
    their data (a live autograd graph); a subclass of Parameter is not
    swapped (``new`` would change its type).
    """
    if type(p) is not type(new):
        return False
    try:
        torch.utils.swap_tensors(p, new)
    except RuntimeError:
        return False
    return True


def _meta_twin(p: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``p``'s shape and dtype: a Parameter (with its ``requires_grad``) for a parameter."""
    meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else meta


def model_placement(model: nn.Module, device: torch.device, dtype: torch.dtype | None, st_dtypes: dict[str, str],
                    local_shapes: dict[str, tuple[int, ...]], zero: set[str]) -> Placement:
    """(every rank, locally) Real memory for every tensor of ``model`` on this rank, as a :class:`Placement`.

    DTensors get their local shards in place, each checked against
    ``local_shapes`` (the plan's view of this rank's shard); plain tensors are
    materialized whole. Names in ``zero`` (missing from the checkpoint, were
    on meta) are zero-filled. If anything fails part-way, every tensor is put
    back before the error propagates; after success the placement's
    ``restore`` does the same.
    """
    from . import dtensor

    undo: list = []
    dtensors = dtensor.has_dtensors(model)

    def restore() -> None:
        restore_plain(undo)
        if dtensors:
            dtensor.restore_dtensors(model)

    try:
        local = dtensor.materialize_dtensors(model, device, dtype, st_dtypes) if dtensors else {}
        tensors = materialize(model, device, dtype, undo, st_dtypes)
        tensors.update(local)
        for name, shape in local_shapes.items():
            t = local.get(name)
            if t is not None and tuple(t.shape) != tuple(shape) and (t.numel() or math.prod(shape)):
                raise DistLoadError(f"{name}: local shard is {list(t.shape)} but the plan expects {list(shape)}; "
                                    "does every rank shard the model the same way?")
        for name in zero:
            tensors[name].zero_()
    except BaseException:
        restore()
        raise
    return Placement(tensors, st_dtypes, restore)


def meta_buffers_not_loaded(model: nn.Module, loaded: set[str]) -> list[str]:
    """Buffers left on meta with nothing in the checkpoint to fill them."""
    persistent = set(model.state_dict(keep_vars=True))
    out = []
    for mname, module in model.named_modules():
        for bname, b in module._buffers.items():
            full = f"{mname}.{bname}" if mname else bname
            if b is not None and b.device.type == "meta" and (full not in persistent or full not in loaded):
                out.append(full)
    return out


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The flat uint8 view of a contiguous tensor's memory."""
    return t.reshape(-1).view(torch.uint8)


def local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of this rank's destinations, each storage range counted once (tied weights)."""
    seen, total = set(), 0
    for t in tensors.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
