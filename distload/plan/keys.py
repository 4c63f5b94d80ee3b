"""Checkpoint keys -> model keys: renames, prefixes, and conversions as "target = pieces of sources".

Pure and process-local (no collectives). The coordinator (rank 0) builds one
:class:`KeyMap` per load from the checkpoint's keys and shapes and the model,
and every rank receives it with the plan.

For transformers models the mapping is transformers' own
(``transformers.conversion_mapping.get_model_conversion_mapping``), applied
the way ``from_pretrained`` applies it: every renaming, then at most one
converter, then the base-model prefix added or stripped (a ``LlamaModel``
checkpoint into ``LlamaForCausalLM`` and the reverse). Other models can pass
``key_map``: a dict or a callable from checkpoint key to model key (``None``
drops the key), applied first, e.g. torchtitan <-> Hugging Face names.

Every checkpoint key that is used gets one of two fates:

- a :class:`Route`: its bytes land in a :class:`Box` of one model tensor,
  the whole tensor for a plain (or renamed) key, one slice of it for the
  sources of a many-to-one conversion (``MergeModulelist`` stacks,
  ``Concatenate``): e.g. expert 3's ``w1`` is ``gate_up_proj[3, :I, :]``.
  Each source is read once, by its file's owner, and lands straight there;
- a :class:`GatheredOp`: any other conversion (``Transpose``, ``Chunk``,
  ``PermuteForRope``, ...). One rank gathers the sources of one conversion,
  transformers' own op runs on them there, and the results travel to their
  targets as ordinary tensors (:mod:`distload.plan.op_plan`, :mod:`distload.transfer.results`).

Note on what transformers ignores:
    ``from_pretrained`` never fails on unexpected keys; it hides some of them
    (``_keys_to_ignore_on_load_unexpected``, old persistent ``position_ids``
    and ``rotary_emb.inv_freq``), and hides missing keys matching
    ``_keys_to_ignore_on_load_missing``. distload keeps its strictness for
    everything else, and lists the keys it ignored for those reasons in
    :attr:`KeyMap.ignored`, together with checkpoint keys that are the model's
    non-persistent buffers, the head of a task model's checkpoint loaded
    into the base model, and the other names of a tied weight stored under
    several names (the tensor's own name is loaded). None of them is read.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DistLoadError, clip_names
from .shard import Layout, Ranges, intersect, length, position

KeyHook = Mapping[str, str] | Callable[[str], "str | None"]


@dataclass(frozen=True)
class Box:
    """The part of a target tensor that one checkpoint tensor fills.

    ``start`` and ``size`` hold one entry per target dim. Dims listed in
    ``squeeze`` have size 1 and are absent from the source (the dim a
    ``MergeModulelist`` stacks on), so ``source_shape`` is ``size`` without them.
    """

    start: tuple[int, ...]
    size: tuple[int, ...]
    squeeze: tuple[int, ...] = ()

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(n for d, n in enumerate(self.size) if d not in self.squeeze)

    def view(self, target: torch.Tensor) -> torch.Tensor:
        """The view of ``target`` this source fills, shaped like the source (maybe non-contiguous)."""
        index = tuple(a if d in self.squeeze else slice(a, a + n)
                      for d, (a, n) in enumerate(zip(self.start, self.size)))
        return target[index]

    def restrict(self, layout: Layout) -> Layout:
        """The source's own layout: the target's sharding restricted to this box.

        A rank holds the elements of the box that fall in its shard, in the
        source's coordinates; a rank whose shard misses the box holds nothing.
        """
        regions: list[tuple[Ranges, ...] | None] = []
        for region in layout.regions:
            part = None if region is None else self._clip(region)
            regions.append(part)
        return Layout(self.source_shape, tuple(regions))

    def local_view(self, local: torch.Tensor, region: tuple[Ranges, ...] | None) -> torch.Tensor:
        """The view of a rank's local shard that holds this source's piece.

        ``region`` is the target's region on this rank. The view's shape is the
        restricted layout's local shape; empty (zero-sized) when the rank holds none of it.
        """
        clipped = None if region is None else self._clip(region)
        if clipped is None:
            out = local
            for d in range(local.dim()):
                out = out.narrow(d, 0, 0)
            return out.reshape((0,) * len(self.source_shape))
        out = local
        for d in reversed(range(len(self.start))):  # right to left: selecting keeps earlier dims' numbering
            a, n = self.start[d], self.size[d]
            held = intersect(region[d], a, a + n)  # type: ignore[index]
            first = position(region[d], held[0][0])  # type: ignore[index]
            out = out.select(d, first) if d in self.squeeze else out.narrow(d, first, length(held))
        return out

    def _clip(self, region: tuple[Ranges, ...]) -> tuple[Ranges, ...] | None:
        out: list[Ranges] = []
        for d, (a, n) in enumerate(zip(self.start, self.size)):
            held = intersect(region[d], a, a + n)
            if not held:
                return None
            if d not in self.squeeze:
                out.append(tuple((x - a, y - a) for x, y in held))
        return tuple(out)


@dataclass(frozen=True)
class Route:
    """One checkpoint key read straight into (a box of) one model tensor."""

    source: str  # checkpoint key
    target: str  # model state-dict key
    box: Box | None = None  # None: the whole target


@dataclass(frozen=True)
class GatheredOp:
    """A conversion that needs its sources together: transformers' op runs on them in memory.

    ``collected`` lists, per source pattern of the converter, the checkpoint
    keys in the order ``from_pretrained`` collects them (natural key order).
    """

    op: str  # the operations, for messages and the report
    layer: str  # the first target key: transformers' ``full_layer_name``
    converter: Any  # a transformers ``WeightConverter`` (deep-copied before each run)
    collected: tuple[tuple[str, tuple[str, ...]], ...]
    targets: tuple[str, ...]  # the model keys it produces

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(k for _, keys in self.collected for k in keys)

    def run(self, tensors: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Run the op on ``tensors`` (checkpoint key -> tensor); model key -> result."""
        return _run_converter(self.converter, self.layer, self.collected, tensors, model, self.op)


