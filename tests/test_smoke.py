"""A first end-to-end check that the harness and the loader agree."""

import torch
from safetensors.torch import load_file

import distload
from dist import run_world


def _load_sd(rank, world, path):
    sd = distload.load_state_dict(path, bucket_mb=0.01)
    return {k: v.clone() for k, v in sd.items()}


def test_world2_state_dict_matches_safetensors(synthetic_ckpt):
    ref = {}
    for f in sorted(synthetic_ckpt.glob("*.safetensors")):
        ref.update(load_file(f))
    for sd in run_world(_load_sd, 2, str(synthetic_ckpt)):
        assert sd.keys() == ref.keys()
        for k in ref:
            assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape
            assert torch.equal(sd[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
