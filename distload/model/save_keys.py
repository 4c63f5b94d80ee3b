"""What a save writes: the checkpoint's keys, each as a box of one state-dict tensor.

(coordinator) Runs on rank 0 over the model's metadata only: no tensor data
is touched. For a transformers model the keys are what ``save_pretrained``
writes, computed by transformers itself:

- ``_keys_to_ignore_on_save`` are dropped;
- tied weights are stored once, under the name
  ``remove_tied_weights_from_state_dict`` keeps;
- ``revert_weight_conversion`` undoes the load-time renames and conversions
  (fused MoE experts back to one tensor per expert).

Note:
    The conversion runs on meta tensors shaped like the global state dict,
    with ``Tensor.contiguous`` made a no-op for the call, so that every
    reverted tensor stays a *view* of the tensor it came from. A view's
    storage offset and strides then say exactly which box of its source it
    is (``box_of``), and each rank can send just the part of that box it
    holds. A conversion whose result is not a box of one source (a
    concatenation, a transpose) is refused with the key and op named.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import DistLoadError
from ..format.dtypes import TORCH_DTYPES
from ..plan.save_plan import Box, OutTensor
from .dtensor import is_dtensor

ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """(every rank) The tensors a save writes: the state dict without meta tensors (non-persistent
    buffers are not in it)."""
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        local = v._local_tensor if is_dtensor(v) else v
        if not local.is_meta:
            out[k] = v
    return out


def signature(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str, bool]]:
    """What every rank must agree on: names, global shapes, dtypes, sharded or not."""
    return [(k, tuple(v.shape), str(v.dtype), is_dtensor(v)) for k, v in tensors.items()]


def out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _tied_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    by_obj: dict[int, list[str]] = {}
    sd = model.state_dict(keep_vars=True)
    for k in names:
        by_obj.setdefault(id(sd[k]), []).append(k)
    return [g for g in by_obj.values() if len(g) > 1]


def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def output_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                   dtype: torch.dtype | None) -> list[OutTensor]:
    """(coordinator) The checkpoint's tensors in the order ``save_pretrained`` would write them."""
    def st(t: torch.Tensor) -> str:
        want = out_dtype(t, dtype)
        if want not in ST_DTYPES:
            raise DistLoadError(f"dtype {want} has no safetensors name distload knows")
        return ST_DTYPES[want]

    if not _is_transformers(model):
        kept = list(tensors)
        for group in _tied_groups(model, kept):
            for name in group[1:]:  # the first name in state-dict order holds the tensor
                kept.remove(name)
        return [OutTensor(k, k, st(tensors[k]), tuple(tensors[k].shape), full_box(tuple(tensors[k].shape)))
                for k in kept]
    return _transformers_outputs(model, tensors, st)


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def _transformers_outputs(model, tensors: dict[str, torch.Tensor], st: Callable[[torch.Tensor], str]) -> list[OutTensor]:
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in tensors.items()}
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        meta.pop(key, None)
    # transformers finds tied meta tensors through the model's own parameters, by identity.
    meta = remove_tied_weights_from_state_dict(meta, model)
    source_of = {id(v): k for k, v in meta.items()}
    with _ViewsStayViews():
        reverted = revert_weight_conversion(model, dict(meta))
    out = []
    for name, view in reverted.items():
        base = view if id(view) in source_of else view._base
        src = source_of.get(id(base)) if base is not None else None
        if src is None:
            raise DistLoadError(f"{name}: transformers' reverse conversion builds it from several tensors or "
                                "copies (a concatenation or transpose); distload can only save keys that are "
                                "a box of one model tensor")
        shape = tuple(meta[src].shape)
        box = box_of(view, shape) if base is not view else full_box(shape)
        if box is None:
            raise DistLoadError(f"{name}: transformers' reverse conversion makes it a strided view of {src} "
                                f"(shape {tuple(view.shape)}, strides {view.stride()}) that is not a box; "
                                "distload cannot save it")
        out.append(OutTensor(name, src, st(tensors[src]), tuple(view.shape), box))
    return out


def box_of(view: torch.Tensor, shape: tuple[int, ...]) -> Box | None:
    """The box of a contiguous ``shape`` tensor that ``view`` is, or None when it is not one.

    ``view`` may drop dims (``select``, ``unbind``) and narrow others
    (``chunk``, ``split``, slicing), but must keep the remaining dims in order.
    """
    if math.prod(shape) == 0:
        return full_box(shape) if view.numel() == 0 and tuple(view.shape) == shape else None
    strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    offset = view.storage_offset()
    starts = [(offset // st) % n if j else offset // st for j, (st, n) in enumerate(zip(strides, shape))]
    if sum(s * st for s, st in zip(starts, strides)) != offset:
        return None
    lengths = [1] * len(shape)
    j = 0
    for size, stride in zip(view.shape, view.stride()):
        if size == 1:
            continue
        while j < len(shape) and strides[j] != stride:
            j += 1
        if j == len(shape):
            return None
        lengths[j] = size
        j += 1
    if math.prod(lengths) != view.numel() or math.prod(view.shape) != view.numel():
        return None
    box = tuple((s, s + n) for s, n in zip(starts, lengths))
    if any(b > n for (_, b), n in zip(box, shape)):
        return None
    return box


class _ViewsStayViews(torch.overrides.TorchFunctionMode):
    """Within the block, ``contiguous()`` returns its input, so reverted meta tensors stay views."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.contiguous:
            return args[0]
        return func(*args, **(kwargs or {}))
