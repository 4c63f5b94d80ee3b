"""Command line: ``torchrun --nproc_per_node N -m distload.load CKPT`` (or plain python for one process).

``srun python -m distload.load`` and ``mpiexec -n N python -m distload.load``
work the same way (see :func:`distload.init_distributed`); ``--comm mpi`` moves
the bytes over MPI instead of torch.distributed. Installed, the same program
is the ``distload`` command.

Every rank runs this module; rank 0 prints the summary. Exit status 0 means
the model (or state dict) loaded completely on every rank.

Errors are one line, printed once per job, and the exit status is 1:

* the arguments are checked first, on every rank alike, before any process
  group exists (``--dtype``, ``--device``, ``--model``, ``--mode``); the
  launcher's rank 0 prints the line, labelled with the true rank from the
  launcher's environment;
* everything after that (the report path, building the model, the load)
  runs with the group up, so the ranks agree on the failure and rank 0
  prints it once, naming the rank(s) where it happened.

Under torchrun the failing ranks also write torchrun's error file, so the
``Root Cause`` at the end of torchrun's failure summary is distload's line.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import inspect
import json
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import DistLoadError, empty_init, load_checkpoint, plan_checkpoint
from .format.discover import expand_path, resolve_checkpoint
from .loader import load_state_dict_with_report
from .plan.load_plan import DEFAULT_BUCKET_MB
from .plan.shard_plan import READ_POLICIES
from .storage.base import is_object_uri, open_store
from .transport.bootstrap import (
    COMMS,
    destroy_process_group,
    detect_launch,
    init_distributed,
    local_rank,
    make_comm,
    resolve_device,
)
from .transport.comm import DEFAULT_TIMEOUT_S

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

EPILOG = """\
examples:
  %(prog)s /ckpt/llama --dry-run                       one process: print the plan
  torchrun --standalone --nproc_per_node 8 -m distload.load /ckpt/llama --device cuda
  torchrun --standalone --nproc_per_node 8 -m distload.load /ckpt/llama --mode fsdp --device cuda
  srun python -m distload.load /ckpt/llama             (or mpiexec -n 4 python -m distload.load ...)

Exit status 0 means every rank loaded completely; otherwise 1, with one error line.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where there is one worth showing), the epilog's examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def _prog() -> str:
    return "distload" if Path(sys.argv[0]).name == "distload" else "python -m distload.load"


