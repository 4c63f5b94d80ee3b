"""Rank 1 never joins the load; run as ``mpiexec -n 2 python tests/mpi_hang_check.py CKPT``.

Rank 0 runs the CLI over the MPI transport with a short timeout and must fail
(and end the job) instead of waiting for rank 1 forever.
"""

from __future__ import annotations

import sys
import time

from mpi4py import MPI

from distload.load import main

if __name__ == "__main__":
    if MPI.COMM_WORLD.Get_rank() == 1:
        time.sleep(600)  # hung: never reaches a collective
        sys.exit(0)
    sys.exit(main([sys.argv[1], "--model", "none", "--comm", "mpi", "--timeout-s", "3"]))
