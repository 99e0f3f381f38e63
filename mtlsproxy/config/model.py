"""The configuration model: typed, frozen dataclasses, one per section of the YAML.

The loader (config/load.py) builds them and validates every value; everything else reads
them and never sees YAML.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from mtlsproxy.config.rules import Rule

# The peers trusted to send a PROXY protocol header (listeners[].proxy_protocol).
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

SECURITY_POLICIES = ("TLS_1_2", "TLS_1_3")
ALPN_PROTOCOLS = ("h2", "http/1.1")
# forward_client_cert: what is sent when the key is absent, and every family allowed
# (alb, traefik: other front ends' headers, for apps moving behind the proxy).
DEFAULT_FORWARD_FAMILIES = ("rfc9440", "xfcc", "details")
FORWARD_FAMILIES = (*DEFAULT_FORWARD_FAMILIES, "alb", "traefik")
UNDERSCORE_ACTIONS = ("drop", "reject", "allow")
FORWARDED_MODES = ("append", "replace")


@dataclass(frozen=True)
class CertificateConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TLSConfig:
    security_policy: str
    certificates: tuple[CertificateConfig, ...]
    reload_interval: float = 30.0  # seconds between server certificate file checks
    # ALPN offered, in the server's order of preference (RFC 7301): h2 first, as nginx
    # with "http2 on" and Envoy; a client that offers neither gets no ALPN (HTTP/1.1).
    alpn: tuple[str, ...] = ("h2", "http/1.1")


@dataclass(frozen=True)
class RevocationConfig:
    crl_uris: tuple[str, ...] = ()
    mode: str = "soft"  # soft: allow and count when a CRL is missing or stale; hard: refuse
    ocsp: bool = False
    # When a newer CRL is fetched: at this fraction of a CRL's validity window
    # (thisUpdate to nextUpdate), and never later than nextUpdate - refresh_interval.
    refresh_fraction: float = 0.8
    # Start-up waits at most this long for the first CRL fetch, then serves without the
    # CRLs still missing (hard mode: refused, /readyz not ready) while the fetch goes on.
    first_fetch_timeout: float = 10.0


CLIENT_INTERMEDIATES = ("ignore", "use")


@dataclass(frozen=True)
class MutualTLSConfig:
    """``truststore_uri == ""`` means mutual TLS is off for the listener."""

    truststore_uri: str = ""
    truststore_version: str = ""  # S3 VersionId to pin; "" follows the newest version
    refresh_interval: float = 30.0
    max_chain_length: int = 4
    forward_client_cert: tuple[str, ...] = DEFAULT_FORWARD_FAMILIES
    revocation: RevocationConfig = RevocationConfig()
    # "ignore": only truststore CAs build a client's chain (the model: a client is issued
    # by a CA of the truststore); "use": intermediates the client sends count too.
    client_intermediates: str = "ignore"
    # The truststore's CA names in the CertificateRequest (nginx sends those of
    # ssl_client_certificate): a client with several certificates picks one they issued.
    # False for very large bundles (every handshake carries every name).
    send_ca_names: bool = True

    @property
    def enabled(self) -> bool:
        return self.truststore_uri != ""

    @property
    def truststore_path(self) -> Path:
        """The local path of a file truststore (a plain path or a file:// URI)."""
        uri = self.truststore_uri
        return Path(urlsplit(uri).path) if uri.startswith("file://") else Path(uri)


UPSTREAM_PROTOCOLS = ("http1", "h2")


TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True)
class UpstreamTLS:
    """``routes[].upstream_tls`` of an ``https://`` upstream (nginx's proxy_ssl_*, Envoy's
    UpstreamTlsContext): verified by default, against ``ca_file`` or the system CAs."""

    ca_file: Path | None = None
    server_name: str | None = None  # SNI and the name checked; None: the URL's host
    verify: bool = True
    cert_file: Path | None = None  # a client certificate: upstream mTLS
    key_file: Path | None = None
    min_version: str = "TLSv1.2"


@dataclass(frozen=True)
class Upstream:
    scheme: str  # http, https or unix
    host: str
    port: int
    base_path: str
    # routes[].upstream_protocol: http1, or h2 (prior knowledge, "h2c", as gRPC servers
    # listen: RFC 9113 section 3.3; ALPN over https).
    protocol: str = "http1"
    tls: UpstreamTLS | None = None  # https:// upstreams
    unix_path: str | None = None  # unix:/path/to.sock upstreams
    # The label used in metrics and logs, ``host:port`` (``[::1]:port`` for an IPv6 host,
    # as in a URL and nginx's $upstream_addr), or ``unix:/path``: a field, read on every
    # request.
    key: str = field(init=False, compare=False, repr=False)
    # What pooled connections are shared by: the key, and for https its TLS settings (two
    # routes to one host with different client certificates share no connection).
    pool_key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.unix_path is not None:
            key = f"unix:{self.unix_path}"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            key = f"{host}:{self.port}"
        object.__setattr__(self, "key", key)  # frozen: set once
        pool_key = key if self.tls is None else f"https://{key} {self.tls!r}"
        object.__setattr__(self, "pool_key", pool_key)


