"""Parsers of single config values: addresses, upstream URLs, S3 URIs; pure."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from mtlsproxy.config.model import Upstream


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not host:
        raise ValueError("missing host")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r}")
    return host, int(port)


def parse_upstream(value: str) -> Upstream:
    """``http://host[:port][/base]``, ``https://...`` or ``unix:/absolute/path.sock``;
    raises ValueError."""
    if value.startswith("unix:"):
        path = value[5:]
        if path.startswith("//"):  # unix:///run/app.sock, as curl and gRPC spell it
            path = path[2:]
        if not path.startswith("/") or any(c in path for c in "\0\r\n"):
            raise ValueError("a unix socket upstream is unix:/absolute/path")
        if len(path.encode()) > 107:  # sun_path: 108 bytes with its NUL (unix(7))
            raise ValueError("a unix socket path is at most 107 bytes")
        return Upstream("unix", "", 0, "", unix_path=path)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be http://host:port, https://host:port or unix:/path")
    if not parts.hostname:
        raise ValueError("missing host")
    if parts.query or parts.fragment or parts.username:
        raise ValueError("must not carry a query, fragment or credentials")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise ValueError("port 0 is not a valid upstream port")
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); raises ValueError."""
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise ValueError("expected s3://bucket/key")
    return parts.netloc, key
