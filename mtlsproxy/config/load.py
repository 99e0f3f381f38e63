"""The configuration loader: a YAML file in, the model (config/model.py) out, or every
problem at once (``ConfigError``), each naming its key path (config/reader.py's rules).
Nothing here opens a socket or exits the process; files are only checked to exist.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from mtlsproxy.config.listener import read_listener
from mtlsproxy.config.model import UNDERSCORE_ACTIONS, AdminConfig, Config, ListenerConfig
from mtlsproxy.config.reader import Reader, one_of, positive
from mtlsproxy.config.values import is_loopback, parse_address
from mtlsproxy.errors import ConfigError

log = logging.getLogger("mtlsproxy.config")


def parse_config(raw: Any, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a decoded YAML document; raises ConfigError with every problem found."""
    r = Reader(base_dir)
    top = r.mapping(raw, "", ("listeners", "admin", "drain_timeout", "parser", "access_log",
                              "workers", "headers_with_underscores",
                              "config_watch_interval"))
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
        config_watch_interval=r.get(top, "config_watch_interval", "", float, 5.0,
                                    lambda v: None if v >= 0 else "must be 0 or more"),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def affinity_count() -> int:
    """Cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (Kubernetes' ``limits.cpu``), or
    None when there is none: cgroup v2's ``cpu.max`` ("max" or "QUOTA PERIOD"), else v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none). The cgroup's own directory
    is tried first (no cgroup namespace), then the mount's root (a container's view)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    v1 = [ln.split(":", 2)[2] for ln in lines
          if len(ln.split(":", 2)) == 3 and "cpu" in ln.split(":", 2)[1].split(",")]
    for rel in [*v2, ""]:
        try:
            quota, period = (root / rel.lstrip("/") / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for controller in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        for rel in [*v1, ""]:
            base = root / controller / rel.lstrip("/")
            try:
                quota_us = int((base / "cpu.cfs_quota_us").read_text())
                period_us = int((base / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            return None if quota_us < 0 or period_us <= 0 else quota_us / period_us
    return None


def cpu_count(root: Path = Path("/sys/fs/cgroup"),
              proc_cgroup: Path = Path("/proc/self/cgroup"),
              affinity: int | None = None) -> int:
    """``workers: auto``: the cores this process may run on, and no more than its cgroup's
    CPU quota rounded up (a pod limited to 1 CPU on a 64-core node gets 1 worker, as
    Go's automaxprocs and the JVM's container support decide), at least 1."""
    cores = affinity if affinity is not None else affinity_count()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _read_workers(r: Reader, top: dict[str, Any]) -> int:
    value = top.get("workers", 1)
    if value == "auto":
        count = cpu_count()
        log.info("workers: auto is %d (cores this process may use: %d; cgroup CPU quota: "
                 "%s)", count, affinity_count(), cgroup_cpu_quota() or "none")
        return count
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
    # Not resolved through symlinks: a ConfigMap's config.yaml -> ..data/config.yaml names
    # another file after every update, and the timestamped directory behind it is deleted.
    absolute = p.absolute()
    return parse_config(raw, absolute.parent, source=absolute)


def admin_is_loopback(config: Config) -> bool:
    return config.admin is None or is_loopback(config.admin.host)
