"""The configuration loader: YAML in, the model (config/model.py) out, or every problem.

Rules of this module:
- Every problem is collected, not just the first, and each names its key path
  (``listeners[0].tls.certificates[0].key_file: file not found: ...``), like ghostunnel's
  validators. ``load_config`` raises one ``ConfigError`` carrying all of them.
- Unknown keys are errors: a typo must never silently fall back to a default.
- Relative paths resolve against the config file's folder.
- Nothing here opens a socket or exits the process; files are only checked to exist.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from mtlsproxy.config.model import (
    CLIENT_INTERMEDIATES,
    FORWARD_FAMILIES,
    FORWARDED_MODES,
    SECURITY_POLICIES,
    UNDERSCORE_ACTIONS,
    AdminConfig,
    AuthorizerConfig,
    CertificateConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    MutualTLSConfig,
    Networks,
    RevocationConfig,
    RouteConfig,
    TimeoutsConfig,
    TLSConfig,
    Upstream,
)
from mtlsproxy.config.rules import Rule, RuleError, parse_rule
from mtlsproxy.errors import ConfigError
from mtlsproxy.http.normalize import ESCAPED_SLASH_ACTIONS, PathError, normalize_path

# A header name, or a name prefix ending in "*" (listeners[].strip_headers).
_HEADER_PATTERN = re.compile(r"^[!#$%&'+\-.^_`|~0-9A-Za-z]+\*?$")

T = TypeVar("T")


class _Reader:
    """Walks a YAML mapping, recording problems with their key paths."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(f"{path}.{key}" if path else str(key),
                             f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def get(self, data: dict[str, Any], key: str, path: str, kind: type[T] | tuple[type, ...],
            default: T, check: Callable[[Any], str | None] | None = None) -> T:
        where = f"{path}.{key}" if path else key
        if key not in data or data[key] is None:
            return default
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.problem(where, f"must be {_kind_name(kind)}, got bool")
            return default
        if not isinstance(value, kind):
            self.problem(where, f"must be {_kind_name(kind)}, got {type(value).__name__}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(where, message)
                return default
        return value  # type: ignore[return-value]

    def required(self, data: dict[str, Any], key: str, path: str) -> bool:
        if key not in data or data[key] in (None, ""):
            self.problem(f"{path}.{key}" if path else key, "required")
            return False
        return True

    def file(self, data: dict[str, Any], key: str, path: str) -> Path:
        if not self.required(data, key, path):
            return Path()
        raw = data[key]
        if not isinstance(raw, str):
            self.problem(f"{path}.{key}", "must be a string path")
            return Path()
        resolved = self.resolve(raw)
        if not resolved.is_file():
            self.problem(f"{path}.{key}", f"file not found: {resolved}")
        return resolved

    def resolve(self, raw: str) -> Path:
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


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
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r}")
    return host, int(port)


