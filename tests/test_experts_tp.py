"""Fused MoE experts as DTensors across ranks: tensor parallel and expert parallel, bit for bit.

transformers 5 fuses Mixtral's experts into ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], but ``save_pretrained`` writes one ``w1``/``w3``/``w2``
per expert. Here the fused tensors are sharded the two ways a user shards
them: along the intermediate dimension (tensor parallel: ``Shard(1)`` and
``Shard(2)``, so at world 3 one expert's ``w1`` rows span two ranks) and
along the experts (expert parallel: ``Shard(0)``, 5 experts over 3 ranks is
uneven). Every expert key must land in its box of each rank's local shard,
equal to ``from_pretrained``, with each byte read once and no gathered op.
Both loads run in one process, so the second reuses the scatter sub-groups
the first made; at world 3 that once hung (ranks outside a cached sub-group
made it again while its members did not).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist import run_world
from keyckpt import build, mixtral_config, save

pytest.importorskip("transformers")

LAYOUTS = {"tp": {"gate_up_proj": 1, "down_proj": 2}, "ep": {"gate_up_proj": 0, "down_proj": 0}}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    from transformers import MixtralForCausalLM

    return str(save(build(MixtralForCausalLM, mixtral_config()), tmp_path_factory.mktemp("experts") / "mixtral"))


def _sharded_experts(rank: int, world: int, path: str) -> dict:
    """(every rank) Load into experts sharded each way; compare with from_pretrained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from transformers import MixtralForCausalLM

    import distload

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    ref = MixtralForCausalLM.from_pretrained(path).state_dict()
    out = {}
    for how, dims in LAYOUTS.items():
        with distload.empty_init():
            model = MixtralForCausalLM(mixtral_config())
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for name, dim in dims.items():
                meta = getattr(experts, name)
                setattr(experts, name, nn.Parameter(distribute_tensor(meta, mesh, [Shard(dim)])))
        report = distload.load_checkpoint(model, path, bucket_mb=0.004)
        got = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
        local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items() if isinstance(v, DTensor)}
        out[how] = {
            "unequal": sorted(k for k in ref if not torch.equal(got[k], ref[k])),
            "keys_equal": got.keys() == ref.keys(),
            "local": local,
            "report": report.to_dict(),
        }
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fused_experts_sharded_by_tp_or_ep_equal_from_pretrained(mixtral, world):
    from distload.format.header import read_checkpoint

    total = sum(t.nbytes for f in read_checkpoint(mixtral).files for t in f.tensors)
    results = run_world(_sharded_experts, world, mixtral, timeout=600)
    cfg = mixtral_config()
    experts, inter, hidden = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    for how in LAYOUTS:
        for rank, res in enumerate(results):
            got = res[how]
            assert got["keys_equal"] and got["unequal"] == [], (how, rank, got["unequal"])
            gate_up = got["local"]["model.layers.0.mlp.experts.gate_up_proj"]
            if how == "tp":  # rows of the concatenated [gate; up] block, split over the ranks
                assert gate_up[0] == experts and gate_up[2] == hidden and gate_up[1] < 2 * inter
            else:  # whole experts per rank: 5 over 3 ranks is 2, 2, 1
                assert gate_up[1:] == (2 * inter, hidden) and gate_up[0] < experts
            assert got["report"]["converted_keys"] == [], "expert keys land in their boxes, no gathered op"
        assert sum(res[how]["report"]["bytes_read"] for res in results) == total, how
