"""A training entry point: shard a meta-initialized transformers model with FSDP2,
fill its shards with distload, then run a few optimizer steps.

Each rank receives only its own shards (distload loads DTensors directly), so
no rank ever holds the whole model. Start it like any torch.distributed script:

    torchrun --standalone --nproc_per_node 8 launch/train_fsdp.py /ckpt/llama --device cuda
    torchrun --standalone --nproc_per_node 8 launch/train_fsdp.py /ckpt/llama --save /ckpt/llama-tuned
    srun python launch/train_fsdp.py /ckpt/llama --device cpu        # one task per rank
    mpiexec -n 4 python launch/train_fsdp.py /ckpt/llama --device cpu

The steps use random tokens: this shows the load-then-train wiring, not a
data pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import distload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a transformers checkpoint directory (config.json + safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (nccl) or cpu (gloo); default cuda when available")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step (default 2)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--read-policy", default="auto", choices=("auto", "scatter", "slice"),
                   help="how distload reads the shards (see distload.load_checkpoint)")
    p.add_argument("--bucket-mb", type=float, default=64, help="distload transfer size in MiB")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="after training, save a Hugging Face checkpoint here with distload.save_checkpoint")
    p.add_argument("--max-shard-size", default="5GB", help="largest saved file (default 5GB)")
    p.add_argument("--save-dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="dtype of saved floats; auto keeps the fp32 master weights")
    return p.parse_args(argv)


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: every entry of the model's ModuleLists."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch.distributed as dist

    if not distload.init_distributed(args.device):
        print("train_fsdp: no launcher found; running as a single process", file=sys.stderr)
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    config = AutoConfig.from_pretrained(args.ckpt)
    with distload.empty_init():  # parameters on meta: nothing allocated yet
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # bf16 compute with fp32 master weights on GPUs; plain fp32 on CPUs.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in block_lists(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)

    # Every rank gets exactly its shards, cast to fp32 master weights.
    report = distload.load_checkpoint(model, args.ckpt, device=device, dtype=torch.float32,
                                      bucket_mb=args.bucket_mb, read_policy=args.read_policy)
    if rank == 0:
        print(report.summary(), flush=True)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data shard
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
        if device.type != "cuda":
            mean /= world  # gloo has no AVG
        if rank == 0:
            print(f"step {step}: loss {mean.item():.4f} ({time.perf_counter() - t0:.2f} s)", flush=True)
    if args.save:
        # Every rank writes its share of the files; each sends only its own shards.
        save_dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.save_dtype]
        saved = distload.save_checkpoint(model, args.save, max_shard_size=args.max_shard_size, dtype=save_dtype,
                                         bucket_mb=args.bucket_mb)
        if rank == 0:
            print(saved.summary(), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
