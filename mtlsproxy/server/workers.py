"""``workers: N``: N processes serve the same ports, under one supervisor.

Model (nginx's master/workers; SO_REUSEPORT like nginx's ``listen ... reuseport``):
- The supervisor resolves every listen address first. It binds each one itself with
  SO_REUSEPORT and never listens on it: the kernel sends connections only to listening
  sockets, but the bound socket holds a port 0 request to one concrete port, and a port
  taken by another program fails here, before any worker starts.
- Each worker is a fresh interpreter (``python -m mtlsproxy run``) told by environment
  variables which worker it is, which ports to bind (with SO_REUSEPORT), where the
  prometheus multiprocess files live, and where the TLS ticket-key secret is. A fresh
  interpreter, not a fork: prometheus-client picks its value store at import time, and
  nothing of the supervisor's state (loops, threads, sockets) leaks into a worker.
- Every worker runs its own admin listener on the shared admin port; ``/metrics``
  aggregates all workers' files (prometheus-client multiprocess mode). Counters and
  histograms add up; gauges say how they combine (``multiprocess_mode``).
- SIGTERM/SIGINT to the supervisor: forwarded to every worker, each drains as a single
  process does; the supervisor exits when all have, 0 if all exited 0. SIGHUP: forwarded
  (each worker re-reads the config). A worker that dies otherwise is restarted, at most
  ``MAX_RESTARTS`` times a minute; beyond that the supervisor stops everything, exit 1.

Rules of this module: ``WorkerSettings`` is plain data (no I/O); only ``Supervisor.run``
starts processes, and it returns an exit code instead of exiting (cli.py exits).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from mtlsproxy.config import Config

log = logging.getLogger("mtlsproxy")

ENV_WORKER = "MTLSPROXY_WORKER"  # JSON WorkerSettings; its presence makes a worker
ADMIN = "(admin)"  # key of the admin port in WorkerSettings.ports
MAX_RESTARTS = 5  # per minute, then give up (a crash loop is not a service)


@dataclass(frozen=True)
class WorkerSettings:
    index: int
    count: int
    metrics_dir: str
    secret_file: str
    ports: Mapping[str, int]  # listener name (or ADMIN) -> the port all workers share
    ready_fd: int = -1  # a pipe: the worker writes one byte when it serves

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSettings | None:
        raw = environ.get(ENV_WORKER)
        if not raw:
            return None
        data = json.loads(raw)
        return cls(int(data["index"]), int(data["count"]), str(data["metrics_dir"]),
                   str(data["secret_file"]), {str(k): int(v) for k, v in data["ports"].items()},
                   int(data.get("ready_fd", -1)))

    def apply(self, config: Config) -> Config:
        """The config with every port 0 replaced by the port the supervisor reserved."""
        listeners = tuple(
            dataclasses.replace(lc, port=self.ports.get(lc.name, lc.port))
            for lc in config.listeners)
        admin = config.admin
        if admin is not None and ADMIN in self.ports:
            admin = dataclasses.replace(admin, port=self.ports[ADMIN])
        return dataclasses.replace(config, listeners=listeners, admin=admin)

    def read_secret(self) -> bytes:
        with open(self.secret_file, "rb") as fh:
            return fh.read()


def reserve(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket: fixes port 0 to one port for all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, config: Config, config_path: str, count: int,
                 argv_prefix: list[str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.argv_prefix = argv_prefix or [sys.executable, "-m", "mtlsproxy"]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # worker index -> process
        self.stopping = False
        self.restarts: list[float] = []
        self.exit_codes: dict[int, int] = {}
        self._base = WorkerSettings(0, count, "", "", {})
        self._ready_pipes: dict[int, int] = {}  # read end -> worker index
        self._ready: set[int] = set()

    def __repr__(self) -> str:
        return (f"<Supervisor workers={len(self.procs)}/{self.count} "
                f"stopping={self.stopping}>")

    def run(self) -> int:
        rundir = tempfile.mkdtemp(prefix="mtlsproxy-")  # mode 0700: the secret lives here
        reserved: list[socket.socket] = []
        try:
            ports: dict[str, int] = {}
            for lc in self.config.listeners:
                reserved.append(reserve(lc.host, lc.port))
                ports[lc.name] = reserved[-1].getsockname()[1]
            if self.config.admin is not None:
                reserved.append(reserve(self.config.admin.host, self.config.admin.port))
                ports[ADMIN] = reserved[-1].getsockname()[1]
            metrics_dir = os.path.join(rundir, "metrics")
            os.mkdir(metrics_dir)
            secret_file = os.path.join(rundir, "ticket-secret")
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
            self._base = WorkerSettings(0, self.count, metrics_dir, secret_file, ports)
            return self._supervise()
        finally:
            for sock in reserved:
                sock.close()
            shutil.rmtree(rundir, ignore_errors=True)

    def _spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        settings = dataclasses.replace(self._base, index=index, ready_fd=write_fd)
        env = dict(os.environ, **{ENV_WORKER: settings.to_env(),
                                  "PROMETHEUS_MULTIPROC_DIR": settings.metrics_dir})
        try:
            proc = subprocess.Popen(
                [*self.argv_prefix, "run", "--config", self.config_path],
                env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        self.procs[index] = proc
        self._ready_pipes[read_fd] = index
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def _supervise(self) -> int:
        old = {sig: signal.signal(sig, self._forward)
               for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for i in range(self.count):
                self._spawn(i)
            failed = False
            while self.procs:
                self._poll_ready()
                for index, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del self.procs[index]
                    self._ready.discard(index)
                    self._mark_dead(proc.pid)
                    self.exit_codes[index] = code
                    if self.stopping:
                        log.info("worker %d exited (%d)", index, code)
                        continue
                    log.error("worker %d (pid %d) died with exit code %d", index, proc.pid,
                              code)
                    if not self._may_restart():
                        log.error("workers keep dying: stopping")
                        failed = True
                        self._forward(signal.SIGTERM, None)
                        continue
                    self._spawn(index)
                time.sleep(0.05)
            if failed:
                return 1
            return 0 if all(c == 0 for c in self.exit_codes.values()) else 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for fd in self._ready_pipes:
                os.close(fd)

    def _poll_ready(self) -> None:
        if not self._ready_pipes:
            return
        readable, _, _ = select.select(list(self._ready_pipes), [], [], 0)
        for fd in readable:
            index = self._ready_pipes.pop(fd)
            os.read(fd, 16)
            os.close(fd)
            self._ready.add(index)
            if len(self._ready) == self.count:
                log.info("all %d workers serving", self.count)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        return len(self.restarts) <= MAX_RESTARTS

    def _mark_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay: they are cumulative)."""
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, self._base.metrics_dir)  # type: ignore[no-untyped-call]


def notify_ready(settings: WorkerSettings) -> None:
    if settings.ready_fd >= 0:
        try:
            os.write(settings.ready_fd, b"1")
            os.close(settings.ready_fd)
        except OSError:
            pass
