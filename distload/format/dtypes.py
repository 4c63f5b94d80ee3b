"""The one table of safetensors dtypes, and the rule for what dtype each tensor lands in.

Pure: no IO, no processes. :mod:`distload.format.header` sizes tensors from it while
validating headers; :mod:`distload.model.place` and the loader take torch dtypes
and the casting rule from it.

Note on sub-byte dtypes:
    safetensors counts ``F4`` (and ``F6_*``) shapes in values, not bytes:
    a ``[3, 8]`` ``F4`` tensor holds 24 four-bit values in 12 bytes, and a
    tensor's bits must fill whole bytes. torch holds ``F4`` as
    ``float4_e2m1fn_x2``, two values per element along the last dimension, so
    the same tensor is ``[3, 4]`` in torch (``safetensors.torch`` loads it that
    way and refuses an odd last dimension). distload describes every tensor by
    its torch shape, in which every element is whole bytes.

Note on casting (:func:`target_dtype`):
    Only tensors stored as ``F16``/``BF16``/``F32``/``F64`` are ever
    converted, and only into a parameter of one of those dtypes: ``dtype=``
    picks that dtype. Everything else lands exactly as stored: FP8 and FP4
    tensors, the scale tensors beside them (see :func:`kept_as_stored`),
    integers, booleans and complex numbers. A model tensor of another dtype
    for those is an error naming the key, never a silent conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import DistLoadError


@dataclass(frozen=True)
class DType:
    """One safetensors dtype."""

    name: str  # as written in headers, e.g. "F8_E4M3"
    bits: int  # bits per stored value
    kind: str  # "float" (castable), "lowp" (FP8/FP6/FP4: as stored), "int", "bool" or "complex"
    torch_name: str  # the torch dtype's attribute name
    pack: int = 1  # stored values per torch element (F4: 2, along the last dimension)

    @property
    def torch(self) -> torch.dtype | None:
        """The torch dtype, or None when this torch build lacks it."""
        return getattr(torch, self.torch_name, None)

    @property
    def itemsize(self) -> int:
        """Bytes per torch element."""
        return self.bits * self.pack // 8


_TABLE = (
    DType("F64", 64, "float", "float64"),
    DType("F32", 32, "float", "float32"),
    DType("F16", 16, "float", "float16"),
    DType("BF16", 16, "float", "bfloat16"),
    DType("F8_E4M3", 8, "lowp", "float8_e4m3fn"),
    DType("F8_E5M2", 8, "lowp", "float8_e5m2"),
    DType("F8_E8M0", 8, "lowp", "float8_e8m0fnu"),
    DType("F8_E4M3FNUZ", 8, "lowp", "float8_e4m3fnuz"),
    DType("F8_E5M2FNUZ", 8, "lowp", "float8_e5m2fnuz"),
    DType("F6_E2M3", 6, "lowp", "float6_e2m3fn"),  # no torch dtype yet: refused by name
    DType("F6_E3M2", 6, "lowp", "float6_e3m2fn"),
    DType("F4", 4, "lowp", "float4_e2m1fn_x2", pack=2),
    DType("I64", 64, "int", "int64"),
    DType("I32", 32, "int", "int32"),
    DType("I16", 16, "int", "int16"),
    DType("I8", 8, "int", "int8"),
    DType("U64", 64, "int", "uint64"),
    DType("U32", 32, "int", "uint32"),
    DType("U16", 16, "int", "uint16"),
    DType("U8", 8, "int", "uint8"),
    DType("BOOL", 8, "bool", "bool"),
    DType("C64", 64, "complex", "complex64"),
)

#: Every dtype safetensors writes, by header name.
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}

#: Header name -> torch dtype, for the dtypes this torch build has.
TORCH_DTYPES: dict[str, torch.dtype] = {d.name: d.torch for d in _TABLE if d.torch is not None}

#: The only stored dtypes ``dtype=`` converts.
CASTABLE = frozenset(d.name for d in _TABLE if d.kind == "float")
_CASTABLE_TORCH = frozenset(TORCH_DTYPES[n] for n in CASTABLE)
_LOWP = frozenset(d.name for d in _TABLE if d.kind == "lowp")


def torch_dtype(st_dtype: str, key: str | None = None) -> torch.dtype:
    """The torch dtype for a header dtype; a clear error when torch lacks it."""
    try:
        return TORCH_DTYPES[st_dtype]
    except KeyError:
        pass
    where = f"tensor {key!r}: " if key is not None else ""
    if st_dtype in DTYPES:
        raise DistLoadError(f"{where}dtype {st_dtype} has no torch dtype in torch {torch.__version__} "
                            f"(torch.{DTYPES[st_dtype].torch_name}); it cannot be loaded with this torch")
    raise DistLoadError(f"{where}unknown dtype {st_dtype!r}")


def torch_shape(st_dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A header shape in torch elements (F4: the last dimension halved). Raises ValueError if impossible."""
    pack = DTYPES[st_dtype].pack
    if pack == 1:
        return tuple(shape)
    if not shape or shape[-1] % pack:
        raise ValueError(f"{st_dtype} packs {pack} values per element along the last dimension, "
                         f"so it needs a last dimension divisible by {pack}")
    return (*shape[:-1], shape[-1] // pack)


def nbytes(st_dtype: str, numel: int) -> int:
    """Bytes of ``numel`` stored values. Raises ValueError when they do not fill whole bytes."""
    bits = DTYPES[st_dtype].bits * numel
    if bits % 8:
        raise ValueError(f"{numel} values of {st_dtype} are {bits} bits, not a whole number of bytes")
    return bits // 8


def is_scale_name(key: str) -> bool:
    """Names quantized checkpoints give scale tensors (``weight_scale_inv``, ``input_scale``, ``*_scales``)."""
    leaf = key.rsplit(".", 1)[-1]
    return "scale" in leaf


def kept_as_stored(stored: Mapping[str, str]) -> frozenset[str]:
    """Keys stored in a castable dtype that still load as stored: the scales of quantized tensors.

    A scale is a tensor whose own name mentions ``scale`` and whose module (the
    key up to its last dot) also holds a tensor stored in an FP8/FP6/FP4
    dtype: DeepSeek-V3's ``weight_scale_inv`` beside an ``F8_E4M3`` weight,
    NVFP4's ``weight_scale_2`` and ``input_scale``. Casting a scale to
    ``dtype=`` would change the dequantized values.
    """
    quantized = {k.rpartition(".")[0] for k, d in stored.items() if d in _LOWP}
    return frozenset(k for k, d in stored.items()
                     if d in CASTABLE and is_scale_name(k) and k.rpartition(".")[0] in quantized)


def target_dtype(key: str, stored: str | None, current: torch.dtype | None, cast: torch.dtype | None,
                 *, keep: bool = False) -> torch.dtype:
    """The dtype the tensor ``key`` holds after loading, or a :class:`DistLoadError` naming it.

    ``stored``: its header dtype (None: the checkpoint does not hold it).
    ``current``: the model's dtype for it (None: loading a state dict, no model).
    ``cast``: ``dtype=`` (pass None for buffers, which are never cast).
    ``keep``: load as stored even though the stored dtype is castable (a scale).
    """
    if cast is not None and cast not in _CASTABLE_TORCH:
        raise DistLoadError(f"dtype={cast} is not a dtype distload casts to; use float16, bfloat16, "
                            "float32 or float64 (FP8/FP4 tensors always load as stored)")
    if stored is None:  # not in the checkpoint: the model's tensor keeps its dtype, cast if plain float
        assert current is not None
        return cast if cast is not None and current in _CASTABLE_TORCH else current
    as_stored = torch_dtype(stored, key)
    castable = stored in CASTABLE and not keep
    if current is None:
        return cast if cast is not None and castable else as_stored
    if castable:
        if current in _CASTABLE_TORCH:
            return cast if cast is not None else current
        raise DistLoadError(_mismatch(key, stored, current, "a floating-point tensor"))
    if keep and current in _CASTABLE_TORCH:
        return as_stored  # a scale: float to float, exactly as stored
    if current != as_stored:
        raise DistLoadError(_mismatch(key, stored, current, f"a {as_stored} tensor"))
    return as_stored


def _mismatch(key: str, stored: str, current: torch.dtype, needs: str) -> str:
    info = DTYPES[stored]
    if info.kind == "lowp":
        why = (f"{stored} tensors load as stored (never upcast, never recast), so the model needs "
               f"{needs}: build it with its quantized layers (e.g. the quantization_config in config.json)")
    elif info.kind == "float":
        why = f"distload never casts floating-point values into {current}; the model needs {needs}"
    else:
        why = f"{stored} tensors load as stored, so the model needs {needs}"
    return f"tensor {key!r}: the checkpoint stores {stored} but the model holds {current}: {why}"


def param_dtypes(named: Iterable[tuple[str, torch.Tensor]], cast: torch.dtype | None,
                 stored: Mapping[str, str] | None) -> Callable[[torch.Tensor], torch.dtype]:
    """The dtype each parameter gets when materialized, as a function of the parameter.

    ``named``: every ``(name, parameter)`` of the model, tied ones under each
    name (``named_parameters(remove_duplicate=False)``). ``stored``: the
    plan's name -> header dtype; None keeps the old rule (cast every
    floating-point parameter), for callers without a checkpoint.
    """
    if stored is None:
        return lambda p: cast if (cast is not None and p.is_floating_point()) else p.dtype
    keep = kept_as_stored(stored)
    names: dict[int, list[str]] = {}
    for name, p in named:
        names.setdefault(id(p), []).append(name)

    def want(p: torch.Tensor) -> torch.dtype:
        group = names.get(id(p), [])
        key = next((n for n in group if n in stored), None)  # a tied weight is stored under one name
        if key is None:
            return target_dtype(group[0] if group else "?", None, p.dtype, cast)
        return target_dtype(key, stored[key], p.dtype, cast, keep=key in keep)

    return want


def plan_dtypes(stored: Mapping[str, str], model: Mapping[str, tuple[torch.dtype, bool]] | None,
                cast: torch.dtype | None) -> dict[str, torch.dtype]:
    """(coordinator, while planning) The dtype every loaded tensor lands in; the first refusal raises.

    ``stored``: every checkpoint tensor's header dtype. ``model``: for each
    checkpoint key the model holds, its ``(dtype, is_parameter)``; None for a
    state dict (every stored tensor is loaded). Buffers are never cast.
    """
    keep = kept_as_stored(stored)
    if model is None:
        return {k: target_dtype(k, d, None, cast, keep=k in keep) for k, d in sorted(stored.items())}
    return {k: target_dtype(k, stored[k], cur, cast if is_param else None, keep=k in keep)
            for k, (cur, is_param) in sorted(model.items()) if k in stored}


def check_converted(stored: Mapping[str, str], ops: Iterable[tuple[str, Sequence[str], Sequence[str]]],
                    model: Mapping[str, tuple[torch.dtype, bool]], cast: torch.dtype | None) -> None:
    """(coordinator, while planning) The casting rule for keys that a conversion turns into model tensors.

    ``ops``: ``(op, source keys, target model keys)`` of each conversion run
    on gathered sources (a transpose, a chunk, a concatenation). Its results
    keep the sources' dtype and are then copied into each target, so every
    source must be allowed to land in every target it fills, exactly as if
    it were loaded there itself: no FP8/FP4 or integer source into a float
    parameter, no float into an integer one. A refusal names the key, the op
    and the target. ``model``: each target's ``(dtype, is_parameter)``.
    """
    keep = kept_as_stored(stored)
    for op, sources, targets in ops:
        for target in targets:
            current, is_param = model[target]
            for key in sources:
                try:
                    target_dtype(key, stored[key], current, cast if is_param else None, keep=key in keep)
                except DistLoadError as e:
                    raise DistLoadError(f"{e} (it would be converted by {op} into {target!r})") from None


def is_castable(dtype: torch.dtype) -> bool:
    """True for the floating-point dtypes distload casts between (F16, BF16, F32, F64)."""
    return dtype in _CASTABLE_TORCH
