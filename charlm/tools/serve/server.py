"""Running the app under uvicorn on a socket bound here, so that port 0 (a free port) has a URL to print."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from charlm.util.errors import CharlmError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), or one sentence saying why not."""
    if not 0 <= port <= 65535:
        raise CharlmError(f"--port must be from 0 (a free port) to 65535, got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CharlmError(f"--host {host} is not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CharlmError(f"port {port} on {host} is in use; pick another --port, or --port 0 for a free one"
                              ) from None
        raise CharlmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    # one connection cannot hold the server: keep-alive short, request headers bounded by h11's defaults
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, lifespan="off",
                                         timeout_graceful_shutdown=2))


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = LOOPBACK, port: int = 0) -> Iterator[str]:
    """Run ``app`` in a background thread for the block (a notebook, a test); yields its URL."""
    sock = bind(host, port)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="charlm-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
