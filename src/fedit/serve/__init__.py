"""`fedit serve`: an OpenAI-compatible API and a web page over a base model and its adapters."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable

from fedit.serve.api import make_app
from fedit.serve.models import BASE, Models, Source, expand_sources
from fedit.serve.votes import VoteStore

__all__ = [
    "BASE", "Models", "Source", "VoteStore", "bind", "expand_sources", "make_app", "run_server",
]  # fmt: skip


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from fedit.errors import FeditError

        raise FeditError(f"--host {host} --port {port}: cannot listen there: {e}") from None
    sock.listen(128)
    return sock


def run_server(
    models: Models,
    sock: socket.socket,
    cors: list[str] | None = None,
    default_model: str | None = None,
    ready: Callable[[str], None] | None = None,
    votes: VoteStore | None = None,
) -> None:
    """Serve until Ctrl-C / SIGTERM; `ready` gets the base URL once requests are accepted."""
    import uvicorn

    logger = logging.getLogger("fedit.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    app = make_app(models, cors, default_model, votes)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    if ready:
        ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    server.run(sockets=[sock])
