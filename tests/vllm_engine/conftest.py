"""The vLLM tests run in their own environment (``make test-vllm``); elsewhere they skip."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the main suite's helpers (hub cache layout)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.netfs
