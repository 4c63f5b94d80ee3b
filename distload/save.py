"""The save CLI: re-shard a checkpoint by loading it and saving it again with :func:`distload.save_checkpoint`.

    torchrun --nproc_per_node 4 -m distload.save /ckpt/in /ckpt/out --max-shard-size 2GB
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import DistLoadError
from .saver import DEFAULT_BUCKET_MB, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Re-shard a checkpoint: load it (replicated, or FSDP2 with ``--mode fsdp``), save it again."""
    p = argparse.ArgumentParser(prog="python -m distload.save", description=main.__doc__)
    p.add_argument("src", help="checkpoint to load (directory, .safetensors or index)")
    p.add_argument("dst", help="directory to save into")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")
    p.add_argument("--mode", choices=("replicated", "fsdp"), default="fsdp",
                   help="hold the model replicated or FSDP2-sharded between load and save (default fsdp)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="cast floats on save")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="transfer and staging size in MiB")
    args = p.parse_args(argv)
    import distload

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        from .load import build_hf_model, checkpoint_dir

        with distload.empty_init():
            model = build_hf_model(checkpoint_dir(args.src))
        distload.init_distributed("cpu")
        if args.mode == "fsdp":
            from .fsdp import fully_shard_blocks

            fully_shard_blocks(model, torch.device("cpu"))
        distload.load_checkpoint(model, args.src, bucket_mb=args.bucket_mb)
        report = save_checkpoint(model, args.dst, max_shard_size=args.max_shard_size, dtype=dtype,
                                 bucket_mb=args.bucket_mb)
    except DistLoadError as e:
        print(f"distload.save: {e.one_line()}", file=sys.stderr)
        return 1
    if report.rank == 0:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
