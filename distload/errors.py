"""The one exception type distload raises, on every rank alike, and the clipping that keeps its text short.

Note on size:
    An error's text travels to every rank (the agreement gathers each failing
    rank's message and traceback) and ends up in every rank's log. So a list
    of names in a message shows the first :data:`NAMES_SHOWN` and a count
    (:func:`clip_names`), an agreed error lists at most :data:`CAUSES_SHOWN`
    distinct causes, and every message and traceback that leaves its rank is
    cut to :data:`MAX_MESSAGE` / :data:`MAX_TRACEBACK` characters
    (:func:`clip_text`), keeping its start and its end.
"""

from __future__ import annotations

from collections.abc import Iterable

NAMES_SHOWN = 20  # names listed in one message, before "... (N more)"
CAUSES_SHOWN = 16  # distinct per-rank causes listed in one agreed error
MAX_MESSAGE = 4000  # characters of one rank's message
MAX_TRACEBACK = 20000  # characters of one rank's traceback


def clip_names(names: Iterable[str], limit: int = NAMES_SHOWN, sep: str = ", ") -> str:
    """``a, b, c`` for short lists; the first ``limit`` names and ``... (N more)`` for long ones."""
    shown: list[str] = []
    rest = 0
    for n in names:
        if len(shown) < limit:
            shown.append(str(n))
        else:
            rest += 1
    return sep.join(shown) + (f"{sep}... ({rest} more)" if rest else "")


def clip_text(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and its end (where a traceback's
    exception line is)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters clipped] ... {text[-half:]}"


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
        lines = [f"distload {phase} failed on rank(s) {_ranges(ranks)}:"]
        # Identical causes on many ranks (a bad header seen by all) print once.
        by_msg: dict[str, list[int]] = {}
        for r in ranks:
            by_msg.setdefault(failures[r], []).append(r)
        for msg, rs in list(by_msg.items())[:CAUSES_SHOWN]:
            lines.append(f"  {_who(rs)}: {clip_text(msg)}")
        if len(by_msg) > CAUSES_SHOWN:
            others = sum(len(rs) for rs in list(by_msg.values())[CAUSES_SHOWN:])
            lines.append(f"  ... and {len(by_msg) - CAUSES_SHOWN} other cause(s) on {others} rank(s) "
                         "(err.failures holds every one)")
        return cls("\n".join(lines), phase=phase, failures=failures, agreed=True, tracebacks=tracebacks)

    def one_line(self) -> str:
        """This error as one line: which step failed on which rank(s), and why.

        ``plan failed on rank 0: checkpoint path does not exist: /ckpt`` for an
        agreed error; an error no other rank saw is just its message. Lines of a
        multi-line cause are joined with `` | ``. The CLI prints this.
        """
        if not self.failures:
            return _joined(str(self))
        by_msg: dict[str, list[int]] = {}
        for r in sorted(self.failures):
            by_msg.setdefault(self.failures[r], []).append(r)
        what = f"{self.phase} failed" if self.phase else "failed"
        if len(by_msg) == 1:
            ((msg, ranks),) = by_msg.items()
            return f"{what} on {_who(ranks)}: {_joined(clip_text(msg))}"
        causes = "; ".join(f"{_who(rs)}: {_joined(clip_text(m))}" for m, rs in list(by_msg.items())[:CAUSES_SHOWN])
        if len(by_msg) > CAUSES_SHOWN:
            causes += f"; ... and {len(by_msg) - CAUSES_SHOWN} other cause(s)"
        return f"{what} on {_who(sorted(self.failures))}: {causes}"


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


def _joined(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def _who(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranges(ranks)}"


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
