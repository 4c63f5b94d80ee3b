"""One rank of the 2-GPU test: ``torchrun --nproc_per_node 2 tests/cuda_worker.py OUT CKPT CASE``.

Cases:

- ``loads``: the caller's own NCCL group (``init_process_group`` without
  ``device_id``, no ``set_device``: distload must pick and set the GPU), then a
  replicated load, an FSDP2 load under each read policy and a cast, each
  compared with ``from_pretrained`` bit for bit;
- ``hang``: rank 1 stops answering in the middle of the transfer; rank 0 must
  raise a ``DistLoadError`` within distload's own bound (inside NCCL's
  timeout), and its GPU must still synchronize afterwards (the group aborted).

Each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

NCCL_TIMEOUT_S = 20.0


def _equal(got: dict, want: dict, cast=None) -> list[str]:
    bad = []
    for k, v in want.items():
        v = v.to(cast) if cast is not None and v.is_floating_point() else v
        if k not in got or not torch.equal(got[k], v):
            bad.append(k)
    return bad


def loads(ckpt: Path, rank: int) -> dict:
    import distload
    from world1 import full_state, reference

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    out: dict = {}
    want = reference(ckpt)
    cfg = AutoConfig.from_pretrained(ckpt)
    with distload.empty_init():
        model = AutoModelForCausalLM.from_config(cfg)
    report = distload.load_checkpoint(model, ckpt, device="cuda", bucket_mb=0.01)
    out["device"] = report.device
    out["current_device"] = torch.cuda.current_device()
    out["replicated"] = _equal(full_state(model), want)
    for policy in ("scatter", "slice", "auto"):
        with distload.empty_init():
            model = AutoModelForCausalLM.from_config(cfg)
        mesh = init_device_mesh("cuda", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dtype = torch.bfloat16 if policy == "auto" else None
        distload.load_checkpoint(model, ckpt, device="cuda", bucket_mb=0.01, read_policy=policy, dtype=dtype)
        out[f"fsdp_{policy}"] = _equal(full_state(model), want, dtype)
    return out


def hang(ckpt: Path, rank: int) -> dict:
    import distload
    from distload.transport.comm import TorchComm

    if rank == 1:  # answer two broadcasts, then nothing, for longer than NCCL's timeout
        real, seen = TorchComm.broadcast_, [0]

        def broadcast_(self, buf, src):
            seen[0] += 1
            if seen[0] == 3:
                time.sleep(NCCL_TIMEOUT_S * 2)
                os._exit(0)
            return real(self, buf, src)

        TorchComm.broadcast_ = broadcast_
    t0 = time.monotonic()
    try:
        distload.load_state_dict(ckpt, device="cuda", bucket_mb=0.01)
        return {"kind": "ok"}
    except distload.DistLoadError as e:
        seconds = time.monotonic() - t0
        torch.cuda.synchronize()  # the group was aborted: nothing stays queued behind a dead peer
        return {"kind": "DistLoadError", "seconds": seconds, "message": str(e), "synced": True}


def main() -> None:
    out, ckpt, case = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    # The caller's own group, as a training script makes it: no device_id, no set_device.
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=NCCL_TIMEOUT_S))
    try:
        result = {"loads": loads, "hang": hang}[case](ckpt, rank)
    except BaseException as e:
        result = {"kind": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # the hang case leaves an aborted group: skip teardown


if __name__ == "__main__":
    main()
