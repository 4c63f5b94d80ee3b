"""Wrong groups: ranks that disagree on a load's arguments, and an NCCL-only group asked for CPU memory."""

from __future__ import annotations

import shutil

import pytest
import torch

from dist import run_world
from distload import DistLoadError
from distload.transport.groups import argument_mismatch, check_group_device, load_arguments


class _Group:
    def __init__(self, *types: str):
        self._device_types = [torch.device(t) for t in types]


def test_an_nccl_only_group_is_refused_for_cpu_loads_before_any_collective():
    with pytest.raises(DistLoadError, match=r"device='cpu' needs a process group that moves host memory.*nccl"):
        check_group_device(_Group("cuda"), torch.device("cpu"), "nccl")
    check_group_device(_Group("cuda", "cpu"), torch.device("cpu"), "gloo")  # gloo (or cpu:gloo,cuda:nccl): fine
    check_group_device(_Group("cuda"), torch.device("cuda"), "nccl")


def test_argument_mismatch_names_the_argument_and_every_differing_rank():
    same = load_arguments("/ck", None, True, "auto", 64)
    assert argument_mismatch([same, same, same]) is None
    err = argument_mismatch([same, load_arguments("/ck", torch.bfloat16, True, "auto", 64), same,
                             load_arguments("/ck", torch.bfloat16, True, "auto", 64)])
    assert err is not None and err.agreed and err.phase == "plan" and sorted(err.failures) == [1, 3]
    assert "dtype is torch.bfloat16 here but None on rank 0" in str(err) and "ranks 1,3" in str(err)
    nan = load_arguments("/ck", None, True, "auto", float("nan"))
    assert argument_mismatch([nan, nan]) is None  # an invalid value everywhere is the planner's error, not a split
    stage = argument_mismatch([same, load_arguments("/ck", None, True, "auto", 64, subset=True)])
    assert stage is not None and "subset is True here but False on rank 0" in str(stage)


CASES = {  # argument -> (rank 0's value, rank 1's value)
    "path": None,  # rank 1 points at a copy of the checkpoint
    "dtype": (None, torch.bfloat16),
    "strict": (True, False),
    "read_policy": ("scatter", "slice"),
    "bucket_mb": (64, 1),
}


def _child_disagree(rank: int, world: int, path: str, copy: str) -> dict:
    import distload

    out = {}
    for arg, values in CASES.items():
        kwargs = dict(path=path, dtype=None, strict=True, read_policy="auto", bucket_mb=64)
        if arg == "path":
            kwargs["path"] = path if rank == 0 else copy
        else:
            kwargs[arg] = values[rank]
        try:
            if arg in ("strict", "read_policy"):  # arguments of load_checkpoint and plan_checkpoint only
                distload.plan_checkpoint(kwargs.pop("path"), strict=kwargs["strict"], bucket_mb=kwargs["bucket_mb"],
                                         read_policy=kwargs["read_policy"])
            else:
                distload.load_state_dict(kwargs.pop("path"), dtype=kwargs["dtype"], bucket_mb=kwargs["bucket_mb"])
            out[arg] = None
        except DistLoadError as e:
            out[arg] = (str(e), e.agreed, sorted(e.failures))
    # the group still works afterwards: nobody was left inside a collective
    out["after"] = len(distload.load_state_dict(path))
    return out


def test_ranks_that_disagree_on_an_argument_all_fail_naming_it(synthetic_ckpt, tmp_path):
    copy = shutil.copytree(synthetic_ckpt, tmp_path / "copy")
    results = run_world(_child_disagree, 2, str(synthetic_ckpt), str(copy), timeout=240)
    for arg in CASES:
        msgs = [res[arg] for res in results]
        assert all(m is not None for m in msgs), f"{arg}: a rank loaded despite the mismatch: {msgs}"
        assert msgs[0] == msgs[1], f"{arg}: ranks raised different errors"
        text, agreed, failed = msgs[0]
        assert agreed and failed == [1]
        assert f"{arg} is " in text and "rank 0" in text and "load arguments differ between ranks" in text
    assert [res["after"] for res in results] == [10, 10]


def _child_nccl_only(rank: int, world: int, path: str) -> str:
    import torch.distributed as dist

    import distload

    group = dist.new_group(backend="cuda:gloo")  # a group with no CPU backend, as NCCL alone is
    try:
        distload.load_state_dict(path, device="cpu", process_group=group)
    except DistLoadError as e:
        return str(e)
    return "loaded"


def test_a_group_without_a_cpu_backend_is_refused_with_a_clear_message(synthetic_ckpt):
    for msg in run_world(_child_nccl_only, 2, str(synthetic_ckpt), timeout=120):
        assert "device='cpu' needs a process group that moves host memory" in msg


def test_ranks_on_different_nodes_may_name_the_checkpoint_by_different_paths():
    a, b = load_arguments("/node0/ck", None, True, "auto", 64), load_arguments("/node1/ck", None, True, "auto", 64)
    assert argument_mismatch([a, b, a, b], ["n0", "n1", "n0", "n1"]) is None  # node-local copies
    err = argument_mismatch([a, b, a, a], ["n0", "n1", "n0", "n1"])  # rank 3 disagrees with rank 1, its node's first
    assert err is not None and sorted(err.failures) == [3]
    assert "path is /node0/ck here but /node1/ck on rank 1" in str(err)
