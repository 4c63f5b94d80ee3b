"""Tensor-parallel and 2-D mesh models: Shard(0), Shard(1), Replicate and FSDP x TP, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distload
from dist import run_world


class MLP(nn.Module):
    """Hidden 12 divides evenly (TP forward needs that); the tests add uneven raw DTensors."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(10, 12)
        self.down = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def write_mlp(path, extra: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in MLP().state_dict().items()}
    for name, shape in (extra or {}).items():
        sd[name] = torch.randn(shape)
    save_file(sd, str(path))
    return load_file(str(path))


def _tp_mlp(mesh) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with distload.empty_init():
        model = MLP()
    return parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


UNEVEN = {"cols": (5, 13), "rows": (13, 4)}  # Shard(1) and Shard(0) over 3 ranks: 5, 5, 3
PLAIN = {"plain": (4, 3)}  # an ordinary parameter beside the DTensors


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _tp_world(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    out = {}
    for policy in ("scatter", "slice", "auto"):
        model = _tp_mlp(mesh)
        for name, shape in UNEVEN.items():
            dim = 1 if name == "cols" else 0
            model.register_parameter(name, nn.Parameter(distribute_tensor(torch.empty(shape, device="meta"), mesh, [Shard(dim)])))
        model.register_parameter("plain", nn.Parameter(torch.empty(PLAIN["plain"], device="meta")))
        report = distload.load_checkpoint(model, path, bucket_mb=0.0002, read_policy=policy)
        full = {k: _full(v) for k, v in model.state_dict().items()}
        places = {k: str(getattr(v, "placements", "plain")) for k, v in model.state_dict().items()}
        with torch.no_grad():
            y = model(x).clone()  # an op waits for TP's async all-reduce before the result is pickled
        out[policy] = (full, places, report.read_policy, y)
    return out


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "mlp.safetensors"
    ref = write_mlp(path, {**UNEVEN, **PLAIN})
    return ref, run_world(_tp_world, 3, str(path))


def test_colwise_and_rowwise_shards_equal_a_single_process_read(tp):
    ref, out = tp
    for res in out:
        full, places, _, _ = res["auto"]
        assert places["up.weight"] == "(Shard(dim=0),)" and places["down.weight"] == "(Shard(dim=1),)"
        assert places["down.bias"] == "(Replicate(),)"
        assert places["cols"] == "(Shard(dim=1),)" and places["rows"] == "(Shard(dim=0),)"
        for k, v in ref.items():
            assert torch.equal(full[k], v), k


def test_tp_model_computes_what_the_unsharded_model_computes(tp):
    ref, out = tp
    single = MLP()
    single.load_state_dict({k: v for k, v in ref.items() if k not in UNEVEN and k not in PLAIN})
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = single(x)
    for res in out:
        torch.testing.assert_close(res["auto"][3], want)


def test_every_read_policy_gives_identical_tp_shards(tp):
    ref, out = tp
    for res in out:
        for policy in ("scatter", "slice", "auto"):
            for k, v in ref.items():
                assert torch.equal(res[policy][0][k], v), (policy, k)


def test_slice_policy_scatters_shard1_pieces_that_are_not_contiguous(tp):
    _, out = tp
    policies = out[0]["slice"][2]
    assert policies["up.weight"] == "slice" and policies["up.bias"] == "slice"
    assert policies["down.weight"] == "scatter" and policies["cols"] == "scatter" and policies["rows"] == "slice"
    assert "down.bias" not in policies  # Replicate(): every rank gets it by broadcast


# ---- 2-D meshes at world 4 ------------------------------------------------------

EXTRA = {  # raw distribute_tensor parameters on the 2x2 mesh, by placements
    "s1s0": (7, 9),
    "rep_s0": (9, 5),
    "s0s0": (11, 3),
}


def _mesh2d_world(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _tp_mlp(mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])  # FSDP x TP: up.weight becomes _StridedShard x Shard(0)
    placements = {"s1s0": [Shard(1), Shard(0)], "rep_s0": [Replicate(), Shard(0)], "s0s0": [Shard(0), Shard(0)]}
    for name, shape in EXTRA.items():
        t = distribute_tensor(torch.empty(shape, device="meta"), mesh, placements[name])
        model.register_parameter(name, nn.Parameter(t))
    report = distload.load_checkpoint(model, path, bucket_mb=0.0002)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    local = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    places = {k: str(v.placements) for k, v in model.state_dict().items()}
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).clone()  # waits for TP's async all-reduce
    return full, local, places, report.to_dict(), y


def test_2d_mesh_fsdp_by_tp_and_mixed_placements_load_bit_for_bit(tmp_path):
    ref = write_mlp(tmp_path / "mlp.safetensors", EXTRA)
    out = run_world(_mesh2d_world, 4, str(tmp_path / "mlp.safetensors"))
    single = MLP()
    single.load_state_dict({k: v for k, v in ref.items() if k not in EXTRA})
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = single(x)
    assert "_StridedShard" in out[0][2]["up.weight"]
    total_local = {k: 0 for k in ref}
    for full, local, _, report, y in out:
        for k, v in ref.items():
            assert torch.equal(full[k], v), k
            total_local[k] += local[k].numel()
        torch.testing.assert_close(y, want)
    # Pure sharding holds each element once across ranks; Replicate() on "dp" holds it twice.
    for k, v in ref.items():
        assert total_local[k] == v.numel() * (2 if k in ("rep_s0", "down.bias") else 1), k


def test_plain_parameters_beside_dtensors_take_the_broadcast_path(tp):
    ref, out = tp
    for res in out:
        full, places, policies, _ = res["scatter"]
        assert places["plain"] == "plain" and "plain" not in policies
        assert torch.equal(full["plain"], ref["plain"])
