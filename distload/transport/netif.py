"""How the gloo groups distload makes reach the other nodes: which interface, and no full-mesh connect.

(every rank, locally, before it makes a gloo group) gloo binds whatever the
hostname resolves to unless ``GLOO_SOCKET_IFNAME`` names an interface. On stock
Ubuntu that is ``127.0.1.1``; on many clusters, a management NIC. Either way the
ranks on other nodes cannot reach it, and the group's first exchange hangs until
its timeout. NCCL does not have this problem: it picks its own interface
(``NCCL_SOCKET_IFNAME``, else the first one that is not loopback or docker).
:func:`gloo_interface` picks one for gloo the same way, and only on a job that
spans several nodes:

1. ``GLOO_SOCKET_IFNAME`` when it is set (yours wins);
2. else the first interface of this host that matches ``NCCL_SOCKET_IFNAME``
   (NCCL's syntax: ``eth,ib`` prefixes, ``=eth0`` exact names, ``^docker,lo``
   everything but these);
3. else the interface this host would route to ``MASTER_ADDR`` through (on the
   master itself, the one holding that address, or the default route's).

A gloo group also connects every pair of its ranks when it is made: world - 1
sockets per rank, 131,000 per 8-GPU node at 16,384 ranks. With
``TORCH_GLOO_LAZY_INIT=1`` a pair connects at its first message instead. The
exchanges distload runs over gloo (a ring all-reduce and all-gather, a tree
broadcast) then open a few sockets per rank: measured at world 16, 4 to 6 per
rank against 16 (``benchmarks/gloo_sockets.py``). :func:`gloo_group_env` sets
both variables while distload makes a gloo group, and puts them back after, so
groups you make yourself keep your settings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Mapping

LAZY_INIT = "TORCH_GLOO_LAZY_INIT"
GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


def multi_node(env: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher says this job spans more than one node (False when it does not say).

    torchrun: ``GROUP_WORLD_SIZE`` (agents) above 1, or ``LOCAL_WORLD_SIZE``
    below ``WORLD_SIZE``; SLURM: ``SLURM_NNODES``; Open MPI: its local size
    below its size.
    """
    env = os.environ if env is None else env

    def num(var: str) -> int | None:
        value = env.get(var, "").strip()
        return int(value) if value.isdigit() else None

    if (num("GROUP_WORLD_SIZE") or 1) > 1 or (num("SLURM_NNODES") or 1) > 1:
        return True
    for local, world in (("LOCAL_WORLD_SIZE", "WORLD_SIZE"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE")):
        a, b = num(local), num(world)
        if a is not None and b is not None and a < b:
            return True
    return False


def ipv4_interfaces() -> dict[str, str]:
    """This host's interfaces that are up and have an IPv4 address: name -> address, in index order."""
    import fcntl

    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), 0x8913, req)[16:18])[0]  # SIOCGIFFLAGS
                if not flags & 0x1:  # IFF_UP
                    continue
                addr = fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
            out[name] = socket.inet_ntoa(addr)
    return out


def match_nccl_ifname(spec: str, names: list[str]) -> list[str]:
    """The names among ``names`` that NCCL's ``NCCL_SOCKET_IFNAME`` syntax ``spec`` selects, in order.

    ``eth,ib`` selects names starting with either; ``=eth0,ib0`` exactly these;
    ``^docker,lo`` every name starting with neither (``^=`` exact exclusions).
    """
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    parts = [p.strip() for p in spec.split(",") if p.strip()]

    def hit(name: str) -> bool:
        return any(name == p if exact else name.startswith(p) for p in parts)

    return [n for n in names if hit(n) != exclude]


def _route_source(host: str, port: int) -> str | None:
    """The local address this host would send from to reach ``host`` (a UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return s.getsockname()[0]
    except (OSError, IndexError):
        return None


def gloo_interface(env: Mapping[str, str] | None = None, interfaces: Mapping[str, str] | None = None) -> str | None:
    """(every rank, locally) The interface gloo should bind on this node, or None to leave gloo's own choice.

    None on a single-node job (the hostname's address works there), when
    ``GLOO_SOCKET_IFNAME`` is already set, or when nothing fits. ``interfaces``
    (name -> IPv4 address) defaults to this host's.
    """
    env = os.environ if env is None else env
    if env.get(GLOO_IFNAME, "").strip() or not multi_node(env):
        return None
    ifaces = dict(ipv4_interfaces() if interfaces is None else interfaces)
    spec = env.get("NCCL_SOCKET_IFNAME", "").strip()
    if spec:
        picked = match_nccl_ifname(spec, list(ifaces))
        return picked[0] if picked else None
    master = env.get("MASTER_ADDR", "").strip()
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else 29500
    by_addr = {a: n for n, a in ifaces.items()}
    source = _route_source(master, port) if master else None
    if source is not None and (not ipaddress.ip_address(source).is_loopback or _is_loopback(master)):
        # A loopback master (every node emulated on one machine) is reached through lo, as gloo should be.
        return by_addr.get(source)
    # The master's name resolves to loopback here (``127.0.1.1`` on the master node itself): use the
    # interface of the default route, as the other nodes reach this host through it.
    source = _route_source("10.255.255.255", 1)
    if source is not None and not ipaddress.ip_address(source).is_loopback:
        return by_addr.get(source)
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def gloo_group_env(env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """(every rank, around making a gloo group) Lazy pair connects and the interface of :func:`gloo_interface`.

    Sets ``TORCH_GLOO_LAZY_INIT=1`` (unless you set it) and
    ``GLOO_SOCKET_IFNAME`` (when one is picked) for the duration only, and
    yields what it set. gloo reads both when a group is constructed.
    """
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    changes: dict[str, str] = {}
    if LAZY_INIT not in env:
        changes[LAZY_INIT] = "1"
    ifname = gloo_interface(env)
    if ifname is not None:
        changes[GLOO_IFNAME] = ifname
    saved = {k: env.get(k) for k in changes}
    env.update(changes)
    try:
        yield changes
    finally:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
