"""vLLM's ``load_format="distload"``: every worker's weights from one read of each file.

vLLM's default loader has every tensor-parallel worker read every checkpoint
file. With this loader the workers of one engine share the reads: each file
is read once, by one worker, and its tensors travel to the others over
vLLM's own process groups (:func:`distload.stream_state_dict` underneath);
each worker's ``model.load_weights`` then takes its slice as usual.

Installing distload is enough: its ``vllm.general_plugins`` entry point
(:func:`register`) runs in every vLLM process, the workers included::

    vllm serve /ckpt/llama --load-format distload --tensor-parallel-size 4
    vllm serve /ckpt/llama --load-format distload \\
        --model-loader-extra-config '{"bucket_mb": 128, "io_threads": 4}'

    LLM(model="/ckpt/llama", load_format="distload", tensor_parallel_size=4)

Options (``model_loader_extra_config``): ``bucket_mb`` (transfer bucket,
default 64), ``io_threads`` (threads each file owner reads with),
``read_policy`` (who reads a tensor only one worker needs: ``auto``,
``scatter`` or ``slice``; see :func:`distload.stream_state_dict`).

Note on groups:
    The loader runs over vLLM's world group as it is: small messages and
    error agreement over its gloo ``cpu_group``, tensors over its
    ``device_group`` (NCCL on GPUs, gloo on CPUs). It creates no process
    group: a tensor that only some workers need (another pipeline stage's
    layers never travel to this one) moves by point-to-point sends.
    With pipeline parallelism each worker asks only for the checkpoint
    tensors its stage's layers use, the layers vLLM assigned it (its model
    holds ``PPMissingLayer`` for the others), so a stage receives nothing
    it would skip.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..errors import DistLoadError
from ..format.discover import locate, resolve_checkpoint
from ..plan.shard_plan import READ_POLICIES
from ..stream import TensorStream
from ..transport.comm import Comm, LocalComm, TorchComm, describe

logger = init_logger("vllm.distload")  # under "vllm": its handlers print it in every process

LOAD_FORMAT = "distload"
#: ``model_loader_extra_config`` keys and what each must be.
OPTIONS: dict[str, str] = {
    "bucket_mb": "a positive number of MiB",
    "io_threads": "a positive integer",
    "read_policy": f"one of {', '.join(READ_POLICIES)}",
}


def register() -> None:
    """(every vLLM process) The ``vllm.general_plugins`` entry point: make ``load_format="distload"`` known.

    vLLM calls plugins once per process, but anything may call this again:
    a second call changes nothing.
    """
    global _registered
    if not _registered:
        register_model_loader(LOAD_FORMAT)(DistloadModelLoader)
        _registered = True


_registered = False


def check_options(extra: dict | None) -> dict:
    """The loader's options from ``model_loader_extra_config``, or a ValueError naming the bad one."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unexpected model_loader_extra_config key(s) for load_format={LOAD_FORMAT!r}: "
                         f"{', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    bucket = extra.get("bucket_mb", 64)
    if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not bucket > 0:
        raise ValueError(f"bucket_mb must be {OPTIONS['bucket_mb']}, not {bucket!r}")
    threads = extra.get("io_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"io_threads must be {OPTIONS['io_threads']}, not {threads!r}")
    policy = extra.get("read_policy", "auto")
    if policy not in READ_POLICIES:
        raise ValueError(f"read_policy must be {OPTIONS['read_policy']}, not {policy!r}")
    return {"bucket_mb": float(bucket), "io_threads": threads, "read_policy": policy}


class DistloadModelLoader(BaseModelLoader):
    """(every worker) vLLM's model loader for ``load_format="distload"``; see the module doc."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.options = check_options(load_config.model_loader_extra_config)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded: the checkpoint must be a local path, a repo in the local Hub cache or s3://."""
        try:
            locate(resolve_checkpoint(*_source(model_config)))  # lists an s3:// prefix, reads no object
        except DistLoadError as e:
            raise DistLoadError(f"distload: {e.one_line()}") from e

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """(every worker of the engine, together) Stream the checkpoint into ``model.load_weights``.

        Raises one :class:`DistLoadError` on every worker if any worker
        fails (a missing or damaged checkpoint, a worker that died), and a
        ValueError naming the parameters the checkpoint left unloaded.
        """
        t0 = time.perf_counter()
        device = _device_of(model)
        path, revision = _source(model_config)
        try:
            stream = TensorStream(_world_comm(device), device, path, names=_wanted(model),
                                  bucket_mb=self.options["bucket_mb"], read_policy=self.options["read_policy"],
                                  io_threads=self.options["io_threads"], revision=revision)
            try:
                loaded = model.load_weights(stream)
            except BaseException as e:
                stream.close(f"vLLM's load_weights raised {describe(e)}")
                raise
            stream.close("vLLM's load_weights returned before the end")
        except DistLoadError as e:  # one line, the same on every worker
            raise DistLoadError(f"distload: {e.one_line()}", phase=e.phase, failures=e.failures) from e
        logger.info("distload: %d tensors, %.3f GB read by this worker, in %.2f s", len(stream.names),
                    stream.bytes_read / 1e9, time.perf_counter() - t0)
        if model_config.quantization is None and loaded is not None:
            # vLLM's own rule for which parameters must come from the checkpoint.
            DefaultModelLoader.track_weights_loading(self, model, set(loaded))  # type: ignore[arg-type]


def _source(model_config: ModelConfig) -> tuple[str, str | None]:
    """The checkpoint path (or repo id) vLLM was given, and the revision when it is a repo id."""
    path = getattr(model_config, "model_weights", None) or model_config.model
    repo_id = "://" not in path and not Path(path).exists()  # looked up in the local Hub cache at the revision
    return path, model_config.revision if repo_id else None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _world_comm(device: torch.device) -> Comm:
    """(every worker) distload's transport over vLLM's world group, making no group of its own."""
    from vllm.distributed import get_world_group

    world = get_world_group()
    if world.world_size == 1:
        return LocalComm(device)
    data_device = device if device.type == "cuda" else torch.device("cpu")
    return TorchComm(world.device_group, data_device, control_group=world.cpu_group)


def _wanted(model: nn.Module) -> Callable[[str], bool] | None:
    """The checkpoint tensors this worker's model loads: not those of another pipeline stage's layers,
    nor those the model declares unused; None when that is all of them."""
    from vllm.distributed import get_pp_group
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    unused = getattr(model, "is_unused_checkpoint_weight", None)
    staged = get_pp_group().world_size > 1
    if not staged and unused is None:
        return None

    def wanted(name: str) -> bool:
        if staged and is_pp_missing_parameter(name, model):
            return False
        return not (unused is not None and unused(name))

    return wanted
