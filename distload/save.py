"""The save CLI: re-shard a checkpoint by loading it and saving it again with :func:`distload.save_checkpoint`.

    python -m distload.save SRC DST --max-shard-size 2GB                          # one process
    torchrun --nproc_per_node 4 -m distload.save SRC DST --max-shard-size 2GB     # 4 ranks, FSDP2

Every rank runs this module; rank 0 prints the save's summary. Errors are one
line, printed once per job, with exit status 1, as in ``python -m distload.load``:
the arguments and the model are checked on every rank before any process
group exists, and everything after that is agreed between the ranks.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DistLoadError
from .format.discover import expand_path, unset_variables
from .storage.base import is_object_uri
from .load import (
    DTYPES,
    REVISION_HELP,
    _build_before_group,
    _cli_wording,
    _describe,
    _fail,
    _HelpFormatter,
    _launch_rank,
    _PreGroupError,
    _rank,
    _shutdown,
    check_args,
    checkpoint_dir,
    hf_dtype,
)
from .loader import load_checkpoint
from .plan.shard_plan import READ_POLICIES
from .saver import DEFAULT_BUCKET_MB, save_checkpoint
from .transport.bootstrap import COMMS, detect_launch, init_distributed
from .transport.comm import DEFAULT_TIMEOUT_S

EPILOG = """\
examples:
  python -m distload.save demo_ckpt demo_resharded --max-shard-size 10MB         one process
  torchrun --standalone --nproc_per_node 2 -m distload.save demo_ckpt demo_resharded --max-shard-size 10MB

