"""Joining (or skipping) a process group, and choosing the transport.

(all ranks) :func:`make_comm` is the driver's entry: it reuses the caller's
process group when there is one, initializes one from the launcher's
environment when there is not (:func:`init_distributed`: torchrun, SLURM
``srun`` or ``mpiexec``), and falls back to a single process otherwise.
With ``kind="mpi"`` the transport is mpi4py instead of torch.distributed.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import DistLoadError
from ..plan.items import RankInfo
from .comm import DEFAULT_TIMEOUT_S, Comm, LocalComm, TorchComm
from .groups import check_group_device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a load targets: ``"cpu"``, ``"cuda"`` (this rank's GPU, from ``LOCAL_RANK``) or ``"cuda:N"``.

    Raises one clear :class:`DistLoadError` for anything else: a name torch
    does not know (``"gpu"``), another device type, CUDA on a machine without
    it, or a GPU index the machine does not have. Default cpu.
    """
    spec = device if device is not None else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise DistLoadError(f"device {str(spec)!r} is not a device: use cpu, cuda (this rank's GPU) or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DistLoadError(f"device {str(spec)!r} is not supported: use cpu, cuda (this rank's GPU) or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistLoadError(f"device {str(spec)!r}: CUDA is not available on {socket.gethostname()} "
                            f"(torch {torch.__version__}); use cpu")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", local_rank() % count)
    if dev.index >= count:
        raise DistLoadError(f"device {str(spec)!r} does not exist: {socket.gethostname()} has {count} GPU(s), "
                            f"cuda:0 to cuda:{count - 1}")
    return dev


def local_rank() -> int:
    """This process's index on its node, from whichever launcher started it."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def node_key(env: Mapping[str, str] | None = None) -> str:
    """The key the plan groups ranks by: the hostname, plus the launcher's node rank when known.

    On a real cluster hostnames alone tell nodes apart; adding torchrun's
    ``GROUP_RANK`` (or SLURM's ``SLURM_NODEID``) keeps two agents started on
    one machine (a multi-node emulation) apart as well.
    """
    env = os.environ if env is None else env
    host = socket.gethostname()
    for var in ("GROUP_RANK", "SLURM_NODEID"):
        if env.get(var, "").isdigit():
            return f"{host}/{int(env[var])}"
    return host


def rank_info(rank: int) -> RankInfo:
    """(every rank) Where this rank runs; gathered once so the plan can spread files over nodes."""
    return RankInfo(rank=rank, host=socket.gethostname(), local_rank=local_rank(), node=node_key())


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as its launcher describes it."""

    launcher: str  # "torchrun", "slurm" or "mpi"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # None: rank 0 publishes it over MPI
    master_port: int | None


def _int(env: Mapping[str, str], var: str, launcher: str) -> int:
    value = env.get(var, "")
    if not value.strip().isdigit():
        raise DistLoadError(f"{launcher} environment: {var} is {value!r}, expected a non-negative integer")
    return int(value)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if env.get(n, "").strip()), None)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist such as ``gpu[003-005,9],login1`` -> ``gpu003``.

    Used when ``scontrol`` is not on the compute node's PATH.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistLoadError("SLURM_JOB_NODELIST is empty")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    head = nodelist[:end]
    while "[" in head:  # expand each bracket to its first element (zero padding kept)
        pre, _, rest = head.partition("[")
        inner, _, post = rest.partition("]")
        first = inner.split(",")[0].split("-")[0]
        head = pre + first + post
    return head