def parse_upstream(value: str) -> Upstream:
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise ValueError("only http:// upstreams are supported (TLS to the upstream is not)")
    if not parts.hostname:
        raise ValueError("missing host")
    if parts.query or parts.fragment or parts.username:
        raise ValueError("must not carry a query, fragment or credentials")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if port is None:
        port = 80
    elif port == 0:
        raise ValueError("port 0 is not a valid upstream port")
    return Upstream("http", parts.hostname, port, parts.path.rstrip("/"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_authorizer(r: _Reader, raw: Any, path: str) -> AuthorizerConfig | None:
    data = r.mapping(raw, path, ("url", "timeout", "failure_mode", "forward_headers",
                                 "max_ttl"))
    if not r.required(data, "url", path):
        return None
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
        timeout=r.get(data, "timeout", path, float, 1.0, _positive),
        failure_mode=r.get(data, "failure_mode", path, str, "closed",
                           lambda v: None if v in ("closed", "open")
                           else "must be closed or open"),
        forward_headers=tuple(str(h) for h in headers),
        max_ttl=r.get(data, "max_ttl", path, float, 300.0, _positive),
    )


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _read_strip_headers(r: _Reader, data: dict[str, Any], path: str) -> tuple[str, ...]:
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


def _read_proxy_protocol(r: _Reader, raw: Any, path: str) -> tuple[bool, Networks | None]:
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


def _read_listener(r: _Reader, raw: Any, path: str, names: set[str],
                   underscores: str = "drop") -> ListenerConfig | None:
    data = r.mapping(raw, path, ("name", "address", "tls", "mutual_tls", "routes",
                                 "timeouts", "limits", "proxy_protocol", "strip_headers",
                                 "forwarded_headers", "merge_slashes", "escaped_slashes"))
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

    tpath = f"{path}.tls"
    tdata = r.mapping(data.get("tls"), tpath, ("security_policy", "certificates",
                                               "reload_interval"))
    if "tls" not in data:
        r.problem(tpath, "required: every listener terminates TLS")
    policy = r.get(tdata, "security_policy", tpath, str, "TLS_1_2",
                   lambda v: None if v in SECURITY_POLICIES
                   else f"must be one of {', '.join(SECURITY_POLICIES)}")
    certs: list[CertificateConfig] = []
    raw_certs = r.get(tdata, "certificates", tpath, list, [])
    if tdata and not raw_certs:
        r.problem(f"{tpath}.certificates", "at least one server certificate is required")
    for i, item in enumerate(raw_certs):
        cpath = f"{tpath}.certificates[{i}]"
        cdata = r.mapping(item, cpath, ("cert_file", "key_file"))
        certs.append(CertificateConfig(r.file(cdata, "cert_file", cpath),
                                       r.file(cdata, "key_file", cpath)))

    mpath = f"{path}.mutual_tls"
    mdata = r.mapping(data.get("mutual_tls"), mpath,
                      ("truststore_uri", "truststore_version", "refresh_interval",
                       "max_chain_length", "forward_client_cert", "revocation",
                       "client_intermediates"))
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
    families = r.get(mdata, "forward_client_cert", mpath, list, list(FORWARD_FAMILIES))
    for i, fam in enumerate(families):
        if fam not in FORWARD_FAMILIES:
            r.problem(f"{mpath}.forward_client_cert[{i}]",
                      f"unknown header family {fam!r} (allowed: {', '.join(FORWARD_FAMILIES)})")
    rpath_ = f"{mpath}.revocation"
    rv = r.mapping(mdata.get("revocation"), rpath_, ("crl_uris", "mode", "ocsp"))
    crl_uris: list[str] = []
    for i, cu in enumerate(r.get(rv, "crl_uris", rpath_, list, [])):
        if not isinstance(cu, str) or not cu:
            r.problem(f"{rpath_}.crl_uris[{i}]", "must be a path, file://, s3:// or http(s):// URI")
            continue
        if cu.startswith(("s3://", "http://", "https://")):
            crl_uris.append(cu)
            continue
        crl_path = r.resolve(cu[len("file://"):] if cu.startswith("file://") else cu)
        if not crl_path.is_file():
            r.problem(f"{rpath_}.crl_uris[{i}]", f"file not found: {crl_path}")
        crl_uris.append(str(crl_path))
    revocation = RevocationConfig(
        tuple(crl_uris),
        r.get(rv, "mode", rpath_, str, "soft",
              lambda v: None if v in ("soft", "hard") else "must be soft or hard"),
        r.get(rv, "ocsp", rpath_, bool, False))
    mtls = MutualTLSConfig(
        revocation=revocation,
        truststore_uri=uri,
        truststore_version=r.get(mdata, "truststore_version", mpath, str, ""),
        refresh_interval=r.get(mdata, "refresh_interval", mpath, float, 30.0, _positive),
        max_chain_length=r.get(mdata, "max_chain_length", mpath, int, 4,
                               lambda v: None if 1 <= v <= 16 else "must be between 1 and 16"),
        forward_client_cert=tuple(f for f in families if f in FORWARD_FAMILIES),
        client_intermediates=r.get(
            mdata, "client_intermediates", mpath, str, "ignore",
            lambda v: None if v in CLIENT_INTERMEDIATES else "must be ignore or use"),
    )

    routes: list[RouteConfig] = []
    raw_routes = r.get(data, "routes", path, list, [])
    if not raw_routes:
        r.problem(f"{path}.routes", "at least one route is required")
    seen: set[tuple[str | None, str]] = set()
    for i, item in enumerate(raw_routes):
        rpath = f"{path}.routes[{i}]"
        rdata = r.mapping(item, rpath, ("path_prefix", "upstream", "host", "strip_prefix",
                                        "allow", "authorizer"))
        prefix = r.get(rdata, "path_prefix", rpath, str, "/", _check_prefix)
        rhost = r.get(rdata, "host", rpath, str, "", _check_route_host) or None
        if rhost:
            # Compared as requests' hosts are (http/routing.py): no case, no trailing dot.
            rhost = rhost.lower().removesuffix(".")
        # Routes match without case (http/routing.py): /Pay and /pay are one route.
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
        allow: tuple[Rule, ...] | None = None
        if "allow" in rdata:
            raw_rules = r.get(rdata, "allow", rpath, list, [])
            if not raw_rules:
                r.problem(f"{rpath}.allow", "must list at least one alternative "
                                            "(omit allow to admit every validated client)")
            rules = []
            for j, raw_rule in enumerate(raw_rules):
                try:
                    rules.append(parse_rule(raw_rule))
                except RuleError as exc:
                    r.problem(f"{rpath}.allow[{j}]", str(exc))
            allow = tuple(rules)
        authorizer = None
        if "authorizer" in rdata:
            authorizer = _read_authorizer(r, rdata["authorizer"], f"{rpath}.authorizer")
        routes.append(RouteConfig(
            path_prefix=prefix if prefix == "/" else prefix.rstrip("/"),
            upstream=upstream,
            host=rhost,
            strip_prefix=r.get(rdata, "strip_prefix", rpath, bool, False),
            allow=allow,
            authorizer=authorizer,
        ))

    tmpath = f"{path}.timeouts"
    tm = r.mapping(data.get("timeouts"), tmpath, tuple(TimeoutsConfig.__dataclass_fields__))
    d = TimeoutsConfig()
    timeouts = TimeoutsConfig(**{
        k: r.get(tm, k, tmpath, float, getattr(d, k), _positive)
        for k in TimeoutsConfig.__dataclass_fields__})
    lpath = f"{path}.limits"
    lm = r.mapping(data.get("limits"), lpath, tuple(LimitsConfig.__dataclass_fields__))
    dl = LimitsConfig()
    limits = LimitsConfig(
        max_header_bytes=r.get(lm, "max_header_bytes", lpath, int, dl.max_header_bytes,
                               lambda v: None if 1024 <= v <= 1 << 20
                               else "must be between 1024 and 1048576"),
        max_connections=r.get(lm, "max_connections", lpath, int, dl.max_connections,
                              _positive),
    )
    proxy_protocol, proxy_sources = _read_proxy_protocol(r, data.get("proxy_protocol"),
                                                         f"{path}.proxy_protocol")
    return ListenerConfig(name=name, host=host, port=port,
                          tls=TLSConfig(policy, tuple(certs),
                                        r.get(tdata, "reload_interval", tpath, float, 30.0,
                                              _positive)),
                          mutual_tls=mtls,
                          routes=tuple(routes), timeouts=timeouts, limits=limits,
                          proxy_protocol=proxy_protocol,
                          proxy_protocol_sources=proxy_sources,
                          headers_with_underscores=underscores,
                          strip_headers=_read_strip_headers(r, data, path),
                          forwarded_headers=r.get(data, "forwarded_headers", path, str,
                                                  "append", _one_of(FORWARDED_MODES)),
                          merge_slashes=r.get(data, "merge_slashes", path, bool, True),
                          escaped_slashes=r.get(data, "escaped_slashes", path, str, "reject",
                                                _one_of(ESCAPED_SLASH_ACTIONS)))


def parse_config(raw: Any, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a decoded YAML document; raises ConfigError with every problem found."""
    r = _Reader(base_dir)
    top = r.mapping(raw, "", ("listeners", "admin", "drain_timeout", "parser", "access_log",
                              "workers", "headers_with_underscores"))
    if not isinstance(raw, dict):
        raise ConfigError(r.problems or ["(top level): must be a mapping"])
    listeners: list[ListenerConfig] = []
    raw_listeners = r.get(top, "listeners", "", list, [])
    if not raw_listeners:
        r.problem("listeners", "at least one listener is required")
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    underscores = r.get(top, "headers_with_underscores", "", str, "drop",
                        _one_of(UNDERSCORE_ACTIONS))
    for i, item in enumerate(raw_listeners):
        listener = _read_listener(r, item, f"listeners[{i}]", names, underscores)
        if listener is None:
            continue
        if listener.port and (listener.host, listener.port) in addresses:
            r.problem(f"listeners[{i}].address", "address used by another listener")
        addresses.add((listener.host, listener.port))
        listeners.append(listener)

    admin: AdminConfig | None = AdminConfig()
    if "admin" in top and top["admin"] is False:
        admin = None
    elif "admin" in top:
        adata = r.mapping(top.get("admin"), "admin", ("address",))
        if "address" in adata:
            try:
                ahost, aport = parse_address(str(adata["address"]))
                admin = AdminConfig(ahost, aport)
            except ValueError as exc:
                r.problem("admin.address", str(exc))
    parser = r.get(top, "parser", "", str, "httptools",
                   lambda v: None if v in ("httptools", "h11") else "must be httptools or h11")
    config = Config(
        listeners=tuple(listeners),
        admin=admin,
        drain_timeout=r.get(top, "drain_timeout", "", float, 20.0, _positive),
        parser=parser,
        access_log=r.get(top, "access_log", "", bool, True),
        source=source,
        workers=_read_workers(r, top),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def cpu_count() -> int:
    """Cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _read_workers(r: _Reader, top: dict[str, Any]) -> int:
    value = top.get("workers", 1)
    if value == "auto":
        return cpu_count()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        r.problem("workers", f"must be an integer from 1 to 256 or \"auto\", got {value!r}")
        return 1
    return value


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; raises ConfigError naming every bad key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(config file): cannot read {p}: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"(config file): invalid YAML{where}: {exc}"]) from None
    return parse_config(raw, p.resolve().parent, source=p.resolve())


def admin_is_loopback(config: Config) -> bool:
    return config.admin is None or _is_loopback(config.admin.host)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); raises ValueError."""
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise ValueError("expected s3://bucket/key")
    return parts.netloc, key
