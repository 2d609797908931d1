"""Whether a host (a model or dataset host, a Ray cluster) can be reached, answered within HUB_TIMEOUT seconds."""
import socket


def unreachable(host: str, port: int = 443) -> str | None:
    """Why `host` cannot be reached (the socket error, in words), or None when it can."""
    from backend.config import settings

    try:
        socket.create_connection((host, port), timeout=settings.hub_timeout).close()
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None
