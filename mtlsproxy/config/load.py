"""The configuration loader: a YAML file in, the model (config/model.py) out, or every
problem at once (``ConfigError``), each naming its key path (config/reader.py's rules).
Nothing here opens a socket or exits the process; files are only checked to exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mtlsproxy.config.listener import read_listener
from mtlsproxy.config.model import UNDERSCORE_ACTIONS, AdminConfig, Config, ListenerConfig
from mtlsproxy.config.reader import Reader, one_of, positive
from mtlsproxy.config.values import is_loopback, parse_address
from mtlsproxy.errors import ConfigError


def parse_config(raw: Any, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a decoded YAML document; raises ConfigError with every problem found."""
    r = Reader(base_dir)
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
                        one_of(UNDERSCORE_ACTIONS))
    for i, item in enumerate(raw_listeners):
        listener = read_listener(r, item, f"listeners[{i}]", names, underscores)
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
        drain_timeout=r.get(top, "drain_timeout", "", float, 20.0, positive),
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


def _read_workers(r: Reader, top: dict[str, Any]) -> int:
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
    return config.admin is None or is_loopback(config.admin.host)
