"""The HTTP port of `ernie-cluster serve`: bound exclusively, or refused with one line.

Ray Serve's proxies bind with SO_REUSEPORT, so a second Ray Serve on a taken port starts
without error and the kernel splits the connections between the two servers. Binding here
without SO_REUSEPORT fails on any listener, theirs included, and says so before anything
slow starts.
"""

from __future__ import annotations

import errno
import socket


class PortUnavailableError(ValueError):
    """The HTTP port cannot be bound (in use, or not allowed); the message is one line."""


def _family(host: str) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PortUnavailableError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    return infos[0][0]


def bind_exclusive(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port that no other listener shares (not listening yet).

    SO_REUSEADDR only lets a restart reuse a port whose old connections linger in TIME_WAIT;
    a live listener still makes the bind fail.
    """
    if not 0 < port < 65536:
        raise PortUnavailableError(f"--port must be in 1..65535, got {port}")
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailableError(_explain(host, port, exc)) from None
    return sock


def check_port_free(host: str, port: int) -> None:
    """Raise PortUnavailableError unless host:port could be bound right now."""
    bind_exclusive(host, port).close()


def _explain(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is already in use on {where} (another server, maybe another "
            "ernie-cluster serve); stop it or choose another port with --port "
            "(scripts/demo.sh: PORT=<port>)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"no permission to listen on {where} (ports below 1024 need privileges); "
            "choose another port with --port (scripts/demo.sh: PORT=<port>)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: --host {host!r} is not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}; check --host and --port"
