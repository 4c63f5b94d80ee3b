"""The one exception type distload raises, on every rank alike."""

from __future__ import annotations


class DistLoadError(RuntimeError):
    """A load failed. Raised on every rank with the same message.

    ``failures`` maps each failing rank to its own one-line cause, so a user on
    rank 5 of 64 can see that the problem was a missing file on rank 17.
    ``phase`` says which step failed (``plan``, ``open``, ``transfer``, ...).
    The local rank's original exception, when it had one, is ``__cause__``.
    """

    def __init__(self, message: str, *, phase: str = "", failures: dict[int, str] | None = None,
                 agreed: bool = False, tracebacks: dict[int, str] | None = None):
        self.phase = phase
        self.failures = dict(failures or {})
        self.agreed = agreed  # True when every rank raised this same error
        # Each failing rank's formatted traceback (gathered only on failure), so
        # rank 0's log can show where rank 17 broke; the local one is __cause__.
        self.tracebacks = dict(tracebacks or {})
        super().__init__(message)

    def __reduce__(self):
        # Keyword-only fields would be lost by the default exception pickling,
        # and launchers (multiprocessing, torchrun error files) pickle errors.
        return (_rebuild, (str(self), self.phase, self.failures, self.agreed, self.tracebacks))

    @classmethod
    def from_failures(cls, phase: str, failures: dict[int, str],
                      tracebacks: dict[int, str] | None = None) -> "DistLoadError":
        ranks = sorted(failures)
        lines = [f"distload {phase} failed on rank(s) {', '.join(map(str, ranks))}:"]
        # Identical causes on many ranks (a bad header seen by all) print once.
        by_msg: dict[str, list[int]] = {}
        for r in ranks:
            by_msg.setdefault(failures[r], []).append(r)
        for msg, rs in by_msg.items():
            who = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {_ranges(rs)}"
            lines.append(f"  {who}: {msg}")
        return cls("\n".join(lines), phase=phase, failures=failures, agreed=True, tracebacks=tracebacks)


def add_context(exc: BaseException, where: str) -> BaseException:
    """Note where a foreign exception happened (file, key, step) without wrapping it.

    The exception itself stays the ``__cause__`` of the agreed error, traceback
    and all; the note makes its one-line description name the file or key.
    """
    if not isinstance(exc, DistLoadError):
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            try:
                exc.__notes__ = notes  # type: ignore[attr-defined]
            except AttributeError:
                return exc
        notes.append(where)
    return exc


def _rebuild(message: str, phase: str, failures: dict[int, str], agreed: bool,
             tracebacks: dict[int, str]) -> DistLoadError:
    return DistLoadError(message, phase=phase, failures=failures, agreed=agreed, tracebacks=tracebacks)


def _ranges(ranks: list[int]) -> str:
    out, start, prev = [], ranks[0], ranks[0]
    for r in ranks[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)
