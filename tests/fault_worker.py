"""One torchrun worker that loads a checkpoint through the CLI and, on one rank, dies or hangs mid-load.

Launched by tests/test_faults.py as
``torchrun --standalone --nproc_per_node N tests/fault_worker.py CKPT --fault-rank K --fault kill``
followed by any CLI options after ``--``. Rank K SIGKILLs itself (or sleeps
forever) at its Nth chunk read, from inside the reader, which is as
"mid-load" as it gets: the other ranks are in, or about to enter, a
broadcast that rank K will never join.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--fault-rank", type=int, required=True)
    p.add_argument("--fault", choices=["kill", "hang"], required=True)
    p.add_argument("--after-reads", type=int, default=2, help="fail at this read call (1-based)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, cli = p.parse_args(argv[:cut]), argv[cut + 1 :]  # after --: options for python -m distload.load

    import distload.load
    import distload.io.reader

    if int(os.environ["RANK"]) == args.fault_rank:
        real, calls = distload.io.reader.read_exact, [0]

        def faulty(*a, **kw):
            calls[0] += 1
            if calls[0] == args.after_reads:
                print(f"fault_worker: rank {args.fault_rank} {args.fault}s itself now", file=sys.stderr, flush=True)
                if args.fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return real(*a, **kw)

        distload.io.reader.read_exact = faulty
    return distload.load.main([args.ckpt, *cli])


if __name__ == "__main__":
    sys.exit(main())