@dataclass(frozen=True)
class KeyMap:
    """Where every checkpoint key goes, and what the model still lacks.

    ``routes`` and ``gathered`` cover every checkpoint key that is read;
    ``unexpected`` are keys nothing in the model takes (an error under
    ``strict`` unless the load takes a subset), ``ignored`` keys are never
    read nor errors (see the module note), and ``missing`` are model keys that
    nothing fills (tied aliases of a filled key are not missing).
    """

    routes: dict[str, Route] = field(default_factory=dict)  # checkpoint key -> route
    gathered: tuple[GatheredOp, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def wanted(self) -> frozenset[str]:
        """Every checkpoint key that must be read."""
        return frozenset(self.routes) | frozenset(k for g in self.gathered for k in g.sources)

    @property
    def filled(self) -> frozenset[str]:
        """Every model key the checkpoint fills."""
        return frozenset(r.target for r in self.routes.values()) | frozenset(t for g in self.gathered
                                                                             for t in g.targets)

    @property
    def identity(self) -> bool:
        """True when every used key goes whole into the model key of the same name."""
        return not self.gathered and all(r.box is None and r.source == r.target for r in self.routes.values())

    def describe(self) -> list[str]:
        """One line per kind of conversion, for the report and ``--dry-run``."""
        lines = []
        renamed = sum(1 for r in self.routes.values() if r.box is None and r.source != r.target)
        sliced = [r for r in self.routes.values() if r.box is not None]
        if renamed:
            lines.append(f"{renamed} key(s) renamed")
        if sliced:
            targets = sorted({r.target for r in sliced})
            lines.append(f"{len(sliced)} key(s) read straight into slices of {len(targets)} fused tensor(s)")
        for g in self.gathered:
            lines.append(f"{g.op}: {', '.join(g.sources)} -> {', '.join(g.targets)} (gathered)")
        return lines


def build_key_map(model: nn.Module, checkpoint: Mapping[str, tuple[int, ...]], *,
                  key_map: KeyHook | None = None) -> KeyMap:
    """(coordinator) Map checkpoint keys (name -> shape) onto ``model``'s state dict.

    Raises :class:`DistLoadError` for shape mismatches, two checkpoint keys
    filling the same model tensor, and conversions that cannot run (naming
    the op and the keys). Missing and unexpected keys are returned, not raised.
    """
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    hooked, dropped = _apply_hook(checkpoint, key_map)
    routed = _TransformersKeys(model, model_shapes) if _is_transformers(model) else _PlainKeys(model_shapes)

    routes: dict[str, Route] = {}
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}  # first target -> (converter, pattern -> keys)
    unexpected: list[str] = []
    for ckey in sorted(hooked, key=_natural):
        target, pattern, converter = routed.rename(hooked[ckey])
        if target is None:
            unexpected.append(ckey)
        elif converter is None:
            routes[ckey] = Route(ckey, target)
        else:
            conv, by_pattern = groups.setdefault(target, (converter, {}))
            by_pattern.setdefault(pattern, []).append(ckey)

    gathered: list[GatheredOp] = []
    for target, (conv, by_pattern) in groups.items():
        placed = _place_converted(conv, target, by_pattern, checkpoint, model_shapes, model)
        if isinstance(placed, GatheredOp):
            gathered.append(placed)
        else:
            routes.update(placed)

    aliases = alias_groups(model)
    ignored = list(dropped) + _drop_tied_duplicates(routes, aliases)
    _check_shapes(routes, checkpoint, model_shapes)
    _check_unique(routes, gathered)

    ignore_unexpected, ignore_missing = routed.ignore_patterns(model)
    nonpersistent = _non_persistent_buffers(model)
    head = routed.task_head(hooked, routes)
    still: list[str] = []
    for ckey in unexpected:
        name = hooked[ckey]
        if (name in nonpersistent or ckey in nonpersistent or ckey in head
                or (ignore_unexpected is not None and (ignore_unexpected.search(name) or ignore_unexpected.search(ckey)))):
            ignored.append(ckey)
        else:
            still.append(ckey)

    filled = {r.target for r in routes.values()} | {t for g in gathered for t in g.targets}
    missing = []
    for name in model_shapes:
        if any(a in filled for a in aliases.get(name, (name,))):
            continue
        if ignore_missing is not None and ignore_missing.search(name):
            continue
        missing.append(name)
    return KeyMap(routes, tuple(gathered), tuple(sorted(missing)), tuple(sorted(still)), tuple(sorted(ignored)))


