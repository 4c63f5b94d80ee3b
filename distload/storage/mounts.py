"""What kind of storage a checkpoint sits on, for the ``auto`` reading policy (object storage counts as network).

(coordinator) Process-local: reads ``/proc/self/mountinfo``, nothing else.
"""

from __future__ import annotations

import os

from .base import is_object_uri

# Filesystems where many concurrent small readers cost more than one large
# sequential reader: network, parallel and FUSE filesystems.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
              "9p", "afs", "panfs", "wekafs", "orangefs", "pvfs2", "fuse", "virtiofs")


def fs_type(path: str | os.PathLike) -> str:
    """The filesystem type of the mount holding ``path`` ("" when unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount = fields[4].replace("\\040", " ")
                after = line.split(" - ", 1)[1].split()
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, after[0] if after else ""
    except OSError:
        return ""
    return kind


def is_local_storage(path: str | os.PathLike) -> bool:
    """True unless ``path`` is on a network, parallel or FUSE filesystem, or in object storage."""
    if is_object_uri(path):
        return False
    kind = fs_type(path)
    return not any(kind == n or kind.startswith(n + ".") for n in NETWORK_FS)