# JWS algorithms a token may be signed with by default: asymmetric only (RFC 8725
# section 3.1: a resource server that takes HS* with a public key as the secret can be
# fooled). "none" is never accepted, whatever the configuration says.
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                         "ES384", "ES512", "EdDSA")
SYMMETRIC_ALGORITHMS = ("HS256", "HS384", "HS512")


@dataclass(frozen=True)
class AccessTokenConfig:
    """``routes[].access_token``: a JWT from ``Authorization: Bearer`` (RFC 6750), verified
    against a JWKS and, by default, bound to the client certificate of the connection
    (RFC 8705 section 3: the ``cnf`` claim's ``x5t#S256``)."""

    jwks_uri: str  # https://..., a file path (or file://) or s3://bucket/key
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    # Envoy's jwt_authn clock_skew_seconds default: 60.
    leeway: float = 60.0
    required: bool = True
    require_binding: bool = True
    scopes: tuple[str, ...] = ()
    # (claim, header name): the claim's value goes upstream under that name, which a
    # client can never send itself on this route.
    claims_to_headers: tuple[tuple[str, str], ...] = ()
    # An unknown kid re-fetches the JWKS at most once per min_refresh; the keys are
    # fetched again every refresh_interval (Envoy's remote_jwks cache_duration: 5 min).
    min_refresh: float = 30.0
    refresh_interval: float = 300.0
    timeout: float = 5.0  # one JWKS fetch
    jwks_ca_file: Path | None = None  # https JWKS: the CAs to verify it with
    # The claims_to_headers names, folded (as identity.headers.fold): dropped from what a
    # client sends on the route, so only the proxy sets them.
    protected: frozenset[bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protected", frozenset(  # frozen: set once
            name.lower().replace("_", "-").encode() for _, name in self.claims_to_headers))


@dataclass(frozen=True)
class RouteConfig:
    path_prefix: str
    upstream: Upstream
    host: str | None = None
    strip_prefix: bool = False
    allow: tuple[Rule, ...] | None = None  # None: every validated client
    authorizer: AuthorizerConfig | None = None
    access_token: AccessTokenConfig | None = None
    # HTTP/1.1 upgrades tunnelled to the upstream (RFC 9110 section 7.8), lower-case
    # protocol names; () refuses every upgrade (501).
    upgrades: frozenset[bytes] = frozenset({b"websocket"})
    # The label of the listener's domain the route belongs to ("" without domains): two
    # domains' "/" routes are two series.
    domain: str = ""
    # The route's label in metrics and logs: a field, read on every request.
    name: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name",  # frozen: set once
                           f"{self.host or self.domain}{self.path_prefix}")


PROXY_PROTOCOL_UPSTREAM = ("v2",)


@dataclass(frozen=True)
class TcpConfig:
    """``listeners[].tcp``: TCP mode, ghostunnel's shape. After the handshake and the
    certificate verdict (and ``allow``, the routes' rule language), bytes both ways."""

    upstream: Upstream  # host:port or unix:/path
    allow: tuple[Rule, ...] | None = None
    # "v2": a PROXY v2 header to the upstream, the client certificate in TLVs (HAProxy's
    # send-proxy-v2-ssl-cn); None: nothing before the client's bytes.
    proxy_protocol_upstream: str | None = None
    # The same admission step as a route's (admission/admit.py takes a route): this one
    # stands for the listener's single destination. Its name labels the listener's
    # refusal log lines.
    route: RouteConfig = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", RouteConfig(
            path_prefix="/", upstream=self.upstream, allow=self.allow,
            upgrades=frozenset()))


@dataclass(frozen=True)
class TimeoutsConfig:
    # Defaults follow the peers: nginx client_header_timeout 60s is too generous for a
    # sidecar; Envoy's recommended edge settings use 10s for headers and 60s idle.
    handshake: float = 10.0
    request_headers: float = 10.0
    idle: float = 60.0
    upstream_connect: float = 5.0
    upstream_read: float = 60.0  # nginx proxy_read_timeout