# ---- transformers' rules ---------------------------------------------------


def _is_transformers(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # a model cannot be one without it; importing costs seconds
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


class _PlainKeys:
    """Any ``nn.Module``: a key is taken when the model has it (after the user's hook)."""

    def __init__(self, model_shapes: dict[str, tuple[int, ...]]):
        self.model_shapes = model_shapes

    def rename(self, key: str) -> tuple[str | None, str | None, Any]:
        return (key if key in self.model_shapes else None), None, None

    def ignore_patterns(self, model: nn.Module) -> tuple[re.Pattern | None, re.Pattern | None]:
        return None, None

    def task_head(self, hooked: Mapping[str, str], routes: Mapping[str, Route]) -> set[str]:
        return set()


class _TransformersKeys:
    """What ``from_pretrained`` does to each checkpoint key (transformers 5's conversion mapping)."""

    def __init__(self, model: nn.Module, model_shapes: dict[str, tuple[int, ...]]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model_shapes = model_shapes
        self.prefix = getattr(model, "base_model_prefix", "") or None
        self.is_base = self.prefix is not None and getattr(model, "base_model", model) is model
        with _original_class_names(model):
            mapping = get_model_conversion_mapping(model)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def rename(self, key: str) -> tuple[str | None, str | None, Any]:
        """(model key or None, the converter's source pattern, the converter), as ``from_pretrained``."""
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.model_shapes)
        if target not in self.model_shapes and key in self.model_shapes:
            # transformers' own fallback: the key should not have been renamed
            target, pattern = rename_source_key(key, [], [], self.prefix, self.model_shapes)
        if target not in self.model_shapes:
            return None, None, None
        if pattern is None:
            return target, None, None
        return target, pattern, self.by_pattern[pattern]

    def ignore_patterns(self, model: nn.Module) -> tuple[re.Pattern | None, re.Pattern | None]:
        """The two regexes of ``PreTrainedModel._adjust_missing_and_unexpected_keys``."""
        buffers = [name for name, _ in model.named_buffers()]
        unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
            unexpected.add(r"rotary_emb\.inv_freq")
        if any(b.endswith("position_ids") for b in buffers):
            unexpected.add(r"(^|\.)position_ids$")
        missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        compile_ = (lambda pats: re.compile("|".join(f"({p})" for p in sorted(pats))) if pats else None)
        return compile_(unexpected), compile_(missing)

    def task_head(self, hooked: Mapping[str, str], routes: Mapping[str, Route]) -> set[str]:
        """Keys outside ``base_model_prefix`` when a task model's checkpoint goes into the base model.

        ``from_pretrained`` loads ``model.*`` into ``LlamaModel`` and leaves
        ``lm_head.weight`` unused; so does distload, listing it as ignored.
        """
        if not self.is_base:
            return set()
        dot = f"{self.prefix}."
        stripped = any(hooked[k].startswith(dot) and not r.target.startswith(dot) for k, r in routes.items())
        if not stripped:
            return set()
        return {k for k, name in hooked.items() if not name.startswith(dot) and k not in routes}


@contextlib.contextmanager
def _original_class_names(model: nn.Module) -> Iterator[None]:
    """Let transformers find its mappings by class on FSDP2-wrapped models.

    ``fully_shard`` swaps each wrapped module's class for a subclass named
    ``FSDP<Name>`` defined in torch, and transformers looks conversion
    mappings up by class name and module (``Dinov2Model`` from
    ``transformers.``). The coordinator gives those modules their own class
    back for the duration of the lookup, which only reads names and configs.
    """
    swapped: list[tuple[nn.Module, type]] = []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None  # noqa: N806
    try:
        if FSDPModule is not None:
            for module in model.modules():
                cls = type(module)
                if isinstance(module, FSDPModule) and cls.__name__.startswith("FSDP"):
                    base = next((c for c in cls.__mro__[1:] if c.__name__ == cls.__name__[4:]), None)
                    if base is not None:
                        swapped.append((module, cls))
                        module.__class__ = base
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _apply_hook(checkpoint: Mapping[str, Any], hook: KeyHook | None) -> tuple[dict[str, str], list[str]]:
    """Checkpoint key -> the name after the user's ``key_map``; keys it drops."""
    if hook is None:
        return {k: k for k in checkpoint}, []
    out, dropped = {}, []
    for k in checkpoint:
        try:
            name = hook.get(k, k) if isinstance(hook, Mapping) else hook(k)
        except Exception as e:
            raise DistLoadError(f"key_map failed on checkpoint key {k!r}: {type(e).__name__}: {e}") from e
        if name is None:
            dropped.append(k)
        elif not isinstance(name, str):
            raise DistLoadError(f"key_map returned {name!r} for {k!r}; it must return a str or None")
        else:
            out[k] = name
    return out, dropped


def _natural(key: str) -> list:
    """transformers' sort order for state-dict keys (``experts.10`` after ``experts.9``)."""
    if "transformers" not in sys.modules:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(key)


# ---- conversions -------------------------------------------------------------


def _op_names(converter: Any) -> str:
    return " + ".join(repr(op) for op in converter.operations)


def _place_converted(converter: Any, target: str, by_pattern: dict[str, list[str]],
                     checkpoint: Mapping[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]],
                     model: nn.Module) -> dict[str, Route] | GatheredOp:
    """Boxes for a stack/concatenate conversion, else a gathered op (validated on meta tensors)."""
    order = [p for p in converter.source_patterns if p in by_pattern]
    collected = tuple((p, tuple(by_pattern[p])) for p in order)
    keys = [k for _, ks in collected for k in ks]
    virtual = _symbolic(converter, collected, checkpoint)
    if virtual is not None:
        shape, pieces = virtual
        want = model_shapes[target]
        if shape != want:
            raise DistLoadError(f"{_op_names(converter)} of {len(keys)} checkpoint key(s) ({keys[0]}, ...) "
                                f"makes {target} {list(shape)}, but the model's is {list(want)}")
        return {k: Route(k, target, box) for k, box in pieces}
    metas = {k: torch.empty(checkpoint[k], device="meta") for k in keys}
    made = _run_converter(converter, target, collected, metas, model, _op_names(converter))
    bad = [f"{k}: converted {list(v.shape)} vs model {list(model_shapes[k])}"
           for k, v in made.items() if k in model_shapes and tuple(v.shape) != model_shapes[k]]
    if bad:
        raise DistLoadError(f"shape mismatch after {_op_names(converter)}: {clip_names(bad, sep='; ')}")
    targets = tuple(sorted(k for k in made if k in model_shapes))
    return GatheredOp(_op_names(converter), target, converter, collected, targets)


