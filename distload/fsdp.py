"""FSDP2 wrapping for the CLI's ``--mode fsdp`` (and benchmarks that compare loaders on the same model).

(all ranks) :func:`fully_shard_blocks` applies ``fully_shard`` to every
transformer block and then to the root, the usual FSDP2 recipe, on a 1-D mesh
over all ranks. It works on meta-initialized models: nothing is allocated
until :func:`distload.load_checkpoint` materializes the local shards.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import DistLoadError
from .transport.bootstrap import init_distributed


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's block list: ``model.model.layers`` for HF Llama, ``transformer.h`` for GPT-2, ...

    Chosen as the ``ModuleList`` of identical module types holding the most
    parameters, so it needs no per-architecture table.
    """
    best, best_params = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = module, n
    return best


def fully_shard_blocks(model: nn.Module, device: torch.device | str = "cpu", timeout_s: float | None = None) -> nn.Module:
    """(all ranks) ``fully_shard`` each transformer block, then the root, over every rank.

    Joins the default process group first when the launcher has not. Returns
    ``model`` (now an FSDP2 module whose parameters are DTensors).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = torch.device(device)
    if not dist.is_initialized():
        started = init_distributed(dev) if timeout_s is None else init_distributed(dev, timeout_s)
        if not started:
            raise DistLoadError("--mode fsdp needs a distributed launch (torchrun, srun or mpiexec)")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    blocks = transformer_blocks(model)
    for block in blocks or ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
