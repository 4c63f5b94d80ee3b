"""distload: load sharded safetensors checkpoints into meta-initialized models on every rank.

Each file is read once per job, by one rank, and its tensors travel over
torch.distributed to every rank that needs them.

    import distload
    with distload.empty_init():
        model = build_model(config)
    report = distload.load_checkpoint(model, "/ckpt/llama", device="cuda")

    for name, tensor in distload.stream_state_dict("/ckpt/llama"):  # one tensor at a time
        ...
"""

from importlib import metadata as _metadata

from .errors import DistLoadError
from .format.discover import resolve_checkpoint
from .loader import load_checkpoint, load_state_dict, plan_checkpoint
from .model.place import empty_init
from .report import LoadReport
from .save_report import SaveReport
from .saver import save_checkpoint
from .stream import TensorStream, stream_state_dict
from .transport.bootstrap import init_distributed

__all__ = [
    "DistLoadError",
    "LoadReport",
    "SaveReport",
    "empty_init",
    "init_distributed",
    "load_checkpoint",
    "load_state_dict",
    "plan_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "stream_state_dict",
    "TensorStream",
]

try:
    __version__ = _metadata.version("distload")  # the one version: pyproject.toml's
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
