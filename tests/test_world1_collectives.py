"""The world-1 collective mode on gloo: the loop the GPU test mode runs, checked here without a GPU.

``tests/test_cuda_stage.py`` runs the same loads on a one-rank NCCL group.
"""

from __future__ import annotations

import errno

import pytest
import torch

import distload
import distload.io.reader
from ckpt import write_llama
from distload.transport.comm import TorchComm
from world1 import force_sharded, fsdp_llama, full_state, reference, world1_group

CPU = torch.device("cpu")


@pytest.fixture
def llama(tmp_path):
    return write_llama(tmp_path / "llama")


def test_a_one_rank_group_in_the_collective_mode_gets_a_torch_transport(llama):
    from distload.transport.bootstrap import make_comm

    with world1_group("gloo", CPU):
        assert isinstance(make_comm(CPU), TorchComm)


def test_a_replicated_world1_load_through_the_collectives_matches_from_pretrained(llama, monkeypatch):
    statuses = []
    real = TorchComm.post_status
    monkeypatch.setattr(TorchComm, "post_status", lambda self, failed: statuses.append(failed) or real(self, failed))
    with world1_group("gloo", CPU):
        sd = distload.load_state_dict(llama, bucket_mb=0.01)
    assert statuses, "the load went through the collective path"
    want = reference(llama)
    assert all(torch.equal(sd[k], want[k]) for k in want if k in sd)


@pytest.mark.parametrize("policy", ["scatter", "slice"])
def test_an_fsdp2_world1_load_scatters_or_slices_and_matches_from_pretrained(llama, monkeypatch, policy):
    force_sharded(monkeypatch, policy)
    with world1_group("gloo", CPU):
        model = fsdp_llama(llama, CPU)
        report = distload.load_checkpoint(model, llama, bucket_mb=0.01, read_policy=policy)
        got = full_state(model)
    assert set(report.read_policy.values()) == {policy}
    want = reference(llama)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_an_injected_read_error_in_the_world1_collective_mode_is_the_agreed_error(llama, monkeypatch):
    real, calls = distload.io.reader.read_exact, [0]

    def failing(fd, buf, offset, name):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", failing)
    with world1_group("gloo", CPU):
        with pytest.raises(distload.DistLoadError, match="injected") as info:
            distload.load_state_dict(llama, bucket_mb=0.01)
    assert info.value.phase == "transfer" and list(info.value.failures) == [0]
