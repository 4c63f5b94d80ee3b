"""Placement: meta-initialized models, destination tensors, and writing bytes into them.

Runs on every rank, locally. :func:`empty_init` builds models whose parameters
live on the meta device (no memory, no init cost) while buffers stay real, so
values computed in ``__init__`` (rotary ``inv_freq``, ``position_ids``)
survive. :func:`materialize` then gives every parameter real, uninitialized
memory on the target device, exactly once, keeping tied weights tied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .dtensor import is_dtensor
from .dtypes import TORCH_DTYPES, param_dtypes, torch_dtype
from .plan import Piece


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Build modules with parameters on the meta device and real buffers.

    Example::

        with distload.empty_init():
            model = MyModel(config)        # no parameter memory, no init cost
        distload.load_checkpoint(model, "/ckpt")
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            extra = {k: v for k, v in p.__dict__.items()}
            meta = type(p)(p.detach().to("meta"), requires_grad=p.requires_grad)
            meta.__dict__.update(extra)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass
class Destinations:
    """Where each checkpoint key's bytes go on this rank.

    ``tensors`` maps every state-dict name (tied aliases included) to its
    contiguous destination tensor; ``restore`` puts the model back on the meta
    device, so a failed load never leaves a half-filled model that looks usable.
    """

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, tuple[str, ...]]  # name -> every name sharing its storage
    restore: Callable[[], None]


def model_signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) for every parameter and persistent buffer."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict(keep_vars=True).items()}


def alias_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Names that share one tensor (tied weights), for each state-dict name."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return {n: tuple(group) for group in by_id.values() for n in group}


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                stored: Mapping[str, str] | None = None) -> Destinations:
    """(every rank) Give meta parameters real memory on ``device``; move buffers there.

    ``dtype`` casts floating-point parameters (not buffers such as masks).
    ``stored`` (state-dict name -> safetensors dtype, the plan's ``dtypes``)
    applies :func:`distload.dtypes.target_dtype`: only parameters stored as
    F16/BF16/F32/F64 are cast; FP8/FP4 tensors and their scales get the
    stored dtype. Parameters that were already real are moved, not
    reallocated, if needed.
    """
    replaced: dict[int, nn.Parameter] = {}
    undo: list[tuple[nn.Module, str, str, torch.Tensor]] = []

    def restore() -> None:
        # Parameters go back to meta (some may share memory that was partly
        # written); buffers get their original tensors back, which were only
        # copied from, so a failed load can simply be retried.
        for module, slot, name, old in reversed(undo):
            keep = slot == "_buffers" or old.device.type == "meta"
            getattr(module, slot)[name] = old if keep else old.to("meta")
        undo.clear()

    try:
        want_of = param_dtypes(model.named_parameters(remove_duplicate=False), dtype, stored)
        _materialize_into(model, device, want_of, replaced, undo)
    except BaseException:
        restore()  # an allocation failed part-way: leave nothing half-materialized
        raise
    tensors = {k: v.data if isinstance(v, nn.Parameter) else v for k, v in model.state_dict(keep_vars=True).items()}
    return Destinations(tensors, alias_groups(model), restore)


def _materialize_into(model: nn.Module, device: torch.device, want_of: Callable[[torch.Tensor], torch.dtype],
                      replaced: dict[int, nn.Parameter], undo: list) -> None:
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or is_dtensor(p):  # DTensors are filled in place (distload.dtensor)
                continue
            new = replaced.get(id(p))
            if new is None:
                want = want_of(p)
                if p.device.type == "meta":
                    data = torch.empty(p.shape, dtype=want, device=device)
                elif p.device != device or p.dtype != want or not p.is_contiguous():
                    data = p.detach().to(device=device, dtype=want).contiguous()
                else:
                    data = p.detach()
                new = nn.Parameter(data, requires_grad=p.requires_grad)
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


def can_take_direct(dest: torch.Tensor, st_dtype: str, device: torch.device) -> bool:
    """True when chunk bytes can land in ``dest``'s memory with no conversion."""
    return dest.dtype == TORCH_DTYPES.get(st_dtype) and dest.is_contiguous() and dest.device == device


def write_piece(dest: torch.Tensor, piece: Piece, src: torch.Tensor, st_dtype: str) -> None:
    """Copy one piece out of a chunk buffer into ``dest``, casting if needed."""
    raw = src[piece.chunk_offset : piece.chunk_offset + piece.nbytes]
    src_dtype = torch_dtype(st_dtype)
    if dest.dtype == src_dtype:
        byte_view(dest)[piece.tensor_offset : piece.tensor_offset + piece.nbytes].copy_(raw)
        return
    size = torch.empty((), dtype=src_dtype).element_size()
    first = piece.tensor_offset // size
    if raw.storage_offset() % size:
        raw = raw.clone()  # reinterpreting needs element alignment; rare in real files
    values = raw.view(src_dtype)
    dest.view(-1)[first : first + values.numel()].copy_(values)
