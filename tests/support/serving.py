"""An ASGI app served on a real socket for a test (uvicorn on a thread)."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.waiting import until


@contextlib.contextmanager
def serving(app):
    """Serve `app` on 127.0.0.1 (a free port) for the `with` block; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    until(lambda: server.started, "the server started", 60)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(10)
