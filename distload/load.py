"""Command line: ``torchrun --nproc_per_node N -m distload.load CKPT`` (or plain python for one process).

``srun python -m distload.load`` and ``mpiexec -n N python -m distload.load``
work the same way (see :func:`distload.init_distributed`); ``--comm mpi`` moves
the bytes over MPI instead of torch.distributed.

Every rank runs this module; rank 0 prints the summary. Exit status 0 means
the model (or state dict) loaded completely on every rank.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import DistLoadError, empty_init, load_checkpoint, plan_checkpoint
from .loader import load_state_dict_with_report
from .bootstrap import COMMS, DEFAULT_TIMEOUT_S, resolve_device
from .index import resolve_checkpoint
from .plan import DEFAULT_BUCKET_MB
from .shard_plan import READ_POLICIES

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m distload.load",
        description="Load a sharded safetensors checkpoint on every rank, reading each file once per job.",
    )
    p.add_argument("path", help="checkpoint directory, .safetensors file or *.safetensors.index.json")
    p.add_argument("--model", default="auto",
                   help="hf: build from config.json with transformers; none: state dict only; "
                        "pkg.module:factory: call factory() (or factory(path)) under empty_init; "
                        "auto (default): hf if config.json is present, else none")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl; this rank's GPU from LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", help="auto (config's dtype, else as stored), bf16, fp16 or fp32")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="bucket and transfer size in MiB")
    p.add_argument("--io-threads", type=int, default=None,
                   help="threads each file owner reads with (default one per core, at most 8)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="fail on missing or unexpected keys (default) or only report them")
    p.add_argument("--comm", default="torch", choices=COMMS,
                   help="transport: torch (torch.distributed, set up from torchrun, srun or mpiexec; default) "
                        "or mpi (mpi4py, for CPU clusters without NCCL or jobs already inside MPI)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="collective timeout in seconds")
    p.add_argument("--mode", default="replicated", choices=("replicated", "fsdp"),
                   help="replicated (default): every rank gets the whole model; fsdp: fully_shard each "
                        "transformer block and the root (FSDP2), then load only each rank's shards")
    p.add_argument("--read-policy", default="auto", choices=READ_POLICIES,
                   help="--mode fsdp: scatter (owner reads, sends each rank its piece), slice (each rank reads "
                        "its own Shard(0) rows) or auto (slice on local disks, scatter on network filesystems)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (file -> rank; with --mode fsdp also the shard scatters) "
                        "and read no tensor data")
    p.add_argument("--world", type=int, metavar="N",
                   help="with --dry-run: emulate N ranks (8 per node) in this one process, replicated and with "
                        "every tensor Shard(0) over all N ranks, and print the plan bytes each rank receives "
                        "and the planning seconds")
    p.add_argument("--report", metavar="OUT.json", help="write every rank's report to this file (rank 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    return p.parse_args(argv)


def checkpoint_dir(path: str) -> Path:
    p = resolve_checkpoint(path)  # a path, or a Hub repo id in the local cache
    return p if p.is_dir() else p.parent


def build_model(spec: str, path: str) -> nn.Module | None:
    """(every rank) The meta-initialized model the CLI loads into, or None for a state dict."""
    root = checkpoint_dir(path)
    if spec == "auto":
        spec = "hf" if (root / "config.json").is_file() else "none"
    if spec == "none":
        return None
    if spec == "hf":
        return build_hf_model(root)
    if ":" not in spec:
        raise DistLoadError(f"--model must be hf, none, auto or pkg.module:factory, not {spec!r}")
    mod_name, _, fn_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise DistLoadError(f"cannot import model factory {spec}: {e}") from None
    takes_path = bool(inspect.signature(factory).parameters)
    with empty_init():
        model = factory(str(path)) if takes_path else factory()
    if not isinstance(model, nn.Module):
        raise DistLoadError(f"model factory {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def build_hf_model(root: Path) -> nn.Module:
    """Build the transformers model that ``config.json`` names, under empty_init."""
    try:
        import transformers
    except ImportError:
        raise DistLoadError("--model hf needs transformers: pip install 'distload[hf]'") from None
    if not (root / "config.json").is_file():
        raise DistLoadError(f"--model hf needs a config.json in {root}; use --model none for a state dict")
    config = transformers.AutoConfig.from_pretrained(root)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with empty_init():
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)


def hf_dtype(root: Path) -> torch.dtype | None:
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    conf = json.loads(cfg.read_text())
    name = conf.get("dtype") or conf.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = 0
    try:
        if args.dtype != "auto" and args.dtype not in DTYPES:
            raise DistLoadError(f"--dtype must be auto, bf16, fp16 or fp32, not {args.dtype!r}")
        if args.world is not None:
            return _print_plan_cost(args)
        if args.dry_run and args.mode != "fsdp":  # the file plan needs no model
            return _print_plan(args)
        model = build_model(args.model, args.path)
        if args.mode == "fsdp":
            if model is None:
                raise DistLoadError("--mode fsdp needs a model (--model hf or pkg.module:factory)")
            from .fsdp import fully_shard_blocks

            fully_shard_blocks(model, resolve_device(args.device), args.timeout_s)
        if args.dry_run:  # FSDP2: the sharded model's plan, with its scatters and slice reads
            return _print_plan(args, model=model, strict=args.strict, read_policy=args.read_policy)
        dtype = DTYPES.get(args.dtype) if args.dtype != "auto" else (
            hf_dtype(checkpoint_dir(args.path)) if model is not None else None)
        common = dict(device=args.device, dtype=dtype, bucket_mb=args.bucket_mb,
                      timeout_s=args.timeout_s, progress=args.progress, comm=args.comm, io_threads=args.io_threads)
        if model is None:
            _, report = load_state_dict_with_report(args.path, **common)
        else:
            report = load_checkpoint(model, args.path, strict=args.strict, read_policy=args.read_policy, **common)
            still_meta = [n for n, p in model.named_parameters() if p.is_meta]
            if still_meta:
                raise DistLoadError(f"parameters left on meta after the load: {still_meta[:5]}")
        rank = report.rank
        if rank == 0:
            print(report.summary())
            if args.report:
                Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
        return 0
    except DistLoadError as e:
        rank = _rank()
        if rank == 0 or not e.agreed:
            one_line = " | ".join(line.strip() for line in str(e).splitlines())
            print(f"distload: error (rank {rank}): {one_line}", file=sys.stderr)
        if not e.agreed:
            _abort_mpi_job()
        return 1
    except Exception as e:  # a factory, transformers or the report file: still one line, non-zero
        one_line = " | ".join(line.strip() for line in str(e).splitlines())
        print(f"distload: error (rank {_rank()}): {type(e).__name__}: {one_line}", file=sys.stderr)
        return 1
    finally:
        _shutdown()


def _print_plan(args: argparse.Namespace, **model_args) -> int:
    """(all ranks) Plan without reading tensor data; rank 0 prints it."""
    plan = plan_checkpoint(args.path, device=args.device, bucket_mb=args.bucket_mb, timeout_s=args.timeout_s,
                           comm=args.comm, **model_args)
    if _rank() == 0:
        print(plan.describe())
    return 0


def _print_plan_cost(args: argparse.Namespace) -> int:
    """(one process, no process group) Plan size and planning time at an emulated world size."""
    from .dryrun import measure

    if not args.dry_run or args.world < 1:
        raise DistLoadError("--world N needs --dry-run and N >= 1")
    for sharded in (False, True):
        print(measure(args.path, args.world, sharded=sharded, bucket_mb=args.bucket_mb,
                      read_policy=args.read_policy).line(), flush=True)
    return 0


def _rank() -> int:
    """This process's rank in whichever transport is up: torch.distributed, else MPI, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    mpi = sys.modules.get("mpi4py.MPI")  # only when --comm mpi imported it
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    return 0


def _abort_mpi_job() -> None:
    """(a rank whose collective broke) End the whole MPI job, if MPI is up.

    MPI cannot cancel the collective that a hung or dead peer left pending,
    so finalizing could block; ``MPI_Abort`` makes ``mpiexec`` stop every rank.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(1.0)  # mpiexec drops output still in flight when it tears the job down
        mpi.COMM_WORLD.Abort(1)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
