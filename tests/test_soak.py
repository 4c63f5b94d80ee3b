"""Soak: many loads back to back in one process leak no file descriptors, threads or memory.

World 1 (no process group) exercises the same driver, reader thread, buffer
pools and placement as a distributed load, in this process, so
``/proc/self`` sees everything.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
from pathlib import Path

import pytest
from torch import nn

import distload

LOADS = 50
RSS_SLACK = 48 << 20  # far below one leaked copy per load (50 x the checkpoint + buffers)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settle() -> tuple[int, int, int]:
    gc.collect()
    return _fds(), threading.active_count(), _rss()


def _model_for(sd: dict) -> nn.Module:
    """A module whose state dict has exactly the keys and shapes of ``sd``, built on meta."""
    root = nn.Module()
    with distload.empty_init():
        for name, t in sd.items():
            *path, leaf = name.split(".")
            mod = root
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, nn.Parameter(t.new_empty(t.shape)))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    from ckpt import write_sized

    path = write_sized(tmp_path_factory.mktemp("soak") / "ckpt", [24, 16, 8])
    return path, distload.load_state_dict(path)


def test_fifty_loads_leak_no_fds_threads_or_memory(reference):
    path, ref = reference
    for _ in range(3):  # warm-up: first-use allocations, lazy imports
        distload.load_checkpoint(_model_for(ref), path)
    fds0, threads0, rss0 = _settle()
    for i in range(LOADS):
        if i % 2:
            sd = distload.load_state_dict(path)
            assert sd.keys() == ref.keys()
            del sd
        else:
            model = _model_for(ref)
            distload.load_checkpoint(model, path)
            assert not any(p.is_meta for p in model.parameters())
            del model
    fds1, threads1, rss1 = _settle()
    assert fds1 <= fds0, f"file descriptors grew from {fds0} to {fds1}"
    assert threads1 <= threads0, f"threads grew from {threads0} to {threads1}"
    assert rss1 - rss0 < RSS_SLACK, f"RSS grew by {(rss1 - rss0) >> 20} MiB over {LOADS} loads"


def test_fifty_failed_loads_leak_no_fds_or_threads(reference, tmp_path, monkeypatch):
    import distload.io.reader

    path, ref = reference
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    last = sorted(broken.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-4])
    real, calls = distload.io.reader.read_exact, [0]

    def every_third_read_fails(fd, buf, offset, name):
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise OSError(5, "Input/output error (injected)")
        return real(fd, buf, offset, name)

    monkeypatch.setattr(distload.io.reader, "read_exact", every_third_read_fails)

    def fail_once(i: int) -> None:
        # Alternate a planning failure (truncated file) with a mid-transfer
        # read failure, after files are open and the reader thread runs.
        model = _model_for(ref)
        with pytest.raises(distload.DistLoadError, match="truncated" if i % 2 else "injected"):
            distload.load_checkpoint(model, broken if i % 2 else path, bucket_mb=0.01)
        assert all(p.is_meta for p in model.parameters())

    for i in range(3):
        fail_once(i)
    fds0, threads0, rss0 = _settle()
    for i in range(LOADS):
        fail_once(i)
    fds1, threads1, rss1 = _settle()
    assert fds1 <= fds0, f"file descriptors grew from {fds0} to {fds1}"
    assert threads1 <= threads0, f"threads grew from {threads0} to {threads1}"
    assert rss1 - rss0 < RSS_SLACK
