"""Every MpiComm collective on a real MPI world; run as ``mpiexec -n N python tests/mpi_comm_check.py OUT_DIR``.

Each rank writes ``OUT_DIR/rank<r>.json`` with what it saw, for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distload import DistLoadError
from distload.transport.mpi import MpiComm


def main() -> None:
    out = Path(sys.argv[1])
    c = MpiComm(torch.device("cpu"))
    r, w = c.rank, c.world_size
    seen: dict = {"rank": r, "world": w}
    seen["gathered"] = c.all_gather_object({"r": r})
    seen["object"] = c.broadcast_object(("plan", w) if r == w - 1 else None, src=w - 1)
    # bf16 and a 0-d tensor: broadcast works on any dtype's bytes
    b = torch.arange(7, dtype=torch.bfloat16) if r == 0 else torch.zeros(7, dtype=torch.bfloat16)
    c.broadcast_(b, 0)
    s = torch.tensor(3.5) if r == 1 else torch.tensor(0.0)
    c.broadcast_(s, 1)
    seen["bcast"] = b.tolist() + [s.item()]
    # a scatter of variable sizes, point to point: rank 1 sends rank q exactly q + 1 bytes
    if r == 1:
        c.exchange_([(torch.arange(q + 1, dtype=torch.uint8) + 10 * q, q) for q in range(w) if q != 1], [])
        got = torch.arange(2, dtype=torch.uint8) + 10
    else:
        got = torch.empty(r + 1, dtype=torch.uint8)
        c.exchange_([], [(got, 1)])
    seen["scatter"] = got.tolist()
    record = torch.tensor([r, 100 + r], dtype=torch.int64)
    gathered = c.gather_(record, 2)
    seen["records"] = gathered.tolist() if gathered is not None else None
    seen["failed_none"] = c.any_failed(False)
    seen["failed"] = c.any_failed(r in (0, w - 1))
    try:
        c.agree("transfer", OSError(f"disk gone on rank {r}") if r == w - 1 else None)
        seen["agreed"] = None
    except DistLoadError as e:
        seen["agreed"] = {"failures": {str(k): v for k, v in e.failures.items()}, "phase": e.phase}
    (out / f"rank{r}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