def _run_converter(converter: Any, layer: str, collected: tuple[tuple[str, tuple[str, ...]], ...],
                   tensors: Mapping[str, torch.Tensor], model: nn.Module, op: str) -> dict[str, torch.Tensor]:
    conv = copy.deepcopy(converter)
    for pattern, keys in collected:
        for k in keys:
            conv.add_tensor(layer, k, pattern, (lambda t=tensors[k]: t))
    try:
        out = conv.convert(layer, model=model, config=getattr(model, "config", None))
    except Exception as e:
        keys = [k for _, ks in collected for k in ks]
        raise DistLoadError(f"conversion {op} failed for checkpoint key(s) {clip_names(keys)} -> {layer}: "
                            f"{type(e).__name__}: {e}") from e
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


_Virtual = tuple[tuple[int, ...], list[tuple[str, Box]]]  # a tensor built from pieces: shape, (source, box)


def _symbolic(converter: Any, collected: tuple[tuple[str, tuple[str, ...]], ...],
              checkpoint: Mapping[str, tuple[int, ...]]) -> _Virtual | None:
    """Where each source lands, when the ops only stack and concatenate; None otherwise.

    Follows ``MergeModulelist`` (stack each pattern's list) and
    ``Concatenate`` (join patterns in the converter's order) exactly; any
    other op, or a chain whose result would not be one tensor, returns None.
    """
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if len(converter.target_patterns) != 1 or not ops:
        return None
    values: list[list[_Virtual]] = [[_leaf(k, tuple(checkpoint[k])) for k in keys] for _, keys in collected]
    if type(ops[0]) is MergeModulelist:
        if len(values) > 1 and len(ops) == 1:
            return None  # one output per pattern: not one target
        stacked = [_stack(vs, ops[0].dim) for vs in values]
        if any(v is None for v in stacked):
            return None
        values = [[v] for v in stacked]  # type: ignore[list-item]
        ops = ops[1:]
    if ops and type(ops[0]) is Concatenate and len(ops) == 1:
        return _cat([v for vs in values for v in vs], ops[0].dim)
    if not ops and len(values) == 1 and len(values[0]) == 1:
        return values[0][0]
    return None


