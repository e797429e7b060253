"""A free TCP port for a rendezvous (MASTER_PORT), the one helper every launcher, tool and test uses."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port nobody listens on at `host` now ('' = every interface). Another process may take it
    before the caller binds it; rendezvous code retries or fails with the port in its message."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
