"""A timed-out MPI broadcast (or point-to-point transfer) keeps its buffer alive until it completes; run as
``mpiexec -n 2 python tests/mpi_stranded_check.py OUT_DIR [bcast|p2p]``.

Rank 1 is the root and joins the broadcast 3 s late (with ``p2p``: sends a
save's shard to rank 0, its file's writer, 3 s late). Rank 0 waits 1 s, times
out, and drops its only reference to the receive buffer, as the loader and
the saver do on failure. MPI still writes into that memory when rank 1 turns
up, so the buffer must stay allocated until the request completes, and be
released then. Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from mpi4py import MPI

from distload.transport.mpi import MpiComm, stranded


def main() -> None:
    out = Path(sys.argv[1])
    p2p = sys.argv[2:] == ["p2p"]
    comm = MpiComm(torch.device("cpu"), timeout_s=1.0)
    seen: dict = {}
    if comm.rank == 1:
        time.sleep(3.0)
        data = torch.full((1 << 20,), 7, dtype=torch.uint8)
        if p2p:
            comm.exchange_([(data, 0)], [])
        else:
            comm.broadcast_(data, src=1)
    else:
        buf = torch.zeros(1 << 20, dtype=torch.uint8)
        ref = weakref.ref(buf)
        try:
            if p2p:
                comm.exchange_([], [(buf, 1)])
            else:
                comm.broadcast_(buf, src=1)
            seen["timed_out"] = False
        except TimeoutError as e:
            seen["timed_out"] = "timed out" in str(e)
        del buf
        gc.collect()
        seen["alive_after_timeout"] = ref() is not None
        seen["stranded_after_timeout"] = stranded()
        seen["zeros_until_the_root_sends"] = bool(ref() is not None and int(ref().sum()) == 0)
        deadline = time.monotonic() + 20
        while (ref() is not None or stranded()) and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        seen["released_after_completion"] = ref() is None
        seen["stranded_after_completion"] = stranded()
    MPI.COMM_WORLD.Barrier()
    (out / f"rank{comm.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
