"""Scale on real gloo processes: what the sockets carry, who learns what, how failures spread, what is left.

The planner's promises (tests/test_scale.py) checked on real transfers: the bytes the ranks' sockets write
stay near the ideal, a failure in any phase on any rank fails every rank with one error, rank 0 alone gets
every rank's figures, and no process group made by a load or a save outlives it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import distload
from ckpt import write_llama
from dist import run_world

WORLD = 3
BUCKET_MB = 0.002  # 2 KiB: smaller than the larger tensors, so they travel in row blocks


class Net(nn.Module):
    """Three layers of uneven sizes for three ranks, one file each."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 30)
        self.b = nn.Linear(30, 17)
        self.c = nn.Linear(17, 5)


def _write_net(root: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in Net().state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, layer in enumerate("abc"):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: v for k, v in sd.items() if k.startswith(layer + ".")}
        save_file(part, str(root / name))
        weight_map.update(dict.fromkeys(part, name))
    import json

    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd


def _fsdp(model: nn.Module) -> nn.Module:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def _groups() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


# ---- a failure in any phase, on any rank --------------------------------------------------------------

LOAD_FAULTS = {
    # phase -> (module attribute to replace, how the replacement fails on the bad rank)
    "plan": ("distload.loader.rank_info", "plan"),
    "open": ("distload.loader.model_placement", "open"),
    "scatter, sending": ("distload.transfer.loop.message_span", "transfer"),
    "scatter, receiving": ("distload.transfer.loop.Transfer._landing", "transfer"),
    "finish": ("distload.loader.peak_rss_bytes", "finish"),
}


def _failing(target: str, bad: int, rank: int):
    import importlib

    module_name, _, attr = target.rpartition(".")
    owner: object
    try:
        owner = importlib.import_module(module_name)
    except ImportError:  # a class attribute: module.Class.attr
        mod, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(mod), cls)
    real = getattr(owner, attr)

    def fail(*args, **kwargs):
        if rank == bad:
            raise OSError(f"injected failure on rank {rank}")
        return real(*args, **kwargs)

    setattr(owner, attr, fail)


def _load_with_fault(rank, world, path, phase, bad):
    target, _ = LOAD_FAULTS[phase]
    with distload.empty_init():
        model = Net()
    _fsdp(model)
    before = _groups()
    _failing(target, bad, rank)
    try:
        distload.load_checkpoint(model, path, bucket_mb=BUCKET_MB, read_policy="scatter", timeout_s=60)
        return None
    except distload.DistLoadError as e:
        return str(e), e.phase, sorted(e.failures), all(p.is_meta for p in model.parameters()), _groups() - before


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("net")
    return root, _write_net(root)


@pytest.mark.parametrize("phase", list(LOAD_FAULTS))
def test_a_failure_in_any_load_phase_fails_every_rank_with_one_error(net, phase):
    root, _ = net
    bad = {"plan": 2, "open": 1, "scatter, sending": 1, "scatter, receiving": 2, "finish": 0}[phase]
    results = run_world(_load_with_fault, WORLD, str(root), phase, bad, timeout=120)
    assert all(r is not None for r in results), "every rank raises"
    texts = {r[0] for r in results}
    assert len(texts) == 1, texts
    text, got_phase, failures, on_meta, groups = results[0]
    assert got_phase == LOAD_FAULTS[phase][1] and failures == [bad] and f"injected failure on rank {bad}" in text
    assert all(r[3] for r in results), "nothing half-loaded: every parameter back on meta"
    assert all(r[4] == 0 for r in results), "no process group left behind"


SAVE_FAULTS = {
    "plan": "distload.saver.state_tensors",
    "transfer": "distload.saver._Save._local",
}


def _save_with_fault(rank, world, src, out, phase, bad):
    with distload.empty_init():
        model = Net()
    _fsdp(model)
    distload.load_checkpoint(model, src, bucket_mb=BUCKET_MB, read_policy="scatter")
    _failing(SAVE_FAULTS[phase], bad, rank)
    try:
        distload.save_checkpoint(model, out, max_shard_size="2KB", bucket_mb=BUCKET_MB)
        return None
    except distload.DistLoadError as e:
        return str(e), sorted(e.failures)


