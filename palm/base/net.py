"""Loopback networking shared by the commands that start local servers and processes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it); whoever binds it next may race another process
    for it, so a caller retries on another port when its server cannot bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
