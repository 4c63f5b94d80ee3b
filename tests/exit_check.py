"""One rank of an exit-status job: run it, then record the native threads alive when teardown begins.

Usage (every rank, with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)::

    python exit_check.py THREADS_OUT.json cli CKPT [CLI options...]
    python exit_check.py THREADS_OUT.json train CKPT

``cli`` runs ``distload.load.main``; ``train`` is a library script: build
``exit_check:build`` under ``empty_init``, ``fully_shard_blocks``,
``load_checkpoint``, one AdamW step, ``torch.distributed.destroy_process_group()``.
The process then exits normally (Python finalizes, C++ static destructors
run), so a SIGABRT from teardown shows in its exit status. The last ``atexit``
handler writes the names of the threads still alive: a gloo thread there means
a process group outlived ``destroy_process_group`` and will be torn down with
the interpreter (the cause of ``terminate called without an active exception``).

``build`` is a tiny transformer-shaped model (embedding, a list of blocks, a
head), so each rank imports torch but not transformers.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
from torch import nn

VOCAB, HIDDEN, LAYERS = 64, 32, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def build() -> nn.Module:
    """The model the checkpoint holds (``--model exit_check:build``)."""
    return Tiny()


def write_checkpoint(path: str) -> None:
    """A two-file safetensors checkpoint of ``Tiny`` with an index."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Tiny().state_dict().items()}
    names = sorted(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, os.path.join(path, fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def _train(ckpt: str) -> int:
    import torch.distributed as dist

    import distload
    from distload.fsdp import fully_shard_blocks

    with distload.empty_init():
        model = build()
    fully_shard_blocks(model, "cpu")
    distload.load_checkpoint(model, ckpt, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (2, 8))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    dist.destroy_process_group()
    return 0


def _record_threads(path: str) -> None:
    names = []
    for t in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    with open(path, "w") as f:
        json.dump(names, f)


def main() -> int:
    out, kind, ckpt, *cli = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # --model exit_check:build
    atexit.register(_record_threads, out)  # registered first, so it runs last
    if kind == "train":
        return _train(ckpt)
    from distload.load import main as cli_main

    return cli_main([ckpt, *cli])


if __name__ == "__main__":
    sys.exit(main())