def _leaf(key: str, shape: tuple[int, ...]) -> _Virtual:
    return shape, [(key, Box((0,) * len(shape), shape))]


def _stack(vs: list[_Virtual], dim: int) -> _Virtual | None:
    shape = vs[0][0]
    if any(v[0] != shape for v in vs):
        return None
    d = dim % (len(shape) + 1)
    out: list[tuple[str, Box]] = []
    for i, (_, pieces) in enumerate(vs):
        for key, b in pieces:
            out.append((key, Box(b.start[:d] + (i,) + b.start[d:], b.size[:d] + (1,) + b.size[d:],
                                 tuple(sorted([s + (s >= d) for s in b.squeeze] + [d])))))
    return shape[:d] + (len(vs),) + shape[d:], out


def _cat(vs: list[_Virtual], dim: int) -> _Virtual | None:
    shape = vs[0][0]
    if not shape:
        return None
    d = dim % len(shape)
    if any(len(v[0]) != len(shape) or v[0][:d] + v[0][d + 1:] != shape[:d] + shape[d + 1:] for v in vs):
        return None
    out: list[tuple[str, Box]] = []
    offset = 0
    for vshape, pieces in vs:
        for key, b in pieces:
            out.append((key, Box(b.start[:d] + (b.start[d] + offset,) + b.start[d + 1:], b.size, b.squeeze)))
        offset += vshape[d]
    return shape[:d] + (offset,) + shape[d + 1:], out


