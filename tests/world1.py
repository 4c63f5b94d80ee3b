"""One rank through the real collectives: a one-rank process group with ``DISTLOAD_WORLD1_COLLECTIVES=1``.

At world 1 a load normally takes the local shortcut (no collectives). In this
mode it runs the multi-rank path instead, so one GPU exercises TorchComm on
NCCL, the gloo side group, the copy stage's streams, NCCL scatter and the
in-stream status exchanges (and a CPU, the same loop on gloo). An FSDP2 model
on a one-rank mesh holds every tensor whole, which the planner serves by
broadcast; :func:`force_sharded` makes it plan the DTensors as sharded, so
they go through the scatter or slice steps, as they would at world N.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import distload
from distload.plan.shard import Layout
from distload.plan.shard_plan import ShardPlan
from distload.transport.bootstrap import WORLD1_COLLECTIVES, destroy_process_group


@contextlib.contextmanager
def world1_group(backend: str, device: torch.device) -> Iterator[None]:
    """A one-rank default group on a FileStore, the collective path switched on; both undone after."""
    import torch.distributed as dist

    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("NCCL not available")
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            extra["device_id"] = device
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1, **extra)
        old = os.environ.get(WORLD1_COLLECTIVES)
        os.environ[WORLD1_COLLECTIVES] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(WORLD1_COLLECTIVES, None)
            else:
                os.environ[WORLD1_COLLECTIVES] = old
            destroy_process_group()


def force_sharded(monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """Plan one-rank DTensors as sharded, with every one scattered (``"scatter"``) or sliced (``"slice"``)."""
    monkeypatch.setattr(Layout, "replicated", property(lambda self: False))
    if policy == "scatter":  # the owner holds every piece, which the planner always slices: scatter instead
        monkeypatch.setattr(ShardPlan, "policies", property(
            lambda self: {t.name: "scatter" for _, t, _ in self._sharded()}))


def fsdp_llama(ckpt: Path, device: torch.device) -> nn.Module:
    """The checkpoint's transformers model, empty, ``fully_shard``-ed per decoder layer and at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    with distload.empty_init():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    mesh = init_device_mesh(device.type, (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on the host."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
    return out


def reference(ckpt: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``from_pretrained``'s state dict on the host (cast to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    if dtype is not None:
        model = model.to(dtype)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
