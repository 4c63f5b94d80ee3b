"""A timed-out MPI point-to-point transfer keeps its receive buffer alive until it completes; run as
``mpiexec -n 2 python tests/mpi_p2p_stranded_check.py OUT_DIR``.

Rank 1 sends 3 s late (a save's shard holder that stalls). Rank 0, the file's
writer, waits 1 s, times out, and drops its only reference to the receive
buffer, as the saver does on failure. MPI still writes into that memory when
rank 1's message arrives, so the buffer must stay allocated until the
request completes, and be released then. Each rank writes ``OUT_DIR/rank<r>.json``.
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
    comm = MpiComm(torch.device("cpu"), timeout_s=1.0)
    seen: dict = {}
    if comm.rank == 1:
        time.sleep(3.0)
        comm.exchange_([(torch.full((1 << 20,), 7, dtype=torch.uint8), 0)], [])
    else:
        buf = torch.zeros(1 << 20, dtype=torch.uint8)
        ref = weakref.ref(buf)
        try:
            comm.exchange_([], [(buf, 1)])
            seen["timed_out"] = False
        except TimeoutError as e:
            seen["timed_out"] = "timed out" in str(e)
        del buf
        gc.collect()
        seen["alive_after_timeout"] = ref() is not None
        seen["stranded_after_timeout"] = stranded()
        seen["zeros_until_the_sender_sends"] = bool(ref() is not None and int(ref().sum()) == 0)
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
