"""Where a truststore comes from: a file (watched by content hash) or an S3 object
(watched by VersionId/ETag). ``check`` is blocking I/O: callers run it off the event loop.

Rules of this module:
- ``check(current)`` returns None when the version is still ``current`` (a cheap HEAD for
  S3, a read + hash for a file), otherwise the new bytes and their version.
- Every failure is a ``TruststoreError`` naming the URI; nothing here swaps anything.
- S3 goes through boto3's standard credential chain and honours AWS_ENDPOINT_URL /
  AWS_ENDPOINT_URL_S3 by itself: no endpoint code here.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from mtlsproxy.config.values import parse_s3_uri
from mtlsproxy.errors import TruststoreError


@dataclass(frozen=True)
class Fetched:
    data: bytes
    version: str  # S3 VersionId (or ETag when unversioned); a file's SHA-256


class Source(Protocol):
    uri: str

    def check(self, current: str | None) -> Fetched | None: ...


class FileSource:
    """A local file. Reading through the path each time follows a Kubernetes ConfigMap's
    ``..data`` symlink swap, which replaces the whole directory atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uri = str(path)

    def __repr__(self) -> str:
        return f"<FileSource {self.uri}>"

    def check(self, current: str | None) -> Fetched | None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise TruststoreError(f"cannot read truststore {self.path}: {exc.strerror}") from exc
        version = hashlib.sha256(data).hexdigest()
        return None if version == current else Fetched(data, version)


def default_s3_client() -> Any:
    import boto3  # imported lazily: file-only deployments never pay for it
    from botocore.config import Config

    # Every refresh is itself a retry: fail a check fast rather than back off for long.
    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10,
                                            retries={"max_attempts": 2, "mode": "standard"}))


class S3Source:
    def __init__(self, bucket: str, key: str, version: str = "",
                 client_factory: Callable[[], Any] = default_s3_client) -> None:
        self.bucket, self.key, self.pinned = bucket, key, version
        self.uri = f"s3://{bucket}/{key}"
        self._client_factory = client_factory
        self._client: Any = None

    def __repr__(self) -> str:
        return f"<S3Source {self.uri} pinned={self.pinned or '-'}>"

    def _call(self, op: str, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            if self._client is None:
                self._client = self._client_factory()
            return getattr(self._client, op)(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise TruststoreError(f"{self.uri}: {op} failed: {err.get('Code', '?')} "
                                  f"{err.get('Message', '')}".rstrip()) from None
        except BotoCoreError as exc:
            raise TruststoreError(f"{self.uri}: {op} failed: {exc}") from None

    def check(self, current: str | None) -> Fetched | None:
        pin = {"VersionId": self.pinned} if self.pinned else {}
        head = self._call("head_object", **pin)
        version = head.get("VersionId") or head.get("ETag", "").strip('"')
        if version and version == current:
            return None
        version_arg = {"VersionId": head["VersionId"]} if head.get("VersionId") else {}
        obj = self._call("get_object", **version_arg)
        try:
            data = obj["Body"].read()
        except Exception as exc:  # botocore streaming errors are not one class
            raise TruststoreError(f"{self.uri}: reading the object failed: {exc}") from None
        return Fetched(data, version)


class HttpSource:
    """An http(s):// URL (CRL distribution points); version = SHA-256 of the body.

    Conditional: once a body is held, the next fetch sends its ``ETag`` as
    ``If-None-Match`` and its ``Last-Modified`` as ``If-Modified-Since`` (RFC 9110 section
    13.1), and a ``304 Not Modified`` costs no download."""

    def __init__(self, url: str, timeout: float = 10.0, context: Any = None,
                 follow_redirects: bool = True, limit: int = 16 * 1024 * 1024) -> None:
        self.uri = url
        self.timeout = timeout
        self.context = context  # an ssl.SSLContext for https (None: the system's CAs)
        # False: a redirect is a failed fetch (a JWKS is taken from exactly its URL: a
        # redirect to http:// would let the keys be replaced on the way).
        self.follow_redirects = follow_redirects
        self.limit = limit  # bytes read at most
        self._validators: dict[str, str] = {}  # request headers for the body held
        self._held: str | None = None  # the version those validators describe

    def __repr__(self) -> str:
        return f"<HttpSource {self.uri}>"

    def check(self, current: str | None) -> Fetched | None:
        headers = self._validators if current is not None and current == self._held else {}
        request = urllib.request.Request(self.uri, headers=headers)
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=self.context)]
        if not self.follow_redirects:
            handlers.append(_NoRedirect())
        try:
            with urllib.request.build_opener(*handlers).open(
                    request, timeout=self.timeout) as resp:
                data = resp.read(self.limit)
                etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except urllib.error.HTTPError as exc:
            if exc.code == 304 and headers:
                return None
            raise TruststoreError(f"{self.uri}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TruststoreError(f"{self.uri}: {exc}") from None
        version = hashlib.sha256(data).hexdigest()
        self._validators = {name: value for name, value in (("If-None-Match", etag),
                                                           ("If-Modified-Since", modified))
                            if value}
        self._held = version
        return None if version == current else Fetched(data, version)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Every redirect refused: it surfaces as the HTTPError of its status."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed",
                                     headers, fp)


def make_source(uri: str, version: str = "",
                s3_client_factory: Callable[[], Any] = default_s3_client) -> Source:
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        return S3Source(bucket, key, version, s3_client_factory)
    if uri.startswith(("http://", "https://")):
        return HttpSource(uri)
    return FileSource(Path(urlsplit(uri).path if uri.startswith("file://") else uri))
