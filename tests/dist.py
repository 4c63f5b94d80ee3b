"""Run a function on N real processes joined by a gloo FileStore group.

No ports are used, so tests run side by side under ``pytest -n auto``.
Each child's return value comes back to the parent; a child that raises,
crashes or hangs fails the calling test with that child's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

# Children fork from a server that has already imported torch and transformers: each rank then
# starts in well under a second instead of paying those imports again (seconds of CPU on 2 cores).
# Each child still gets the parent's current environment (see _child), as spawn would give it.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "transformers", "transformers.modeling_utils",
                             "safetensors.torch", "distload"])


def _child(fn: Callable, rank: int, world: int, store: str, out: str, args: tuple, kwargs: dict, env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    result: tuple[str, Any]
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            result = ("ok", fn(rank, world, *args, **kwargs))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # reported to the parent, which fails the test
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", e if _picklable(e) else None)
    with open(out, "wb") as f:
        pickle.dump(result, f)


def _picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


class ChildFailed(AssertionError):
    def __init__(self, results: dict[int, tuple]):
        self.results = results
        msgs = [f"--- rank {r}: {res[1]}" for r, res in sorted(results.items()) if res[0] != "ok"]
        super().__init__("\n".join(msgs))


def run_world(fn: Callable, world: int, *args: Any, timeout: float = 120, env: dict | None = None,
              expect_errors: bool = False, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` processes; return results by rank.

    ``fn`` must be importable (module level). With ``expect_errors=True`` the
    per-rank outcomes come back as ``("ok", value)`` / ``("error", text, exc)``
    tuples instead of failing the test.
    """
    with tempfile.TemporaryDirectory(prefix="distload-test-") as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"out{r}.pkl") for r in range(world)]
        procs = [
            _CTX.Process(target=_child, args=(fn, r, world, store, outs[r], args, kwargs, {**os.environ, **(env or {})}),
                         daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results: dict[int, tuple] = {}
        for r, path in enumerate(outs):
            if r in hung:
                results[r] = ("error", f"rank {r} still running after {timeout}s (hang)", None)
            elif os.path.exists(path):
                with open(path, "rb") as f:
                    results[r] = pickle.load(f)
            else:
                results[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} and no result", None)
    if expect_errors:
        return [results[r] for r in range(world)]
    if any(res[0] != "ok" for res in results.values()):
        raise ChildFailed(results)
    return [results[r][1] for r in range(world)]