def slurm_master(nodelist: str) -> str:
    """First host of the allocation, via ``scontrol show hostnames`` (parsed here without scontrol)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host(nodelist)


_PORT_BASE, _PORT_SPAN = 10000, 20000  # below Linux's ephemeral range (32768 and up)


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The rendezvous port every task of one ``srun`` step derives alike, below Linux's ephemeral range.

    Steps of one job get consecutive ports (two steps running at once never
    collide), and the job id is mixed (a multiplicative hash) rather than
    taken modulo the range, so jobs whose ids differ by a multiple of the
    range do not share ports. A port that is taken anyway fails with an
    error that says to set ``MASTER_PORT`` (:func:`init_distributed`).
    """
    mixed = (job_id * 2654435761) % (1 << 32)  # Knuth's multiplicative hash: spreads nearby and aliased ids
    return _PORT_BASE + (mixed + step_id) % _PORT_SPAN


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """(every rank) Read rank, world size, local rank and rendezvous from the launcher's variables.

    Checked in this order, so that torchrun started by ``srun`` or ``mpiexec``
    wins over the outer launcher:

    * torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
    * SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS`` (the step's
      ``SLURM_STEP_NUM_TASKS`` when present), ``SLURM_LOCALID``; the master is
      the first host of the step's (else the job's) node list and the port
      comes from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` (:func:`slurm_port`);
      ``MASTER_ADDR``/``MASTER_PORT`` override;
    * MPI: Open MPI ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}``, MPICH/Hydra
      and Intel MPI ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``; the
      master is agreed over mpi4py unless ``MASTER_ADDR``/``MASTER_PORT`` are set.

    Returns None when no launcher started this process. The batch script of
    an ``sbatch`` job is not an ``srun`` step (no ``SLURM_STEP_ID``), so
    ``python`` run there directly is a single process.
    """
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or None
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else None
    if "RANK" not in env and env.get("WORLD_SIZE", "").strip() == "1":
        return None  # some schedulers export WORLD_SIZE=1 alone: a single process
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise DistLoadError(f"torchrun-style environment is incomplete: {', '.join(missing)} not set; "
                                "launch with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        if port is None:
            raise DistLoadError(f"MASTER_PORT is {env['MASTER_PORT']!r}, expected a port number")
        return _checked(LaunchEnv("torchrun", _int(env, "RANK", "torchrun"), _int(env, "WORLD_SIZE", "torchrun"),
                                  int(env["LOCAL_RANK"]) if env.get("LOCAL_RANK", "").isdigit() else 0,
                                  addr, port))
    if "SLURM_PROCID" in env and env.get("SLURM_STEP_ID", "").isdigit():
        size_var = _first(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
        if size_var is None:
            raise DistLoadError("SLURM environment is incomplete: SLURM_PROCID is set but SLURM_NTASKS is not")
        nodes_var = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        if addr is None and nodes_var is None:
            raise DistLoadError("SLURM environment is incomplete: SLURM_JOB_NODELIST is not set "
                                "(or set MASTER_ADDR)")
        if port is None and not env.get("SLURM_JOB_ID", "").isdigit():
            raise DistLoadError("SLURM environment is incomplete: SLURM_JOB_ID is not set (or set MASTER_PORT)")
        return _checked(LaunchEnv(
            "slurm", _int(env, "SLURM_PROCID", "SLURM"), _int(env, size_var, "SLURM"),
            _int(env, "SLURM_LOCALID", "SLURM") if "SLURM_LOCALID" in env else 0,
            addr or slurm_master(env[nodes_var]),  # type: ignore[index]
            port if port is not None else slurm_port(int(env["SLURM_JOB_ID"]), int(env["SLURM_STEP_ID"]))))
    for rank_var, size_var, local_vars in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
        ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ):
        if rank_var in env:
            if size_var not in env:
                raise DistLoadError(f"MPI environment is incomplete: {rank_var} is set but {size_var} is not")
            local_var = _first(env, local_vars)
            return _checked(LaunchEnv("mpi", _int(env, rank_var, "MPI"), _int(env, size_var, "MPI"),
                                      _int(env, local_var, "MPI") if local_var else 0,
                                      addr if port is not None else None, port if addr is not None else None))
    return None


def _checked(launch: LaunchEnv) -> LaunchEnv:
    if launch.world_size < 1 or launch.rank >= launch.world_size:
        raise DistLoadError(f"{launch.launcher} environment: rank {launch.rank} is outside world size "
                            f"{launch.world_size}")
    return launch


def init_distributed(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                     backend: str | None = None) -> bool:
    """(all ranks) Join the default process group from torchrun, SLURM ``srun`` or ``mpiexec``.

    Returns True when a group exists afterwards (already, or created here) and
    False when no launcher started this process (a single process). It uses
    NCCL when ``device`` is CUDA and gloo otherwise (``device`` defaults to
    CUDA when available); on CUDA it first selects this rank's GPU from its
    local rank. It also exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (where unset), so code that expects a
    torchrun environment finds one. Raises :class:`DistLoadError` when a
    launcher's environment is incomplete.

    Example::

        distload.init_distributed()          # under torchrun, srun or mpiexec
        with distload.empty_init():
            model = build_model()
        distload.load_checkpoint(model, ckpt, device="cuda")
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    launch = detect_launch()
    if launch is None:
        return False
    for var, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                       ("LOCAL_RANK", launch.local_rank)):
        os.environ.setdefault(var, str(value))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    extra = {"device_id": dev} if dev.type == "cuda" else {}
    atexit.register(_release_destroyed_groups)  # runs before interpreter teardown
    if launch.master_addr is None or launch.master_port is None:
        store = _mpi_store(launch, timeout)
        dist.init_process_group(backend=backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout, **extra)
        return True
    derived = launch.launcher == "slurm" and not os.environ.get("MASTER_PORT", "").isdigit()
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout, **extra)
    except Exception as e:
        if derived:
            raise _port_error(launch, e) from e
        raise
    return True


def _port_error(launch: LaunchEnv, e: Exception) -> DistLoadError:
    """(a SLURM task whose rendezvous failed on the port derived from the job and step ids) Say to set MASTER_PORT."""
    text = f"{type(e).__name__}: {e}"
    taken = "EADDRINUSE" in text or "address already in use" in text.lower()
    where = f"{launch.master_addr}:{launch.master_port}"
    if taken:
        what = f"the rendezvous port {where} (derived from SLURM_JOB_ID and SLURM_STEP_ID) is already in use"
    else:
        what = (f"the rendezvous at {where} (port derived from SLURM_JOB_ID and SLURM_STEP_ID) failed; "
                "if rank 0 found that port taken, this is why")
    return DistLoadError(f"{what}: set MASTER_PORT to a free port on {launch.master_addr} in the job script "
                         f"(export MASTER_PORT=...) and launch again ({text.splitlines()[0]})")


def _mpi_store(launch: LaunchEnv, timeout: datetime.timedelta):
    """(all ranks, under mpiexec) Rank 0 opens a TCPStore on a free port and broadcasts where it is.

    The store binds port 0 itself, so there is no window in which another
    process could take the port. Rank 0's failure is broadcast too, so the
    others raise instead of waiting for a store that never comes.
    """
    import torch.distributed as dist

    try:
        from mpi4py import MPI
    except ImportError:
        raise DistLoadError("started by mpiexec but mpi4py is missing: pip install 'distload[mpi]', "
                            "or set MASTER_ADDR and MASTER_PORT") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != launch.world_size:
        raise DistLoadError(f"MPI world size {world.Get_size()} differs from the environment's {launch.world_size}")
    hosts = world.allgather(socket.gethostname())
    store, where = None, None
    if launch.rank == 0:
        try:
            addr = "127.0.0.1" if len(set(hosts)) == 1 else _routable_address()
            # wait_for_workers=False: the workers learn the port only from the bcast below.
            store = dist.TCPStore(addr, 0, launch.world_size, is_master=True, timeout=timeout,
                                  wait_for_workers=False)
            where = (addr, store.port, None)
        except Exception as e:
            where = (None, None, f"{type(e).__name__}: {e}")
    addr, port, err = world.bcast(where, root=0)
    if err is not None:
        raise DistLoadError(f"rank 0 could not open the rendezvous store: {err}")
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))
    if store is None:
        store = dist.TCPStore(addr, port, launch.world_size, is_master=False, timeout=timeout)
    return store


def _routable_address() -> str:
    """The address other nodes reach this one at: the source of the default route, else the hostname's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            ip = s.getsockname()[0]
            if not ip.startswith("127."):
                return ip
        except OSError:
            pass
    return socket.gethostbyname(socket.gethostname())


def destroy_process_group() -> None:
    """(every rank, at the end) Destroy the default process group, and make sure it is gone.

    ``torch.distributed.destroy_process_group()`` only unregisters a group:
    the C++ ProcessGroup (for gloo, with its worker and TCP-loop threads)
    lives on while any Python object still refers to it. After an FSDP2 or
    tensor-parallel load something always does: every DeviceMesh keeps its
    groups in ``_pg_registry``, and DTensor's sharding-propagation caches keep
    the meshes of every DTensor operation ever dispatched. The group is then
    destroyed during interpreter teardown, where gloo's threads can no longer
    take the GIL to release the tensors of their last work, and the process
    dies with ``terminate called without an active exception`` (SIGABRT)
    after a successful run, now and then.

    So this empties those caches and collects garbage (FSDP2 modules are
    reference cycles) around the destroy, so that the group's destructor
    joins its threads here, while Python is fully alive. Models still
    referenced by the caller keep their meshes, and so the group: drop them
    (``del model``) before calling this.
    """
    import gc

    import torch.distributed as dist

    from .comm import forget_groups

    clear_dtensor_caches()
    forget_groups()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _release_destroyed_groups() -> None:
    """(at exit, a group distload created) Free groups the program destroyed but DTensor's caches still hold.

    A training script that calls ``torch.distributed.destroy_process_group()``
    and returns from the function holding its FSDP2 model leaves the group
    alive only through those caches; emptying them here lets its threads be
    joined before interpreter teardown (see :func:`destroy_process_group`).
    """
    import gc

    from .comm import forget_groups

    clear_dtensor_caches()
    forget_groups()
    gc.collect()


def clear_dtensor_caches() -> None:
    """Empty DTensor's sharding-propagation caches, which hold every DeviceMesh (and its groups) they saw."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return  # no DTensor was ever used
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
    except (ImportError, AttributeError, RuntimeError):  # another torch: its caches, if any, stay
        pass


COMMS = ("torch", "mpi")


def make_comm(device: torch.device, group=None, timeout_s: float = DEFAULT_TIMEOUT_S, kind: str = "torch") -> Comm:
    """(all ranks) The transport for one load on ``device``.

    ``kind="torch"`` uses ``group`` (a torch.distributed group, default the
    default group, created by :func:`init_distributed` when missing);
    ``kind="mpi"`` uses ``group`` as an mpi4py communicator (default
    ``COMM_WORLD``) and needs no torch.distributed at all.
    """
    import torch.distributed as dist

    if kind not in COMMS:
        raise DistLoadError(f"comm must be one of {', '.join(COMMS)}, not {kind!r}")
    if kind == "mpi":
        from .mpi import MpiComm

        mpi = MpiComm(device, group, timeout_s)
        return LocalComm(device) if mpi.world_size == 1 else mpi
    if group is None and not (dist.is_available() and init_distributed(device, timeout_s)):
        return LocalComm(device)
    if dist.get_world_size(group) == 1:
        return LocalComm(device)
    backend = dist.get_backend(group)
    check_group_device(group if group is not None else dist.distributed_c10d._get_default_group(), device, backend)
    if device.type == "cuda" and "nccl" not in str(backend):
        raise DistLoadError(f"device {device} needs an NCCL process group, but the group uses {backend}")
    # gloo moves host memory; an NCCL group moves device memory.
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    return TorchComm(group, comm_device, timeout_s)
