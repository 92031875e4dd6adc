"""Bind addresses given on the command line, checked before anything starts (a bad one is one line, not a
traceback from deep inside a server). Standard library only."""

from __future__ import annotations

import ipaddress
import re
import socket

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def check_host(host: str, option: str = "--metrics-addr") -> str:
    """An IP address (IPv6 with or without brackets) or a host name, with no port; returns it unbracketed."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if ":" in bare or "[" in bare or not _HOSTNAME.match(bare):
        raise ValueError(f"{option} {host!r}: expected an IP address or a host name, without a port "
                         "(e.g. 0.0.0.0, 127.0.0.1, ::)")
    return bare


def parse_listen(listen: str, option: str = "--listen") -> tuple[str, int]:
    """``:9000`` -> (0.0.0.0, 9000); ``127.0.0.1:9000``; ``[::1]:9000``; ``localhost:9000``."""
    bad = ValueError(f"{option} {listen!r}: expected [HOST]:PORT with a port 0-65535, "
                     "e.g. :9000, 127.0.0.1:9000 or [::1]:9000")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise bad
    if not host:
        return "0.0.0.0", int(port)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise bad  # "a:b:9000", or an IPv6 address without brackets: which colon ends the host is a guess
    try:
        return check_host(host, option), int(port)
    except ValueError:
        raise bad from None


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or an error message writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_bindable(host: str, port: int) -> None:
    """OSError when ``host:port`` cannot be bound now (in use, not an address of this machine), for a server that
    starts later where its failure would be a traceback (kopf's liveness endpoint, in one of kopf's tasks).
    SO_REUSEADDR as aiohttp sets it: a port left in TIME_WAIT by a previous run is not "in use"."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