REVISION_HELP = ("with a Hub repo id: the branch, tag, commit or unique commit prefix to load from the local "
                 "cache (default: main)")


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (the README's table is checked against them)."""
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Load a sharded safetensors checkpoint on every rank, reading each file once per job.",
        epilog=EPILOG, formatter_class=_HelpFormatter,
    )
    p.add_argument("path", help="checkpoint directory, .safetensors file, *.safetensors.index.json, "
                                "a Hub repo id (org/name) in the local cache, or s3://bucket/prefix "
                                "(standard AWS settings; pip install 'distload[s3]'); ~ and $VARS are expanded")
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--model", default="auto",
                   help="hf: build from config.json with transformers; none: state dict only; "
                        "pkg.module:factory: call factory() (or factory(path)) under empty_init; "
                        "auto: hf if config.json is present, else none")
    p.add_argument("--device", default="cpu",
                   help="cpu (gloo), cuda (nccl; this rank's GPU from LOCAL_RANK) or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (config's dtype, else as stored), bf16, fp16 or fp32")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="bucket and transfer size in MiB")
    p.add_argument("--io-threads", type=int, default=None,
                   help="threads each file owner reads with (default: one per core, at most 8, for a rank's "
                        "own slice reads; the node's cores shared among its ranks for reads that feed a collective)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="fail on missing or unexpected keys, or (--no-strict) only report them")
    p.add_argument("--subset", action="store_true",
                   help="the model holds part of the checkpoint (a pipeline stage, a --model factory with layers "
                        "removed): checkpoint keys it has no place for are not read and not errors")
    p.add_argument("--comm", default="torch", choices=COMMS,
                   help="transport: torch (torch.distributed, set up from torchrun, srun or mpiexec) "
                        "or mpi (mpi4py, for CPU clusters without NCCL or jobs already inside MPI)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="collective timeout in seconds when distload creates the process group")
    p.add_argument("--mode", default="replicated", choices=("replicated", "fsdp"),
                   help="replicated: every rank gets the whole model; fsdp: fully_shard each "
                        "transformer block and the root (FSDP2), then load only each rank's shards")
    p.add_argument("--read-policy", default="auto", choices=READ_POLICIES,
                   help="--mode fsdp: scatter (owner reads, sends each rank its piece), slice (each rank reads "
                        "its own Shard(0) rows) or auto (slice on local disks, scatter on network filesystems)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (file -> rank; with --mode fsdp also the shard scatters) "
                        "and read no tensor data")
    p.add_argument("--world", type=int, metavar="N",
                   help="with --dry-run: emulate N ranks (8 per node) in this one process, replicated and with "
                        "every tensor Shard(0) over all N ranks, with the planner and schedule a load runs, and "
                        "print per mode the planning seconds, plan and control bytes per rank, buffers and "
                        "bytes on the wire")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run --world N: one JSON object per line per mode (world, mode, planning "
                        "seconds, plan, control, buffer and wire bytes, collectives per rank) instead of text")
    p.add_argument("--report", metavar="OUT.json",
                   help="rank 0 writes every rank's report to this file as JSON (checked before loading by "
                        "creating it; ~ and $VARS are expanded)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


MAX_CONFIG_BYTES = 16 << 20


def checkpoint_dir(path: str) -> Path | str:
    """The directory (or ``s3://`` prefix) that holds the checkpoint and its ``config.json``."""
    p = resolve_checkpoint(path)  # a path, or a Hub repo id in the local cache
    if isinstance(p, str):  # object storage: a named file's prefix, else the prefix itself
        p = p.rstrip("/")
        return p.rpartition("/")[0] if p.endswith((".safetensors", ".index.json")) else p
    return p if p.is_dir() else p.parent


def read_config(root: Path | str) -> bytes | None:
    """``config.json`` beside the checkpoint (a local directory or an ``s3://`` prefix), or None."""
    return open_store(root).get_small("config.json", MAX_CONFIG_BYTES)


@dataclass(frozen=True)
class Settings:
    """The checked command line: what every rank will do."""

    model: str  # "hf", "none" or "pkg.module:factory" ("auto" resolved)
    device: torch.device
    dtype: torch.dtype | None  # None: as stored, or config.json's for --model hf (resolved in run)


def check_args(args: argparse.Namespace) -> Settings:
    """(every rank, before any process group exists) Refuse a bad command line, in one line.

    Every rank reaches the same verdict from the same arguments, except where
    the machine matters (``--device cuda`` on a node without GPUs).
    """
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise DistLoadError(f"--dtype must be auto, bf16, fp16 or fp32, not {args.dtype!r}")
    if not args.bucket_mb > 0:
        raise DistLoadError(f"--bucket-mb must be positive, not {args.bucket_mb:g}")
    if not args.timeout_s > 0:
        raise DistLoadError(f"--timeout-s must be positive, not {args.timeout_s:g}")
    if args.revision is not None:  # from here on the path is that snapshot (each rank's own cache)
        args.path = str(resolve_checkpoint(args.path, args.revision))
    model = args.model
    if model == "auto":
        try:
            model = "hf" if read_config(checkpoint_dir(args.path)) is not None else "none"
        except DistLoadError:  # no checkpoint there: the load's plan phase says so, once, for every rank
            model = "none"
    if model not in ("hf", "none") and not _FACTORY.match(model):
        raise DistLoadError(f"--model must be hf, none, auto or pkg.module:factory, not {args.model!r}")
    if args.mode == "fsdp" and model == "none":
        why = "--model none" if args.model == "none" else f"no config.json in {checkpoint_dir(args.path)}"
        raise DistLoadError(f"--mode fsdp needs a model to shard ({why}): pass --model hf or "
                            "--model pkg.module:factory")
    try:
        device = resolve_device(args.device)
    except DistLoadError as e:  # "device 'gpu' is not a device: ..." -> "--device gpu is not a device: ..."
        raise DistLoadError(str(e).replace(f"device {args.device!r}", f"--device {args.device}", 1)) from None
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None
    return Settings(model=model, device=device, dtype=dtype)


def check_report_path(path: str) -> None:
    """(rank 0) Fail before loading when ``--report`` could not be written after it.

    Permission bits do not say whether a file can be created (root on a
    read-only mount, ``/sys``, a FUSE mount that refuses), so this creates
    the file and removes it again, or opens an existing one for appending
    without changing it.
    """
    out = expand_path(path)
    parent = out.parent
    if out.is_dir():
        raise DistLoadError(f"--report {path}: is a directory; name a file, e.g. {out / 'report.json'}")
    blocker = next((d for d in reversed(parent.parents) if d.exists() and not d.is_dir()), None)
    if blocker is None and parent.exists() and not parent.is_dir():
        blocker = parent
    if blocker is not None:
        raise DistLoadError(f"--report {path}: {blocker} is a file, not a directory")
    if not parent.is_dir():
        raise DistLoadError(f"--report {path}: directory {parent} does not exist")
    try:
        if out.exists():
            with open(out, "a"):
                pass
        else:
            with open(out, "x"):
                pass
            out.unlink()
    except OSError as e:
        raise DistLoadError(f"--report {path}: cannot write the report there: {e.strerror or e}") from None


def write_report(path: str, report: dict) -> None:
    """(rank 0, after the load) Write ``--report``; a failure names the option and the path."""
    try:
        with open(expand_path(path), "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise DistLoadError(f"--report {path}: the load succeeded, but writing the report failed: "
                            f"{e.strerror or e}") from None


def build_model(spec: str, path: str) -> nn.Module | None:
    """(every rank) The meta-initialized model the CLI loads into, or None for a state dict."""
    if spec == "none":  # a state dict: the load itself checks the path
        return None
    root = checkpoint_dir(path)
    if spec == "auto":
        spec = "hf" if read_config(root) is not None else "none"
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
        model = factory(path if is_object_uri(path) else str(expand_path(path))) if takes_path else factory()
    if not isinstance(model, nn.Module):
        raise DistLoadError(f"model factory {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def build_hf_model(root: Path | str) -> nn.Module:
    """Build the transformers model that ``config.json`` names, under empty_init.

    The class comes from ``architectures[0]``; only a ``transformers.PreTrainedModel``
    subclass is accepted, so a config cannot make the CLI call any other
    callable that transformers exports. Without ``architectures`` (or with a
    name this transformers does not have), ``AutoModel`` picks the class from
    ``model_type``.
    """
    try:
        import transformers
    except ImportError:
        raise DistLoadError("--model hf needs transformers: pip install 'distload[hf]'") from None
    if is_object_uri(root):  # transformers reads local files: give it the one object it needs
        raw = read_config(root)
        if raw is None:
            raise DistLoadError(f"--model hf needs a config.json in {root}; use --model none for a state dict")
        with tempfile.TemporaryDirectory(prefix="distload-config-") as tmp:
            (Path(tmp) / "config.json").write_bytes(raw)
            config = transformers.AutoConfig.from_pretrained(tmp)
    else:
        if not (root / "config.json").is_file():
            raise DistLoadError(f"--model hf needs a config.json in {root}; use --model none for a state dict")
        config = transformers.AutoConfig.from_pretrained(root)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise DistLoadError(f"config.json in {root} names architecture {archs[0]!r}, which is not a transformers "
                            "model class (a PreTrainedModel subclass); fix config.json or pass "
                            "--model pkg.module:factory")
    with empty_init():
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)


def hf_dtype(root: Path | str) -> torch.dtype | None:
    raw = read_config(root)
    if raw is None:
        return None
    conf = json.loads(raw)
    name = conf.get("dtype") or conf.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def main(argv: list[str] | None = None) -> int:
    """(every rank) Run the CLI; returns the exit status (0: every rank loaded completely)."""
    args = parse_args(argv)
    try:
        settings = check_args(args)
    except DistLoadError as e:
        # No group yet: every rank reached this alone. The launcher's rank 0
        # speaks for all; on a device error (which can differ per node) the
        # first rank of each node does.
        rank = _launch_rank()
        device_error = str(e).startswith("--device")
        return _fail(e, rank, speak=rank == 0 or (device_error and local_rank() == 0))
    try:
        return _run(args, settings)
    except _PreGroupError as e:  # building the model: every rank alike, before the group
        rank = _launch_rank()
        return _fail(e, rank, speak=rank == 0)
    except DistLoadError as e:
        rank = _rank()
        _fail(e, rank, speak=rank == 0 or not e.agreed)
        if not e.agreed:
            _abort_mpi_job()
        return 1
    except Exception as e:  # not agreed (a report write, a transport that failed to start): still one line
        rank = _rank()
        _fail(DistLoadError(f"{type(e).__name__}: {e}"), rank, speak=True)
        _abort_mpi_job()  # a collective may still be pending (an MPI timeout): finalizing would wait on it
        return 1
    finally:
        _shutdown()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """(every rank) Build the model, join the job, load (or plan), and report.

    The model is built before the process group exists: code that builds a
    model with a group up may keep references to it (transformers does), and a
    group that outlives :func:`destroy_process_group` dies in interpreter
    teardown. Build errors are therefore reported like argument errors.
    """
    if args.world is not None:  # one process: no model, no group
        return _print_plan_cost(args)
    # Built for dry runs too: the plan then shows key conversions and what each rank reads.
    model = _build_before_group(settings.model, args.path)
    if args.mode == "fsdp" and not init_distributed(settings.device, args.timeout_s):  # FSDP2 needs torch's group
        raise DistLoadError("--mode fsdp needs a distributed launch (torchrun, srun or mpiexec)")
    comm = make_comm(settings.device, None, args.timeout_s, args.comm)  # the group exists from here on
    error = None
    try:
        if comm.rank == 0 and args.report and not args.dry_run:
            check_report_path(args.report)
        if args.mode == "fsdp":
            from .fsdp import fully_shard_blocks

            fully_shard_blocks(model, settings.device, args.timeout_s)
    except Exception as e:  # the report path (rank 0), sharding: agreed below
        error = e
    comm.agree("setup", error)
    if args.dry_run:
        model_args = (dict(model=model, strict=args.strict, subset=args.subset, read_policy=args.read_policy)
                      if model is not None else {})
        plan = _cli_wording(plan_checkpoint)(args.path, device=args.device, bucket_mb=args.bucket_mb,
                                             timeout_s=args.timeout_s, comm=args.comm, **model_args)
        if comm.rank == 0:
            print(plan.describe())
        return 0
    dtype = settings.dtype
    if dtype is None and model is not None:
        dtype = hf_dtype(checkpoint_dir(args.path))
    common = dict(device=args.device, dtype=dtype, bucket_mb=args.bucket_mb,
                  timeout_s=args.timeout_s, progress=args.progress, comm=args.comm, io_threads=args.io_threads)
    if model is None:
        _, report = _cli_wording(load_state_dict_with_report)(args.path, **common)
    else:
        with warnings.catch_warnings():  # the summary below lists missing keys; say it once
            warnings.filterwarnings("ignore", message=MISSING_KEYS_WARNING)
            report = _cli_wording(load_checkpoint)(model, args.path, strict=args.strict, subset=args.subset,
                                                   read_policy=args.read_policy, **common)
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        if still_meta:
            raise DistLoadError(f"parameters left on meta after the load: {still_meta[:5]}")
    if report.rank == 0:
        print(report.summary())
        if args.report:
            write_report(args.report, report.to_dict())
    return 0


class _PreGroupError(DistLoadError):
    """Building the model failed, before the process group existed."""


def _build_before_group(spec: str, path: str) -> nn.Module | None:
    """(every rank, no group yet) :func:`build_model`, its failures as :class:`_PreGroupError`."""
    try:
        return build_model(spec, path)
    except DistLoadError as e:
        raise _PreGroupError(str(e)) from e
    except Exception as e:  # a factory's or transformers' own error
        raise _PreGroupError(_describe(e)) from e


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


_LIBRARY_HINTS = {"pass strict=False": "pass --no-strict", "or subset=True": "or --subset"}
MISSING_KEYS_WARNING = r"distload: \d+ model key\(s\) are not in the checkpoint"


def _cli_wording(fn, hints: dict[str, str] = _LIBRARY_HINTS):
    """``fn`` with the library's hints rephrased as the command line's options (``--no-strict``)."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistLoadError as e:
            fixed = _reworded(e, hints)
            if fixed is e:
                raise
            raise fixed from e.__cause__

    return call


def _reworded(e: DistLoadError, hints: dict[str, str]) -> DistLoadError:
    def fix(text: str) -> str:
        for lib, cli in hints.items():
            text = text.replace(lib, cli)
        return text

    if not any(lib in str(e) for lib in hints):
        return e
    return DistLoadError(fix(str(e)), phase=e.phase, agreed=e.agreed, tracebacks=e.tracebacks,
                         failures={r: fix(m) for r, m in e.failures.items()})


def _fail(e: DistLoadError, rank: int, *, speak: bool) -> int:
    """Print ``e`` as distload's one line (where ``speak``) and record it for torchrun; returns 1."""
    # Agreed errors, and broken collectives (whose message names the failing ranks), speak for
    # themselves; anything else is labelled with the rank that saw it.
    names_ranks = e.agreed or bool(e.failures)
    line = f"distload: error: {e.one_line()}" if names_ranks else f"distload: error (rank {rank}): {e.one_line()}"
    done = {"printed": not speak}

    def on_sigterm(*_) -> None:
        # torchrun stops the other workers with SIGTERM as soon as one exits. A rank that has
        # failed too finishes its report and exits 1, so torchrun's summary shows its line,
        # not "Signal 15".
        if not done["printed"]:
            os.write(2, (line + "\n").encode())
        _write_torchrun_error_file(line)
        os._exit(1)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
        # Python restores the default action before it tears down its modules; by then this rank
        # has said everything, and ignoring SIGTERM lets it end with its own status.
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # main() called off the main thread: leave signals alone
        pass
    if speak:
        print(line, file=sys.stderr, flush=True)
        done["printed"] = True
    _write_torchrun_error_file(line)
    return 1


def _write_torchrun_error_file(line: str) -> None:
    """Under torchrun, leave ``line`` where the agent looks for a worker's error.

    torchrun ends a failed job with a summary whose last entry, ``Root Cause``,
    shows the error file of the first rank that failed, so distload's line is
    what the user sees last. The file has the layout of
    ``torch.distributed.elastic``'s ``@record``, with the line in place of a traceback.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # torchrun's summary then says less; the line is on stderr already


def _launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun, srun, mpiexec), before any group exists."""
    try:
        launch = detect_launch()
    except DistLoadError:
        launch = None
    if launch is not None:
        return launch.rank
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _print_plan_cost(args: argparse.Namespace) -> int:
    """(one process, no process group) Plan size and planning time at an emulated world size."""
    from .plan.dryrun import measure

    if not args.dry_run or args.world < 1:
        raise DistLoadError("--world N needs --dry-run and N >= 1")
    for sharded in (False, True):
        cost = measure(args.path, args.world, sharded=sharded, bucket_mb=args.bucket_mb, read_policy=args.read_policy)
        print(json.dumps(cost.record()) if args.json else cost.line(), flush=True)
    return 0


def _rank() -> int:
    """This process's rank in whichever transport is up: torch.distributed, else MPI, else the launcher's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    mpi = sys.modules.get("mpi4py.MPI")  # only when --comm mpi imported it
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    return _launch_rank()


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
    """(every rank, last) Destroy the process group while Python is fully alive (see
    :func:`distload.transport.bootstrap.destroy_process_group`); the model died with ``_run``."""
    destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