@pytest.mark.parametrize("phase", list(SAVE_FAULTS))
def test_a_failure_in_any_save_phase_fails_every_rank_and_writes_no_index(net, tmp_path, phase):
    root, _ = net
    bad = {"plan": 1, "transfer": 2}[phase]
    results = run_world(_save_with_fault, WORLD, str(root), str(tmp_path / "out"), phase, bad, timeout=120)
    assert all(r is not None for r in results) and len({r[0] for r in results}) == 1
    assert results[0][1] == [bad] and f"injected failure on rank {bad}" in results[0][0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*")), "no index, no temporary files"


# ---- who learns what, and what is left behind -------------------------------------------------------


def _load_and_save(rank, world, src, out):
    with distload.empty_init():
        model = Net()
    _fsdp(model)
    before = _groups()
    load = distload.load_checkpoint(model, src, bucket_mb=BUCKET_MB, read_policy="scatter")
    after_load = _groups()
    save = distload.save_checkpoint(model, out, max_shard_size="2KB", bucket_mb=BUCKET_MB)
    return load.to_dict(), save.to_dict(), after_load - before, _groups() - before


def test_rank_0_alone_gets_every_ranks_figures_and_no_group_outlives_the_calls(net, tmp_path):
    root, _ = net
    results = run_world(_load_and_save, WORLD, str(root), str(tmp_path / "out"))
    for which in (0, 1):  # the load's report, then the save's
        reports = [r[which] for r in results]
        assert len(reports[0]["ranks"]) == WORLD and all(r["ranks"] == [] for r in reports[1:])
        for rank, own in enumerate(reports):
            figures = reports[0]["ranks"][rank]
            assert figures["rank"] == rank and figures == {k: own[k] for k in figures}, (which, rank)
    saved = [r[1] for r in results]
    assert sum(f["bytes_written"] for f in saved[0]["ranks"]) == saved[0]["total_bytes"]
    assert all(r[2] == 0 and r[3] == 0 for r in results), "no process group made by a load or a save remains"


def _views_asked(rank, world, path):
    from test_tp import MLP
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from distload.transport.comm import TorchComm

    asked = []
    real = TorchComm.collect_

    def collect(self, data, srcs, dst=0):
        asked.append(list(srcs))
        return real(self, data, srcs, dst)

    TorchComm.collect_ = collect
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with distload.empty_init():
        model = MLP()
        model.extra = nn.Parameter(torch.empty(8, 3))  # not tensor parallel: FSDP puts it on a dp submesh
    model = parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    distload.load_checkpoint(model, path, bucket_mb=0.0002)
    return asked, {k: v.full_tensor() for k, v in model.state_dict().items()}


def test_submesh_views_go_to_rank_0_from_one_rank_per_distinct_view(tmp_path):
    from test_tp import write_mlp

    ref = write_mlp(tmp_path / "mlp.safetensors", {"extra": (8, 3)})
    results = run_world(_views_asked, 4, str(tmp_path / "mlp.safetensors"))
    # "extra" lives on ranks 0 and 2 (one dp submesh) and on 1 and 3 (the other): rank 0 has its own
    # view and asks rank 1 alone for the other; ranks 2 and 3 send nothing.
    assert [asked for asked, _ in results] == [[[1]], [[1]], [], []]
    for _, full in results:
        assert all(torch.equal(full[k], v) for k, v in ref.items())


# ---- what the sockets carry ----------------------------------------------------------------------------


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _socket_bytes(rank, world, path, bucket_mb):
    from transformers import AutoConfig, LlamaForCausalLM

    from distload.fsdp import fully_shard_blocks
    from distload.plan.dryrun import wire_bytes

    with distload.empty_init():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(path))
    fully_shard_blocks(model)
    before = _wchar()
    distload.load_checkpoint(model, path, bucket_mb=bucket_mb, read_policy="scatter")
    wrote = _wchar() - before
    plan = distload.plan_checkpoint(path, model=model, bucket_mb=bucket_mb, read_policy="scatter")
    return wrote, wire_bytes(plan), max(t.nbytes for f in plan.files for t in f.tensors)


@pytest.mark.parametrize("world", [4])
def test_the_sockets_carry_about_the_ideal_with_buckets_smaller_than_the_tensors(tmp_path, world):
    path = write_llama(tmp_path / "llama", tie=False, shard="1MB", hidden=256)
    bucket_mb = 0.25
    results = run_world(_socket_bytes, world, str(path), bucket_mb, timeout=300)
    wrote = sum(r[0] for r in results)
    (wire, ideal), largest = results[0][1], results[0][2]
    assert largest > bucket_mb * 2**20, "some tensors travel in row blocks"
    assert wire == ideal
    assert wrote <= 1.2 * ideal, (wrote, ideal, wrote / ideal)
