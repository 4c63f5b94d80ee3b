"""A vLLM worker that reads the checkpoint through its own view of an emulated shared filesystem.

vLLM hands every worker the same model path, so on one machine all workers
would share one page cache, which separate hosts do not. For the netfs runs
(:mod:`benchmarks.netfs`, one view per emulated host), this worker class
points worker ``r`` at view ``r`` just before loading and marks it as host
``r``, so each worker pulls through its own client as it would on its own
node. Used by ``benchmarks/vllm_bench.py`` and the vLLM byte-count test:

    DISTLOAD_HOST_VIEWS=/mnt/node{rank}  LLM(..., worker_cls="benchmarks.vllm_views.HostViewWorker")

The engine process still reads ``config.json`` from the path it was given.
"""

from __future__ import annotations

import os

from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

#: The environment variable with the per-worker path, ``{rank}`` standing for the worker's rank.
VIEWS_ENV = "DISTLOAD_HOST_VIEWS"

_BASE = resolve_obj_by_qualname("vllm.v1.worker.cpu_worker.CPUWorker" if current_platform.is_cpu()
                                else "vllm.v1.worker.gpu_worker.Worker")


class HostViewWorker(_BASE):  # type: ignore[misc, valid-type]
    """(each worker) Load from this worker's own view, as host ``rank``."""

    def load_model(self, *args, **kwargs):
        template = os.environ.get(VIEWS_ENV)
        if template:
            self.vllm_config.model_config.model = template.format(rank=self.rank)
            os.environ["GROUP_RANK"] = str(self.rank)  # distload: each worker its own node
        return super().load_model(*args, **kwargs)