DST is replaced atomically: it is written beside DST and swapped in only when every
rank has finished; other files already in DST (a tokenizer) are kept. The result
holds the model's safetensors files, model.safetensors.index.json, config.json and
generation_config.json; copy the tokenizer files from SRC yourself.
Exit status 0 means the new checkpoint is complete; otherwise 1, with one error line.
"""


# The load's hints name options this command does not have: saving a partial or zero-filled model
# would write a checkpoint that looks complete, so the save re-shards complete checkpoints only.
SAVE_HINTS = {
    ", or subset=True if the model holds part of the checkpoint": "",
    "pass strict=False to load what matches": "distload.save re-shards complete checkpoints only: fix config.json, "
                                              "or pass --model pkg.module:factory",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (the README's table is checked against them)."""
    p = argparse.ArgumentParser(
        prog="python -m distload.save",
        description="Re-shard a checkpoint: load SRC on every rank (each file read once per job), then save it "
                    "into DST, every rank writing its share of the files.",
        epilog=EPILOG, formatter_class=_HelpFormatter,
    )
    p.add_argument("src", help="checkpoint to load: directory, .safetensors file, *.safetensors.index.json, "
                               "a Hub repo id (org/name) in the local cache, or s3://bucket/prefix; "
                               "~ and $VARS are expanded")
    p.add_argument("dst", help="directory or s3://bucket/prefix to save into (created, or replaced once "
                               "the new checkpoint is complete); ~ and $VARS are expanded")
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--model", default="auto",
                   help="hf: build from config.json with transformers; pkg.module:factory: call factory() "
                        "(or factory(path)) under empty_init; auto: hf")
    p.add_argument("--mode", default="auto", choices=("auto", "replicated", "fsdp"),
                   help="how every rank holds the model between load and save: replicated (every rank the "
                        "whole model), fsdp (FSDP2: each rank its shards), or auto: fsdp under a launcher with "
                        "more than one rank, else replicated")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest output file, as bytes or with a unit (500MB, 2GiB); a larger tensor gets a "
                        "file of its own")
    p.add_argument("--dtype", default="auto",
                   help="auto (as loaded: config.json's dtype, else as stored), or cast floating-point tensors to bf16, fp16 or fp32 "
                        "as they are written")
    p.add_argument("--device", default="cpu",
                   help="cpu (gloo), cuda (nccl; this rank's GPU from LOCAL_RANK) or cuda:N")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help="transfer and staging buffer size in MiB, for the load and the save")
    p.add_argument("--read-policy", default="auto", choices=READ_POLICIES,
                   help="with fsdp: how shards are read (see python -m distload.load --help)")
    p.add_argument("--comm", default="torch", choices=COMMS,
                   help="transport: torch (torch.distributed) or mpi (mpi4py)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="collective timeout in seconds when distload creates the process group")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _check(args: argparse.Namespace):
    """(every rank, before any process group exists) The load CLI's checks, plus the save's own."""
    if args.model == "none":
        raise DistLoadError("--model none has no model to save; use hf or pkg.module:factory")
    unset = [] if is_object_uri(args.dst) else unset_variables(args.dst)  # s3:// is never expanded
    if unset and not expand_path(args.dst).exists():
        raise DistLoadError(f"DST {args.dst}: ${unset[0]} is not set in this environment")
    if args.mode == "fsdp" and args.comm == "mpi":
        raise DistLoadError("--mode fsdp needs --comm torch (FSDP2 runs on torch.distributed)")
    load_args = argparse.Namespace(path=args.src, revision=args.revision, model=args.model, dtype="auto",
                                   bucket_mb=args.bucket_mb, timeout_s=args.timeout_s, device=args.device,
                                   mode="replicated")
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise DistLoadError(f"--dtype must be auto, bf16, fp16 or fp32, not {args.dtype!r}")
    settings = check_args(load_args)
    args.src = load_args.path  # the snapshot, when --revision named one
    if settings.model == "none":
        raise DistLoadError(f"no config.json in {checkpoint_dir(args.src)}: pass --model pkg.module:factory "
                            "to build the model to save")
    return settings


def main(argv: list[str] | None = None) -> int:
    """(every rank) Run the save CLI; returns the exit status (0: the new checkpoint is complete)."""
    args = parse_args(argv)
    try:
        settings = _check(args)
    except DistLoadError as e:
        rank = _launch_rank()
        return _fail(e, rank, speak=rank == 0)
    try:
        return _run(args, settings)
    except _PreGroupError as e:
        rank = _launch_rank()
        return _fail(e, rank, speak=rank == 0)
    except DistLoadError as e:
        rank = _rank()
        return _fail(e, rank, speak=rank == 0 or not e.agreed)
    except Exception as e:  # a transport that failed to start: still one line
        rank = _rank()
        return _fail(DistLoadError(_describe(e)), rank, speak=True)
    finally:
        _shutdown()


def _run(args: argparse.Namespace, settings) -> int:
    """(every rank) Build the model (before the group, as the load CLI does), load, save, report."""
    model = _build_before_group(settings.model, args.src)
    launch = detect_launch()
    mode = args.mode
    if mode == "auto":
        mode = "fsdp" if launch is not None and launch.world_size > 1 and args.comm == "torch" else "replicated"
    if mode == "fsdp":
        if not init_distributed(settings.device, args.timeout_s):
            raise DistLoadError("--mode fsdp needs a distributed launch (torchrun, srun or mpiexec); "
                                "in one process use --mode replicated (the default there)")
        from .fsdp import fully_shard_blocks

        fully_shard_blocks(model, settings.device, args.timeout_s)
    dtype = hf_dtype(checkpoint_dir(args.src)) if settings.model == "hf" else None
    _cli_wording(load_checkpoint, SAVE_HINTS)(model, args.src, device=settings.device, dtype=dtype,
                                              bucket_mb=args.bucket_mb, timeout_s=args.timeout_s, comm=args.comm,
                                              read_policy=args.read_policy)
    out_dtype = DTYPES[args.dtype] if args.dtype != "auto" else None
    report = save_checkpoint(model, args.dst, max_shard_size=args.max_shard_size, dtype=out_dtype,
                             bucket_mb=args.bucket_mb, timeout_s=args.timeout_s, comm=args.comm)
    if report.rank == 0:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
