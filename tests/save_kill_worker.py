"""One torchrun worker that loads a checkpoint into FSDP2 and saves it; rank 1 SIGKILLs itself mid-save.

Launched by tests/test_save.py as
``torchrun --standalone --nproc_per_node 2 tests/save_kill_worker.py CKPT OUT``.
Rank 1 dies at its third file write, from inside the writer thread, while
rank 0 is still transferring or writing: no index must appear.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    ckpt, out = sys.argv[1], sys.argv[2]
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, LlamaForCausalLM

    import distload
    import distload.io.writer

    distload.init_distributed("cpu", timeout_s=30)
    rank, world = dist.get_rank(), dist.get_world_size()
    with distload.empty_init():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(ckpt))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    distload.load_checkpoint(model, ckpt, bucket_mb=0.01)
    if rank == 1:
        real, calls = distload.io.writer._pwrite, [0]

        def dying(fd, data, offset):
            calls[0] += 1
            if calls[0] == 3:
                print("save_kill_worker: rank 1 kills itself now", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(fd, data, offset)

        distload.io.writer._pwrite = dying
    try:
        distload.save_checkpoint(model, out, max_shard_size="100KB", bucket_mb=0.01)
    except distload.DistLoadError as e:
        print(f"save_kill_worker: rank {rank}: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
