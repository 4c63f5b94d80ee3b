"""What a save did, per rank and for the whole job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SaveReport:
    """Returned by every rank. ``ranks`` holds every rank's own figures."""

    rank: int
    world_size: int
    host: str
    node: str
    path: str  # the checkpoint directory written
    files: list[str]  # files this rank wrote
    bytes_written: int  # bytes this rank wrote to storage (headers and tensor data)
    bytes_sent: int  # shard bytes this rank sent to other ranks' files
    bytes_received: int  # shard bytes this rank received for its files
    total_bytes: int  # bytes of every file of the checkpoint
    seconds: float
    peak_rss_bytes: int = 0
    chunks: int = 0  # chunks gathered from shards (each one transfer to its file's writer)
    warnings: list[str] = field(default_factory=list)  # rank 0: e.g. a previous checkpoint's folder left behind
    ranks: list[dict] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gbps"] = self.gbps
        return d

    def summary(self) -> str:
        """A few lines for rank 0 to print."""
        lines = [f"distload save: {self.total_bytes / 1e9:.3f} GB in {self.seconds:.2f} s = {self.gbps:.2f} GB/s, "
                 f"world {self.world_size}, {self.chunks} gathered chunks -> {self.path}"]
        for r in self.ranks or [self.to_dict()]:
            lines.append(f"  rank {r['rank']:>3} {r.get('node') or r['host']}  wrote {r['bytes_written'] / 1e9:7.3f} GB "
                         f"in {len(r['files'])} file(s)  sent {r['bytes_sent'] / 1e9:6.3f} GB  "
                         f"received {r['bytes_received'] / 1e9:6.3f} GB  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)
