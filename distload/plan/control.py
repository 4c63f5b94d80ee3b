"""The control messages of a load and of a save, as fixed-size records: what every rank sends rank 0.

Pure (no torch, no processes). Twice per load rank 0 needs a few numbers from
every rank: in the plan phase where it runs and that it agrees with the
others (:data:`PLAN`), and at the end what it did (:data:`LOAD_REPORT`,
:data:`SAVE_REPORT`). Each is one fixed-size record in a gather to rank 0
only (:meth:`distload.transport.comm.Comm.gather_records`), so rank 0
receives ``world x record`` bytes, every other rank sends one record, and
no rank receives anything that grows with the world times the keys.
Arguments, the model and the checkpoint path are compared as 32-bit
digests; the texts travel only after a mismatch, to name it. Names (host,
node) come as *extras* from each node's local rank 0 only, and error texts
from the ranks that failed. The dry run (:mod:`distload.plan.dryrun`)
counts these same records.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass

from .items import RankInfo

# Plan phase, one per rank: node digest (64 bits, to group ranks by node), the digests of the
# arguments with the model's signature (compared with rank 0's), of the checkpoint path (compared
# within a node, where storage is shared) and of the rank's submesh view (0: none), its local rank,
# and a flag (1: this rank failed; its error comes as its extra).
PLAN = struct.Struct("<qIIIiI4x")
# Finish phase of a load: bytes read, bytes of local tensors, transfer-buffer bytes, data steps
# taken part in, peak RSS in KiB (as the kernel counts it), seconds.
LOAD_REPORT = struct.Struct("<qqqIId")
# Finish phase of a save: bytes written, sent and received, chunks gathered, peak RSS in KiB, seconds.
SAVE_REPORT = struct.Struct("<qqqIId")
# What gather_records adds to each record: the length of the rank's extra bytes.
EXTRA_LENGTH = struct.Struct("<I")
# A status exchange: one integer, whatever the world.
STATUS_BYTES = 4


def digest32(*parts: object) -> int:
    """A 32-bit digest of ``parts``' text, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def digest64(text: str) -> int:
    """A signed 64-bit digest of ``text`` (what a node key travels as)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


@dataclass(frozen=True)
class PlanEntry:
    """One rank's plan-phase record, decoded."""

    node: int  # digest64 of the node key
    check: int  # digest32 of the arguments (but the path) and the model's signature
    path: int  # digest32 of the checkpoint path as this rank names it
    view: int  # digest32 of its submesh view; 0 when it has none
    local_rank: int
    failed: bool

    def pack(self) -> bytes:
        return PLAN.pack(self.node, self.check, self.path, self.view, self.local_rank, int(self.failed))

    @classmethod
    def unpack(cls, raw: bytes) -> PlanEntry:
        node, check, path, view, local_rank, failed = PLAN.unpack(raw)
        return cls(node, check, path, view, local_rank, bool(failed))


def names_extra(host: str, node: str) -> bytes:
    """The extra a node's local rank 0 sends: its host and node key (one pickle, a few dozen bytes)."""
    return pickle.dumps((host,) if node == host else (host, node), protocol=pickle.HIGHEST_PROTOCOL)


def roster(got: list[tuple[bytes, bytes | None]], mine: RankInfo | None) -> tuple[list[PlanEntry], dict, list]:
    """(rank 0) Decode the plan phase's records: (entries, failures, every rank's place).

    ``failures`` maps each failed rank to its ``(message, traceback)``
    extra. Hosts come from each node's local rank 0; a node without one is
    named by its digest. ``mine`` is rank 0's own place, known exactly
    (None when rank 0 failed before it knew it).
    """
    entries = [PlanEntry.unpack(rec) for rec, _ in got]
    failures = {r: pickle.loads(x) for r, (e, (_, x)) in enumerate(zip(entries, got)) if e.failed and x}
    names = {entries[r].node: pickle.loads(x) for r, (_, x) in enumerate(got) if x and not entries[r].failed}
    places = []
    for r, e in enumerate(entries):
        host, node = (names[e.node] * 2)[:2] if e.node in names else (f"node-{e.node & 0xFFFFFFFFFFFFFFFF:016x}",) * 2
        places.append(RankInfo(r, host, e.local_rank, node))
    if places and mine is not None:
        places[0] = mine
    return entries, failures, places


def record_bytes(world: int, record: struct.Struct, extras: bool = True) -> tuple[int, int]:
    """(bytes a rank sends, bytes rank 0 receives from the others) for one gather of ``record``."""
    size = record.size + (EXTRA_LENGTH.size if extras else 0)
    return size, size * (world - 1)
