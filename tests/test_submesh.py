"""Scatters reach a tensor's own mesh only: a tensor on a 2-rank submesh of a 4-rank job (gloo, real processes)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

import distload
from dist import run_world

BUCKET = 16 << 10  # one 64 x 64 fp32 tensor per chunk


class _Stages(nn.Module):
    """Two weights, as two pipeline stages would hold them: ``a`` on ranks 0-1, ``b`` on ranks 2-3."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(64, 64))
        self.b = nn.Parameter(torch.empty(64, 64))


def _load_on_submeshes(rank, world, path):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with distload.empty_init():
        model = _Stages()
    for name, ranks in (("a", [0, 1]), ("b", [2, 3])):
        mesh = DeviceMesh("cpu", torch.tensor(ranks))
        p = getattr(model, name)
        setattr(model, name, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))
    report = distload.load_checkpoint(model, path, bucket_mb=BUCKET / 2**20, read_policy="scatter")
    local = {n: p.to_local().clone() for n, p in model.named_parameters() if p.to_local().numel()}
    return local, report.buffer_bytes


def test_a_tensor_on_a_two_rank_submesh_is_sent_to_its_own_ranks_without_a_send_buffer(tmp_path):
    torch.manual_seed(0)
    sd = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    save_file(sd, str(tmp_path / "m.safetensors"))  # one file: rank 0 owns it
    results = run_world(_load_on_submeshes, 4, str(tmp_path / "m.safetensors"))
    for rank, (local, _) in enumerate(results):
        name, half = ("a", rank) if rank < 2 else ("b", rank - 2)
        assert set(local) == {name}
        assert torch.equal(local[name], sd[name][half * 32 : (half + 1) * 32])
    # Rank 0 reads both chunks through at most two bucket buffers (the second is made only if
    # the reader runs ahead of the sends, which is timing). Every message is a run of whole rows
    # of the read buffer, so it is sent from there: no send buffer, no padded segments.
    assert results[0][1] in (BUCKET, 2 * BUCKET), results[0][1]
    assert all(b == 0 for _, b in results[1:]), "receivers land each message in place"