# ---- checks --------------------------------------------------------------------


def _check_shapes(routes: Mapping[str, Route], checkpoint: Mapping[str, tuple[int, ...]],
                  model_shapes: dict[str, tuple[int, ...]]) -> None:
    bad = []
    for k, r in routes.items():
        want = r.box.source_shape if r.box is not None else model_shapes[r.target]
        if tuple(checkpoint[k]) != want:
            into = f"model {r.target}" + (" slice" if r.box is not None else "")
            bad.append(f"{k}: checkpoint {list(checkpoint[k])} vs {into} {list(want)}")
    if bad:
        raise DistLoadError(f"shape mismatch for {len(bad)} key(s): {clip_names(bad, sep='; ')}")


def _check_unique(routes: Mapping[str, Route], gathered: Iterable[GatheredOp]) -> None:
    whole: dict[str, list[str]] = {}
    for k, r in routes.items():
        if r.box is None:
            whole.setdefault(r.target, []).append(k)
    for g in gathered:
        for t in g.targets:
            whole.setdefault(t, []).append(" + ".join(g.sources))
    sliced = {r.target for r in routes.values() if r.box is not None}
    clash = [f"{t} <- {clip_names(ks, 4)}" for t, ks in sorted(whole.items()) if len(ks) > 1 or t in sliced]
    if clash:
        raise DistLoadError(f"several checkpoint keys fill the same model tensor: {clip_names(clash, sep='; ')}")


def _drop_tied_duplicates(routes: dict[str, Route], aliases: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Tied weights stored under several names: keep the route to the tensor's own name (as transformers does).

    ``aliases`` lists each group with the own name first; otherwise the
    first stored alias in that order wins. Returns the checkpoint keys dropped.
    """
    by_group: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    for ckey, r in routes.items():
        group = aliases.get(r.target, (r.target,))
        if r.box is None and len(group) > 1:
            by_group.setdefault(group, []).append((group.index(r.target), ckey))
    dropped = []
    for found in by_group.values():
        for _, ckey in sorted(found)[1:]:
            dropped.append(ckey)
            del routes[ckey]
    return dropped


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    out = set()
    for mname, module in model.named_modules():
        for b in module._non_persistent_buffers_set:
            out.add(f"{mname}.{b}" if mname else b)
    return out


def alias_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Names that share one tensor (tied weights), for each state-dict name; the tensor's own name first.

    The own name is the one ``model.named_parameters()`` (or
    ``named_buffers()``) gives: the module that registered it first.
    """
    own = {id(t): n for n, t in model.named_parameters()}
    own.update({id(t): n for n, t in model.named_buffers() if id(t) not in own})
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    out = {}
    for key, group in by_id.items():
        group.sort(key=lambda n: n != own.get(key))
        out.update({n: tuple(group) for n in group})
    return out