@dataclass(frozen=True)
class LimitsConfig:
    # Envoy's max_request_headers_kb defaults to 60; nginx's large buffers to 4 x 8k.
    max_header_bytes: int = 32768
    max_connections: int = 10000
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 section 6.5.2): nginx's
    # http2_max_concurrent_streams default (Envoy's is 2^31 - 1).
    max_concurrent_streams: int = 100


@dataclass(frozen=True)
class DomainConfig:
    """One custom domain of a listener (the gateway's model: each domain name has its own
    certificate, security policy, truststore and base path mappings). The SNI name of a
    handshake chooses it; ``names`` holds exact names and ``*.`` wildcards (one label)."""

    names: tuple[str, ...]
    tls: TLSConfig
    mutual_tls: MutualTLSConfig
    routes: tuple[RouteConfig, ...]

    @property
    def label(self) -> str:
        """The ``domain`` label of metrics and the field of /truststore: the first name."""
        return self.names[0]


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    # With ``domains`` these three are the first (default) domain's; each domain is seen
    # by the rest of the code as a listener of its own (``domain_views``).
    tls: TLSConfig
    mutual_tls: MutualTLSConfig
    routes: tuple[RouteConfig, ...]
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    proxy_protocol: bool = False  # PROXY v1/v2 header required before TLS
    # The peers allowed to send that header (proxy_protocol.trusted_sources); None: any.
    proxy_protocol_sources: Networks | None = None
    # What a client may say in headers and paths (issue 20; docs/security.md).
    # headers_with_underscores is a top-level key, copied into every listener.
    headers_with_underscores: str = "drop"  # drop | reject | allow (Envoy's action)
    strip_headers: tuple[str, ...] = ()  # the operator's own: names, or prefixes with "*"
    forwarded_headers: str = "append"  # append | replace (X-Forwarded-For, Forwarded)
    merge_slashes: bool = True
    escaped_slashes: str = "reject"  # reject | keep | unescape (%2F, %5C, \\, %00)
    # listeners[].domains; () when the listener-level tls/mutual_tls/routes are its one
    # domain (the config of before domains existed).
    domains: tuple[DomainConfig, ...] = ()
    # In a domain view: the domain's label ("" for a listener without domains) and the key
    # path of its keys in the file ("domains[1]."), for errors.
    domain: str = ""
    key_prefix: str = ""
    # listeners[].tcp: TCP mode instead of routes (routes is then empty).
    tcp: TcpConfig | None = None

    @property
    def label(self) -> str:
        """How logs name this listener, or this domain of it: ``public/api.example.com``."""
        return f"{self.name}/{self.domain}" if self.domain else self.name

    def domain_views(self) -> tuple[ListenerConfig, ...]:
        """One listener-shaped config per domain, first the default: each domain's
        truststore, certificates and routes are built and watched as a listener's are."""
        if not self.domains:
            return (self,)
        return tuple(replace(self, tls=d.tls, mutual_tls=d.mutual_tls, routes=d.routes,
                             domains=(), domain=d.label, key_prefix=f"domains[{i}].")
                     for i, d in enumerate(self.domains))

    def key(self, key: str) -> str:
        """The file's key path of a key of this (domain) view: ``tls.certificates[0]`` is
        ``domains[1].certificates[0]`` in a domain (its certificates are not under tls)."""
        if not self.key_prefix:
            return key
        return self.key_prefix + (key[4:] if key.startswith("tls.") else key)


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9901


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    admin: AdminConfig | None = AdminConfig()
    drain_timeout: float = 20.0
    parser: str = "httptools"
    access_log: bool = True
    source: Path | None = None
    workers: int = 1  # processes sharing the listen ports (SO_REUSEPORT); "auto" = cores
    # How often the config file is checked for a change (a ConfigMap's ..data swap), which
    # is then applied as SIGHUP applies it; 0: only on SIGHUP.
    config_watch_interval: float = 5.0


@dataclass(frozen=True)
class AuthorizerConfig:
    url: str
    timeout: float = 1.0
    failure_mode: str = "closed"  # closed | open
    forward_headers: tuple[str, ...] = ()
    max_ttl: float = 300.0
    # mtlsproxy (the document and answer of docs/configuration.md) | apigateway (the AWS
    # API Gateway REQUEST authorizer's event and policy: docs/authorizer-apigateway.md).
    format: str = "mtlsproxy"
    # apigateway only: arn:<partition>:execute-api:<region>:<account>:<api id>/<stage>,
    # the method ARNs' prefix; and how long a policy is cached (the gateway's
    # authorizerResultTtlInSeconds, default 300; capped by max_ttl; 0: never cached).
    arn_prefix: str = ""
    ttl: float = 300.0
