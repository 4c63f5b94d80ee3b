"""Shared fixtures: small checkpoints written into tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckpt import write_llama, write_synthetic  # noqa: E402


@pytest.fixture
def llama_ckpt(tmp_path: Path) -> Path:
    """A tiny tied-embedding Llama (fp32 on disk) in 4 shards."""
    return write_llama(tmp_path / "llama")


@pytest.fixture
def synthetic_ckpt(tmp_path: Path) -> Path:
    """Three shards of mixed dtypes and sizes, including a zero-size tensor."""
    return write_synthetic(tmp_path / "synthetic")
