"""The project's exception hierarchy.

Every error that crosses a module boundary is one of these, so callers can catch
``MtlsProxyError`` and translate it at the edge (HTTP status, metric reason, exit code)
the way httpcore's ``map_exceptions`` does.
"""

from __future__ import annotations


class MtlsProxyError(Exception):
    """Base class of every error mtlsproxy raises on purpose."""


class ConfigError(MtlsProxyError):
    """The configuration is invalid; ``problems`` holds one ``key.path: message`` per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class TruststoreError(MtlsProxyError):
    """A truststore or server certificate could not be read, parsed or made a TLS context.

    ``key`` is the config key path below the listener that caused it, when known.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ProtocolError(MtlsProxyError):
    """Base class of HTTP protocol errors; ``status_hint`` is the status to answer with."""

    status_hint = 400
    reason = "bad_request"

    def __init__(self, message: str, status_hint: int | None = None) -> None:
        super().__init__(message)
        if status_hint is not None:
            self.status_hint = status_hint


class RemoteProtocolError(ProtocolError):
    """The peer sent something we will not accept (h11's remote protocol error)."""


class UpstreamError(MtlsProxyError):
    """Talking to the upstream failed; ``kind`` is the metric label, ``status_hint`` the answer."""

    def __init__(self, message: str, kind: str, status_hint: int = 502) -> None:
        super().__init__(message)
        self.kind = kind
        self.status_hint = status_hint


class ConnectionClosed(MtlsProxyError):
    """The peer closed the connection (or it was reset) while we were waiting on it."""
