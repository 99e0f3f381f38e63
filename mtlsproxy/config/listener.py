"""Reading one ``listeners[]`` entry: TLS, mutual TLS, revocation, routes, limits."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from mtlsproxy.config.access_token import read_access_token
from mtlsproxy.config.model import (
    ALPN_PROTOCOLS,
    CLIENT_INTERMEDIATES,
    DEFAULT_FORWARD_FAMILIES,
    FORWARD_FAMILIES,
    FORWARDED_MODES,
    PROXY_PROTOCOL_UPSTREAM,
    SECURITY_POLICIES,
    TLS_VERSIONS,
    UPSTREAM_PROTOCOLS,
    AuthorizerConfig,
    CertificateConfig,
    DomainConfig,
    LimitsConfig,
    ListenerConfig,
    MutualTLSConfig,
    Networks,
    RevocationConfig,
    RouteConfig,
    TcpConfig,
    TimeoutsConfig,
    TLSConfig,
    Upstream,
    UpstreamTLS,
)
from mtlsproxy.config.reader import Reader, one_of, positive
from mtlsproxy.config.rules import Rule, RuleError, parse_rule
from mtlsproxy.config.values import parse_address, parse_s3_uri, parse_upstream
from mtlsproxy.http.normalize import ESCAPED_SLASH_ACTIONS, PathError, normalize_path

# A header name, or a name prefix ending in "*" (listeners[].strip_headers).
_HEADER_PATTERN = re.compile(r"^[!#$%&'+\-.^_`|~0-9A-Za-z]+\*?\Z")


def _check_prefix(value: str) -> str | None:
    if not value.startswith("/"):
        return "must start with /"
    # Requests are routed by their normalised path (http/normalize.py): a prefix that no
    # normalised path can have would never match, or match what the operator did not mean.
    try:
        normal = normalize_path(value.encode("latin-1", "replace"), True, "keep")
    except PathError as exc:
        return f"not a usable path: {exc}"
    if normal.decode("latin-1").rstrip("/") != value.rstrip("/") or "?" in value or \
            "#" in value:
        return (f"must be a normalised path (requests are matched by their normalised path: "
                f"{normal.decode('latin-1')!r})")
    return None


_ROUTE_HOST = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
                         r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
                         r"|\[[0-9A-Fa-f:.]+\])$")


def _check_route_host(value: str) -> str | None:
    if not _ROUTE_HOST.match(value):
        return "must be a host name or [IPv6] literal, without a port"
    return None


# The API Gateway method ARN's stem (docs/authorizer-apigateway.md):
# arn:<partition>:execute-api:<region>:<12-digit account>:<api id>/<stage>, no wildcard.
_ARN_PREFIX = re.compile(r"^arn:[a-z][a-z0-9-]*:execute-api:[a-z0-9-]+:[0-9]{12}:"
                         r"[A-Za-z0-9]+/[A-Za-z0-9_-]+\Z")


def _read_authorizer(r: Reader, raw: Any, path: str) -> AuthorizerConfig | None:
    data = r.mapping(raw, path, ("url", "timeout", "failure_mode", "forward_headers",
                                 "max_ttl", "format", "arn_prefix", "ttl"))
    if not r.required(data, "url", path):
        return None
    fmt = r.get(data, "format", path, str, "mtlsproxy", one_of(("mtlsproxy", "apigateway")))
    arn_prefix = ""
    if fmt == "apigateway":
        if r.required(data, "arn_prefix", path):
            arn_prefix = r.get(data, "arn_prefix", path, str, "", lambda v: None
                               if _ARN_PREFIX.match(v) else
                               "must be arn:aws:execute-api:<region>:<account>:<api id>/"
                               "<stage>, e.g. arn:aws:execute-api:eu-west-1:123456789012:"
                               "abcdef123/prod")
    else:
        for key in ("arn_prefix", "ttl"):
            if key in data:
                r.problem(f"{path}.{key}", "only with format: apigateway")
    url = str(data["url"])
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.problem(f"{path}.url", "must be an http:// or https:// URL")
    headers = r.get(data, "forward_headers", path, list, [])
    for i, h in enumerate(headers):
        if not isinstance(h, str) or not h:
            r.problem(f"{path}.forward_headers[{i}]", "must be a header name")
    return AuthorizerConfig(
        url=url,
        timeout=r.get(data, "timeout", path, float, 1.0, positive),
        failure_mode=r.get(data, "failure_mode", path, str, "closed",
                           lambda v: None if v in ("closed", "open")
                           else "must be closed or open"),
        forward_headers=tuple(str(h) for h in headers),
        max_ttl=r.get(data, "max_ttl", path, float, 300.0, positive),
        format=fmt,
        arn_prefix=arn_prefix,
        ttl=r.get(data, "ttl", path, float, 300.0,
                  lambda v: None if v >= 0 else "must be 0 or more seconds"),
    )


def _read_strip_headers(r: Reader, data: dict[str, Any], path: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, item in enumerate(r.get(data, "strip_headers", path, list, [])):
        if not isinstance(item, str) or not _HEADER_PATTERN.match(item) or item == "*":
            r.problem(f"{path}.strip_headers[{i}]",
                      f"must be a header name or a name prefix ending in *, got {item!r}")
            continue
        names.append(item.lower())
    return tuple(names)


# RFC 4291 section 2.5.5.2: peers in it are compared as IPv4 (proxy_protocol.trusted_source).
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _read_proxy_protocol(r: Reader, raw: Any, path: str) -> tuple[bool, Networks | None]:
    """``false``, ``true`` (a header from any peer), or ``{trusted_sources: [CIDR, ...]}``."""
    if raw is None or isinstance(raw, bool):
        return bool(raw), None
    if not isinstance(raw, dict):
        r.problem(path, f"must be a boolean or a mapping, got {type(raw).__name__}")
        return False, None
    data = r.mapping(raw, path, ("trusted_sources",))
    entries = r.get(data, "trusted_sources", path, list, [])
    if data.get("trusted_sources") is None:
        r.problem(f"{path}.trusted_sources",
                  "required: the load balancer's CIDRs (true takes a header from any peer)")
    elif data["trusted_sources"] == []:
        r.problem(f"{path}.trusted_sources", "must list at least one CIDR")
    sources = []
    for i, entry in enumerate(entries):
        where = f"{path}.trusted_sources[{i}]"
        try:
            if not isinstance(entry, str):
                raise ValueError(f"{entry!r} is not a string")
            net = ipaddress.ip_network(entry)  # strict: 10.1.2.3/8 is a typo, not 10/8
        except ValueError as exc:
            r.problem(where, f"not an IP network: {exc}")
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id:
            # ipaddress keeps the scope but ignores it when matching: refuse the illusion.
            r.problem(where, "a scope id (%...) cannot be matched: write the address alone")
        elif isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_V4_MAPPED):
            v4 = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
            r.problem(where, f"an IPv4-mapped network never matches (such peers are "
                             f"compared as IPv4): write {v4}")
        else:
            sources.append(net)
    return True, tuple(sources)


def read_listener(r: Reader, raw: Any, path: str, names: set[str],
                   underscores: str = "drop") -> ListenerConfig | None:
    data = r.mapping(raw, path, ("name", "address", "tls", "mutual_tls", "routes",
                                 "domains", "timeouts", "limits", "proxy_protocol",
                                 "strip_headers", "forwarded_headers", "merge_slashes",
                                 "escaped_slashes", "tcp"))
    if not data:
        r.problem(path, "must be a non-empty mapping")
        return None
    name = r.get(data, "name", path, str, "")
    if not name:
        r.problem(f"{path}.name", "required")
    elif name in names:
        r.problem(f"{path}.name", f"duplicate listener name {name!r}")
    names.add(name)
    host, port = "", 0
    if r.required(data, "address", path):
        try:
            host, port = parse_address(str(data["address"]))
        except ValueError as exc:
            r.problem(f"{path}.address", str(exc))
    domains: tuple[DomainConfig, ...] = ()
    tcp: TcpConfig | None = None
    if "tcp" in data:
        for key in ("routes", "domains"):
            if key in data:
                r.problem(f"{path}.{key}", "not allowed beside tcp: a TCP-mode listener "
                                           "relays every admitted connection to one upstream")
        tls = _read_tls(r, data.get("tls"), f"{path}.tls")
        # No ALPN: the bytes are not HTTP, whatever a client offers.
        tls = dataclasses.replace(tls, alpn=())
        mutual_tls = _read_mutual_tls(r, data.get("mutual_tls"), f"{path}.mutual_tls")
        tcp = _read_tcp(r, data["tcp"], f"{path}.tcp")
        routes: tuple[RouteConfig, ...] = ()
    elif "domains" in data:
        domains = _read_domains(r, data, path)
        tls, mutual_tls, routes = (domains[0].tls, domains[0].mutual_tls,
                                   domains[0].routes) if domains else (
            TLSConfig("TLS_1_2", ()), MutualTLSConfig(), ())
    else:
        if "tls" not in data:
            r.problem(f"{path}.tls", "required: every listener terminates TLS")
        # In the order of the problems they report: the file's order.
        tls = _read_tls(r, data.get("tls"), f"{path}.tls")
        mutual_tls = _read_mutual_tls(r, data.get("mutual_tls"), f"{path}.mutual_tls")
        routes = _read_routes(r, data, path)
    timeouts = _read_timeouts(r, data.get("timeouts"), f"{path}.timeouts")
    limits = _read_limits(r, data.get("limits"), f"{path}.limits")
    proxy_protocol, proxy_sources = _read_proxy_protocol(r, data.get("proxy_protocol"),
                                                         f"{path}.proxy_protocol")
    return ListenerConfig(name=name, host=host, port=port, tls=tls, mutual_tls=mutual_tls,
                          routes=routes, timeouts=timeouts, limits=limits,
                          proxy_protocol=proxy_protocol,
                          proxy_protocol_sources=proxy_sources,
                          headers_with_underscores=underscores,
                          strip_headers=_read_strip_headers(r, data, path),
                          forwarded_headers=r.get(data, "forwarded_headers", path, str,
                                                  "append", one_of(FORWARDED_MODES)),
                          merge_slashes=r.get(data, "merge_slashes", path, bool, True),
                          escaped_slashes=r.get(data, "escaped_slashes", path, str, "reject",
                                                one_of(ESCAPED_SLASH_ACTIONS)),
                          domains=domains, tcp=tcp)


def _read_tcp(r: Reader, raw: Any, path: str) -> TcpConfig:
    data = r.mapping(raw, path, ("upstream", "allow", "proxy_protocol_upstream"))
    upstream = Upstream("tcp", "", 0, "")
    if r.required(data, "upstream", path):
        value = str(data["upstream"])
        try:
            if value.startswith("unix:"):
                upstream = parse_upstream(value)
            else:
                host, port = parse_address(value)
                if port == 0:
                    raise ValueError("port 0 is not a valid upstream port")
                if value.startswith("["):
                    ipaddress.IPv6Address(host)  # ValueError: not an IPv6 address
                elif not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
                    raise ValueError(f"bad host {host!r} (an IPv6 address goes in [])")
                upstream = Upstream("tcp", host, port, "")
        except ValueError as exc:
            r.problem(f"{path}.upstream", f"{exc} (host:port or unix:/path)")
    allow = _read_allow(r, data, path)
    proxy = data.get("proxy_protocol_upstream", False)
    if proxy is False or proxy is None:
        proxy = None
    elif proxy not in PROXY_PROTOCOL_UPSTREAM:
        r.problem(f"{path}.proxy_protocol_upstream",
                  f"must be false or {', '.join(PROXY_PROTOCOL_UPSTREAM)}, got {proxy!r}")
        proxy = None
    return TcpConfig(upstream, allow, proxy)


def _read_allow(r: Reader, data: dict[str, Any], path: str) -> tuple[Rule, ...] | None:
    if "allow" not in data:
        return None
    raw_rules = r.get(data, "allow", path, list, [])
    if not raw_rules:
        r.problem(f"{path}.allow", "must list at least one alternative "
                                   "(omit allow to admit every validated client)")
    rules = []
    for j, raw_rule in enumerate(raw_rules):
        try:
            rules.append(parse_rule(raw_rule))
        except RuleError as exc:
            r.problem(f"{path}.allow[{j}]", str(exc))
    return tuple(rules)


# An SNI name of a domain: a DNS name (RFC 6066 section 3: no IP literal, no trailing
# dot), or "*." and one, the wildcard of one label as in a certificate (RFC 6125 6.4.3).
_DOMAIN_NAME = re.compile(r"^(?:\*\.)?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
                          r"(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$")


def _read_domains(r: Reader, data: dict[str, Any], path: str) -> tuple[DomainConfig, ...]:
    """``listeners[].domains``: each with its names, certificates, security policy,
    truststore and routes; the first is the default (a name that matches none)."""
    for key in ("tls", "mutual_tls", "routes"):
        if key in data:
            r.problem(f"{path}.{key}", "not allowed beside domains: each domain has its "
                                       "own certificates, security_policy, mutual_tls "
                                       "and routes")
    raw_domains = r.get(data, "domains", path, list, [])
    if not raw_domains:
        r.problem(f"{path}.domains", "must list at least one domain")
    seen: dict[str, int] = {}
    domains: list[DomainConfig] = []
    for i, raw in enumerate(raw_domains):
        dpath = f"{path}.domains[{i}]"
        ddata = r.mapping(raw, dpath, ("names", "certificates", "security_policy",
                                       "reload_interval", "alpn", "mutual_tls", "routes"))
        names: list[str] = []
        raw_names = r.get(ddata, "names", dpath, list, [])
        if not raw_names:
            r.problem(f"{dpath}.names", "must list at least one SNI name")
        for j, raw_name in enumerate(raw_names):
            where = f"{dpath}.names[{j}]"
            name = raw_name.lower() if isinstance(raw_name, str) else ""
            if not _DOMAIN_NAME.match(name):
                r.problem(where, f"must be a host name or *.name, got {raw_name!r}")
                continue
            if name in seen:
                r.problem(where, f"duplicate name {name!r} (also in domains[{seen[name]}])")
                continue
            seen[name] = i
            names.append(name)
        label = names[0] if names else f"domains[{i}]"
        tls = _read_tls(r, {k: ddata[k] for k in ("certificates", "security_policy",
                                                  "reload_interval", "alpn") if k in ddata},
                        dpath, required=True)
        mutual_tls = _read_mutual_tls(r, ddata.get("mutual_tls"), f"{dpath}.mutual_tls")
        routes = _read_routes(r, ddata, dpath, label)
        domains.append(DomainConfig(tuple(names) or (label,), tls, mutual_tls, routes))
    return tuple(domains)


def _read_alpn(r: Reader, data: dict[str, Any], path: str) -> tuple[str, ...]:
    raw = r.get(data, "alpn", path, list, list(ALPN_PROTOCOLS))
    if not raw:
        r.problem(f"{path}.alpn", "must list at least one protocol")
    protocols: list[str] = []
    for i, item in enumerate(raw):
        if item not in ALPN_PROTOCOLS:
            r.problem(f"{path}.alpn[{i}]", f"must be one of {', '.join(ALPN_PROTOCOLS)}, "
                                           f"got {item!r}")
        elif item in protocols:
            r.problem(f"{path}.alpn[{i}]", f"{item} listed twice")
        else:
            protocols.append(item)
    return tuple(protocols) or ALPN_PROTOCOLS


def _read_tls(r: Reader, raw: Any, tpath: str, required: bool = False) -> TLSConfig:
    tdata = r.mapping(raw, tpath, ("security_policy", "certificates", "reload_interval",
                                   "alpn"))
    policy = r.get(tdata, "security_policy", tpath, str, "TLS_1_2",
                   one_of(SECURITY_POLICIES))
    certs: list[CertificateConfig] = []
    raw_certs = r.get(tdata, "certificates", tpath, list, [])
    if (tdata or required) and not raw_certs:
        r.problem(f"{tpath}.certificates", "at least one server certificate is required")
    for i, item in enumerate(raw_certs):
        cpath = f"{tpath}.certificates[{i}]"
        cdata = r.mapping(item, cpath, ("cert_file", "key_file"))
        certs.append(CertificateConfig(r.file(cdata, "cert_file", cpath),
                                       r.file(cdata, "key_file", cpath)))
    return TLSConfig(policy, tuple(certs),
                     r.get(tdata, "reload_interval", tpath, float, 30.0, positive),
                     _read_alpn(r, tdata, tpath))


def _read_mutual_tls(r: Reader, raw: Any, mpath: str) -> MutualTLSConfig:
    mdata = r.mapping(raw, mpath,
                      ("truststore_uri", "truststore_version", "refresh_interval",
                       "max_chain_length", "forward_client_cert", "revocation",
                       "client_intermediates", "send_ca_names"))
    uri = r.get(mdata, "truststore_uri", mpath, str, "")
    if uri.startswith("s3://"):
        try:
            parse_s3_uri(uri)
        except ValueError as exc:
            r.problem(f"{mpath}.truststore_uri", str(exc))
    elif uri:
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        resolved = r.resolve(local)
        if not resolved.is_file():
            r.problem(f"{mpath}.truststore_uri", f"file not found: {resolved}")
        uri = str(resolved)
    families = r.get(mdata, "forward_client_cert", mpath, list, list(DEFAULT_FORWARD_FAMILIES))
    for i, fam in enumerate(families):
        if fam not in FORWARD_FAMILIES:
            r.problem(f"{mpath}.forward_client_cert[{i}]",
                      f"unknown header family {fam!r} (allowed: {', '.join(FORWARD_FAMILIES)})")
    return MutualTLSConfig(
        revocation=_read_revocation(r, mdata.get("revocation"), f"{mpath}.revocation"),
        truststore_uri=uri,
        truststore_version=r.get(mdata, "truststore_version", mpath, str, ""),
        refresh_interval=r.get(mdata, "refresh_interval", mpath, float, 30.0, positive),
        max_chain_length=r.get(mdata, "max_chain_length", mpath, int, 4,
                               lambda v: None if 1 <= v <= 16 else "must be between 1 and 16"),
        forward_client_cert=tuple(f for f in families if f in FORWARD_FAMILIES),
        client_intermediates=r.get(
            mdata, "client_intermediates", mpath, str, "ignore",
            lambda v: None if v in CLIENT_INTERMEDIATES else "must be ignore or use"),
        send_ca_names=r.get(mdata, "send_ca_names", mpath, bool, True),
    )


def _read_revocation(r: Reader, raw: Any, rpath: str) -> RevocationConfig:
    rv = r.mapping(raw, rpath, ("crl_uris", "mode", "ocsp", "refresh_fraction",
                                "first_fetch_timeout"))
    crl_uris: list[str] = []
    for i, cu in enumerate(r.get(rv, "crl_uris", rpath, list, [])):
        if not isinstance(cu, str) or not cu:
            r.problem(f"{rpath}.crl_uris[{i}]", "must be a path, file://, s3:// or http(s):// URI")
            continue
        if cu.startswith(("s3://", "http://", "https://")):
            crl_uris.append(cu)
            continue
        crl_path = r.resolve(cu[len("file://"):] if cu.startswith("file://") else cu)
        if not crl_path.is_file():
            r.problem(f"{rpath}.crl_uris[{i}]", f"file not found: {crl_path}")
        crl_uris.append(str(crl_path))
    return RevocationConfig(
        tuple(crl_uris),
        r.get(rv, "mode", rpath, str, "soft",
              lambda v: None if v in ("soft", "hard") else "must be soft or hard"),
        r.get(rv, "ocsp", rpath, bool, False),
        r.get(rv, "refresh_fraction", rpath, float, 0.8,
              lambda v: None if 0 < v <= 1 else "must be greater than 0 and at most 1"),
        r.get(rv, "first_fetch_timeout", rpath, float, 10.0, positive))


# Protocols an HTTP/1.1 Upgrade may switch a route's connection to. Not h2c: over TLS,
# HTTP/2 is chosen by ALPN (RFC 9113 section 3.2), and an h2c upgrade forwarded to an
# upstream would let a client past the proxy's per-request rules (h2c smuggling).
UPGRADES = frozenset({"websocket"})


def _read_routes(r: Reader, data: dict[str, Any], path: str,
                 domain: str = "") -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    raw_routes = r.get(data, "routes", path, list, [])
    if not raw_routes:
        r.problem(f"{path}.routes", "at least one route is required")
    seen: set[tuple[str | None, str]] = set()
    for i, item in enumerate(raw_routes):
        route = _read_route(r, item, f"{path}.routes[{i}]", seen, domain)
        if route is not None:
            routes.append(route)
    return tuple(routes)


def _read_route(r: Reader, item: Any, rpath: str,
                seen: set[tuple[str | None, str]], domain: str = "") -> RouteConfig:
    rdata = r.mapping(item, rpath, ("path_prefix", "upstream", "upstream_protocol", "host",
                                    "strip_prefix", "allow", "authorizer", "upgrades",
                                    "upstream_tls", "access_token"))
    prefix = r.get(rdata, "path_prefix", rpath, str, "/", _check_prefix)
    rhost = r.get(rdata, "host", rpath, str, "", _check_route_host) or None
    if rhost:
        # Compared as requests' hosts are (proxy/routing.py): no case, no trailing dot.
        rhost = rhost.lower().removesuffix(".")
    # Routes match without case (proxy/routing.py): /Pay and /pay are one route.
    if (rhost, prefix.lower().rstrip("/")) in seen:
        r.problem(rpath, f"duplicate route for host {rhost!r} and path_prefix {prefix!r} "
                         "(prefixes compare without case)")
    seen.add((rhost, prefix.lower().rstrip("/")))
    upstream = Upstream("http", "", 0, "")
    if r.required(rdata, "upstream", rpath):
        try:
            upstream = parse_upstream(str(rdata["upstream"]))
        except ValueError as exc:
            r.problem(f"{rpath}.upstream", str(exc))
    protocol = r.get(rdata, "upstream_protocol", rpath, str, "http1",
                     one_of(UPSTREAM_PROTOCOLS))
    if protocol != "http1":
        upstream = dataclasses.replace(upstream, protocol=protocol)
    if upstream.scheme == "https":
        upstream = dataclasses.replace(
            upstream, tls=_read_upstream_tls(r, rdata.get("upstream_tls"),
                                             f"{rpath}.upstream_tls"))
    elif "upstream_tls" in rdata:
        r.problem(f"{rpath}.upstream_tls", "applies to https:// upstreams only")
    allow = _read_allow(r, rdata, rpath)
    authorizer = None
    if "authorizer" in rdata:
        authorizer = _read_authorizer(r, rdata["authorizer"], f"{rpath}.authorizer")
    access_token = None
    if "access_token" in rdata:
        access_token = read_access_token(r, rdata["access_token"], f"{rpath}.access_token")
    upgrades: set[bytes] = set()
    # Default: WebSocket on HTTP/1.1 upstreams; nothing on HTTP/2 ones (no tunnel there).
    default = ["websocket"] if protocol == "http1" else []
    for j, name in enumerate(r.get(rdata, "upgrades", rpath, list, default)):
        if not isinstance(name, str) or name.lower() not in UPGRADES:
            r.problem(f"{rpath}.upgrades[{j}]",
                      f"must be one of {', '.join(sorted(UPGRADES))}, got {name!r}")
            continue
        upgrades.add(name.lower().encode())
    if upgrades and protocol != "http1":
        r.problem(f"{rpath}.upgrades", "upgrades are tunnelled to HTTP/1.1 upstreams only "
                                       f"(upstream_protocol is {protocol})")
    return RouteConfig(
        path_prefix=prefix if prefix == "/" else prefix.rstrip("/"),
        upstream=upstream,
        host=rhost,
        strip_prefix=r.get(rdata, "strip_prefix", rpath, bool, False),
        allow=allow,
        authorizer=authorizer,
        access_token=access_token,
        upgrades=frozenset(upgrades),
        domain=domain,
    )


def _read_upstream_tls(r: Reader, raw: Any, path: str) -> UpstreamTLS:
    """The files are read when contexts are built: ``check-config`` and start-up build
    them (cli.py), so a certificate that does not match its key is a problem naming the
    key, not a 502 later."""
    data = r.mapping(raw, path, ("ca_file", "server_name", "verify", "cert_file",
                                 "key_file", "min_version"))
    ca_file = r.file(data, "ca_file", path) if data.get("ca_file") else None
    cert_file = r.file(data, "cert_file", path) if data.get("cert_file") else None
    key_file = r.file(data, "key_file", path) if data.get("key_file") else None
    if (cert_file is None) != (key_file is None):
        r.problem(path, "cert_file and key_file go together (the client certificate "
                        "for upstream mTLS)")
    if ca_file is not None and data.get("verify") is False:
        r.problem(f"{path}.verify", "false with a ca_file: the CA would not be used "
                                    "(drop one of them)")
    tls = UpstreamTLS(
        ca_file=ca_file,
        server_name=r.get(data, "server_name", path, str, "", _check_server_name) or None,
        verify=r.get(data, "verify", path, bool, True),
        cert_file=cert_file,
        key_file=key_file,
        min_version=r.get(data, "min_version", path, str, "TLSv1.2", one_of(TLS_VERSIONS)))
    return tls


def _check_server_name(value: str) -> str | None:
    """A DNS name or an IP address, as the TLS layer can send and check it."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if len(value) > 253 or not re.fullmatch(
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
            r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?", value):
        return f"must be a DNS name or an IP address, got {value!r}"
    return None


def _read_timeouts(r: Reader, raw: Any, tmpath: str) -> TimeoutsConfig:
    tm = r.mapping(raw, tmpath, tuple(TimeoutsConfig.__dataclass_fields__))
    d = TimeoutsConfig()
    return TimeoutsConfig(**{
        k: r.get(tm, k, tmpath, float, getattr(d, k), positive)
        for k in TimeoutsConfig.__dataclass_fields__})


def _read_limits(r: Reader, raw: Any, lpath: str) -> LimitsConfig:
    lm = r.mapping(raw, lpath, tuple(LimitsConfig.__dataclass_fields__))
    dl = LimitsConfig()
    return LimitsConfig(
        max_header_bytes=r.get(lm, "max_header_bytes", lpath, int, dl.max_header_bytes,
                               lambda v: None if 1024 <= v <= 1 << 20
                               else "must be between 1024 and 1048576"),
        max_connections=r.get(lm, "max_connections", lpath, int, dl.max_connections,
                              positive),
        max_concurrent_streams=r.get(lm, "max_concurrent_streams", lpath, int,
                                     dl.max_concurrent_streams,
                                     lambda v: None if 1 <= v <= 10000
                                     else "must be between 1 and 10000"),
    )
