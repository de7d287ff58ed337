"""TCP ports: take one before anything depends on it, and say who holds one that is taken.

The router and the embedded engine bind their listening socket *first* (:func:`listen`), so a port in use is a
clear error before any engine starts or any model loads; uvicorn then serves on that socket. The router also
checks every configured engine port with :func:`check_free` before it starts that engine, so that a foreign
server on the port is never mistaken for the engine.
"""

from __future__ import annotations

import errno
import socket

from elastikv.errors import ConfigError


class PortInUse(ConfigError):
    """A port elastikv must listen on is held by another process."""


def listener_pid(port: int) -> int | None:
    """The pid listening on ``port``, if this user may see it (None if unknown)."""
    try:
        import psutil

        for c in psutil.net_connections(kind="inet"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return int(c.pid)
    except Exception:  # no psutil, psutil.AccessDenied, ...: unknown, not an error
        return None
    return None


def holder(port: int) -> str:
    """Who listens on ``port``, as a user would want to read it: "pid 123 (python -m http.server 8001)"."""
    pid = listener_pid(port)
    if pid is None:
        return f"another process (`ss -ltnp 'sport = :{port}'` shows which)"
    try:
        import psutil

        proc = psutil.Process(pid)
        return f"pid {pid} ({' '.join(proc.cmdline()) or proc.name()})"
    except Exception:  # gone meanwhile, or not ours to read
        return f"pid {pid}"


def listen(host: str, port: int, *, what: str, fix: str = "stop it or choose another port") -> socket.socket:
    """A socket bound to ``host:port`` and listening, ready to hand to uvicorn. Raises :class:`PortInUse`
    naming the port, the process that holds it and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a recent TIME_WAIT is fine
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"{what}: port {port} on {host} is in use by {holder(port)}; {fix}") from None
        raise ConfigError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_free(host: str, port: int, *, what: str, fix: str = "stop it or choose another port") -> None:
    """Raise :class:`PortInUse` if something listens on ``host:port`` now. A port this process may not bind
    (below 1024, not root) passes: only the process that will listen there can tell."""
    try:
        listen(host, port, what=what, fix=fix).close()
    except PortInUse:
        raise
    except ConfigError:
        return


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
