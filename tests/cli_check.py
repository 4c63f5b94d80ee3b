"""Run the real CLI (``distload.load.main``) on this rank, then check its tensors bit for bit.

Launched by the MPI and multi-node tests under ``mpiexec`` or ``torchrun``::

    mpiexec -n 3 python tests/cli_check.py OUT_DIR CKPT --comm mpi --report OUT_DIR/report.json

Everything after ``OUT_DIR`` goes to the CLI, plus ``--model cli_check:build``:
a module whose parameters mirror the checkpoint's tensors (built under
``empty_init`` like any model). After the CLI returns, each rank compares its
parameters with a single-process ``safetensors`` read of the files and writes
``OUT_DIR/rank<r>.json`` with the exit status and any mismatching names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

BUILT: list[nn.Module] = []


def _reference(path: str) -> dict[str, torch.Tensor]:
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def build(path: str) -> nn.Module:
    """(every rank, called by the CLI under empty_init) Parameters named and shaped like the checkpoint."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
    model = nn.Module()
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                meta = sf.get_slice(name)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                         "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}[meta.get_dtype()]
                *parents, leaf = name.split(".")
                mod = model
                for p in parents:  # through _modules: add_module refuses names like "half" (a method)
                    mod = mod._modules.setdefault(p, nn.Module())
                mod.register_parameter(leaf, nn.Parameter(torch.empty(meta.get_shape(), dtype=dtype),
                                                          requires_grad=False))
    BUILT.append(model)
    return model


def main() -> int:
    out_dir, cli_args = Path(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, str(Path(__file__).parent))
    import cli_check  # the module the CLI's factory records into (this file runs as __main__)
    from distload.transport.bootstrap import detect_launch
    from distload.load import main as cli_main

    launch = detect_launch()
    rank = launch.rank if launch else 0
    rc = cli_main(cli_args + ["--model", "cli_check:build"])
    mismatches: list[str] = []
    checked = 0
    if rc == 0:
        got = dict(cli_check.BUILT[-1].named_parameters())
        ref = _reference(cli_args[0])
        mismatches += sorted(set(ref) ^ set(got))
        for name in sorted(set(ref) & set(got)):
            a, b = got[name].detach(), ref[name]
            same = (a.dtype == b.dtype and a.shape == b.shape
                    and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
            checked += 1
            if not same:
                mismatches.append(name)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rc": rc, "checked": checked,
                                                          "mismatches": mismatches}))
    return rc or (1 if mismatches else 0)


if __name__ == "__main__":
    sys.exit(main())
