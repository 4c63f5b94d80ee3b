"""What a load did, per rank and for the whole job."""

from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass, field


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class LoadReport:
    """Returned by every rank. ``ranks`` holds every rank's own figures."""

    rank: int
    world_size: int
    host: str
    local_rank: int
    device: str
    files: list[str]  # files this rank read
    bytes_read: int  # tensor bytes this rank read from storage
    total_bytes: int  # tensor bytes the whole job moved
    seconds: float
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # checkpoint keys not read: transformers ignores them, or subset
    converted_keys: list[str] = field(default_factory=list)  # checkpoint keys gathered for a conversion op
    ops_run: list[str] = field(default_factory=list)  # gathered conversions this rank ran (first target key)
    op_source_bytes: int = 0  # bytes of gathered-op sources that landed on this rank (only op ranks get any)
    warnings: list[str] = field(default_factory=list)
    peak_rss_bytes: int = 0
    chunks: int = 0  # collectives that carried data
    ranks: list[dict] = field(default_factory=list)
    node: str = ""  # the plan's node key: hostname, plus the launcher's node rank when known
    local_bytes: int = 0  # bytes of model tensors this rank holds (its shards, plus replicated tensors)
    read_policy: dict[str, str] = field(default_factory=dict)  # DTensor name -> "scatter" | "slice"
    buffer_bytes: int = 0  # transfer buffers this rank allocated (reads, receives, sends), beyond its tensors

    @classmethod
    def from_dict(cls, d: dict) -> "LoadReport":
        """The report :meth:`to_dict` gave (without its ``ranks``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"ranks"}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def gbps(self) -> float:
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gbps"] = self.gbps
        return d

    def summary(self) -> str:
        """A few lines for rank 0 to print."""
        lines = [
            f"distload: {self.total_bytes / 1e9:.3f} GB in {self.seconds:.2f} s "
            f"= {self.gbps:.2f} GB/s, world {self.world_size}, device {self.device}, {self.chunks} chunk{'' if self.chunks == 1 else 's'}"
        ]
        for r in self.ranks or [self.to_dict()]:
            lines.append(
                f"  rank {r['rank']:>3} {r.get('node') or r['host']}:{r['local_rank']}  read {r['bytes_read'] / 1e9:7.3f} GB "
                f"from {len(r['files'])} file(s)  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB"
                + (f"  local {r['local_bytes'] / 1e9:7.3f} GB" if r.get("local_bytes") else "")
            )
        if self.read_policy:
            counts: dict[str, int] = {}
            for p in self.read_policy.values():
                counts[p] = counts.get(p, 0) + 1
            lines.append("  sharded tensors: " + ", ".join(f"{n} by {p}" for p, n in sorted(counts.items())))
        if self.missing_keys:
            lines.append(f"  missing keys ({len(self.missing_keys)}): {', '.join(self.missing_keys[:8])}"
                         + (" ..." if len(self.missing_keys) > 8 else ""))
        if self.unexpected_keys:
            lines.append(f"  unexpected keys ({len(self.unexpected_keys)}): {', '.join(self.unexpected_keys[:8])}"
                         + (" ..." if len(self.unexpected_keys) > 8 else ""))
        if self.ignored_keys:
            lines.append(f"  ignored checkpoint keys, not read ({len(self.ignored_keys)}): "
                         f"{', '.join(self.ignored_keys[:8])}" + (" ..." if len(self.ignored_keys) > 8 else ""))
        if self.converted_keys:
            lines.append(f"  keys gathered for a conversion ({len(self.converted_keys)}): "
                         f"{', '.join(self.converted_keys[:8])}" + (" ..." if len(self.converted_keys) > 8 else ""))
            ran = [(r["rank"], len(r["ops_run"])) for r in self.ranks or [self.to_dict()] if r.get("ops_run")]
            if ran:
                lines.append("  conversions run (each by one rank): " + ", ".join(f"rank {r}: {n}" for r, n in ran))
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)
