"""Run the CLI's ``main`` once per hostile case, in one process (one torch import).

Usage: ``python hostile_cli.py SPEC.json OUT.json`` where SPEC is a list of
``[name, argv]``; OUT maps name -> {"rc", "stderr", "seconds"}. The tests
use it to check exit codes and one-line errors for every case quickly; a
real ``python -m distload.load`` run is tested separately.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # so --model hostile_cases:TinyPlus imports


def main() -> None:
    from distload.load import main as cli_main

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = {}
    for name, argv in spec:
        err, t0 = io.StringIO(), time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli_main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
        out[name] = {"rc": rc, "stderr": err.getvalue(), "seconds": time.monotonic() - t0}
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
