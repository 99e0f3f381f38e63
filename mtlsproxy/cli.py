"""Command line: run | check-config | demo | dev-pki. The only module that exits.

Exit codes: 0 success, 1 runtime failure (demo request failed), 2 bad configuration or
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlsproxy import __version__
from mtlsproxy.config import (
    CLIENT_INTERMEDIATES,
    Config,
    admin_is_loopback,
    load_config,
    parse_config,
)
from mtlsproxy.dev.pki import DevPKI, write_dev_pki
from mtlsproxy.errors import ConfigError, TruststoreError

log = logging.getLogger("mtlsproxy")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (container log pipelines parse it as is)."""

    def format(self, record: logging.LogRecord) -> str:
        # UTC with milliseconds and Z (RFC 3339), whatever the host's time zone.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()),
                        handlers=[handler])
    # boto3 announces where it found credentials at INFO: noise in a proxy's log.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; stay usable anyway
        loop = asyncio.new_event_loop()
    return loop


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("MTLSPROXY_CONFIG")


def _load(args: argparse.Namespace) -> Config | None:
    path = _config_path(args)
    if not path:
        print("error: --config FILE (or MTLSPROXY_CONFIG) is required", file=sys.stderr)
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _load_problems(config: Config, report: bool = False) -> list[str]:
    """Truststores and server certificates, loaded as ``run`` would load them; each
    problem is printed (naming its key) and returned. ``report``: each truststore's
    version and warnings are printed too (a usable truststore with warnings is no
    problem: the gateway accepts it and returns its warnings)."""
    from mtlsproxy.server.generation import fetch_generation, truststore_report
    problems = []
    for i, listener in enumerate(config.listeners):
        for lc in listener.domain_views():  # each domain's truststore and certificates
            try:
                generation, _ = fetch_generation(lc)
            except TruststoreError as exc:
                problems.append(f"listeners[{i}].{lc.key(exc.key or 'tls')}: {exc}")
                continue
            if report:
                summary, warnings = truststore_report(lc.label, generation)
                print(summary)
                for line in warnings:
                    print(line)
    problems += _upstream_tls_problems(config)
    for p in problems:
        print(p, file=sys.stderr)
    return problems


def _upstream_tls_problems(config: Config) -> list[str]:
    """Each https:// upstream's TLS context, built as a connection would build it."""
    import ssl

    from mtlsproxy.tls.upstream import build_context
    problems = []
    for i, listener in enumerate(config.listeners):
        for lc in listener.domain_views():
            for j, route in enumerate(lc.routes):
                tls = route.upstream.tls
                if tls is None:
                    continue
                try:
                    build_context(tls, "h2" if route.upstream.protocol == "h2"
                                  else "http/1.1")
                except (OSError, ssl.SSLError, ValueError) as exc:
                    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
                    problems.append(f"listeners[{i}].{lc.key(f'routes[{j}].upstream_tls')}: "
                                    f"unusable: {reason or exc}")
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 2
    if _load_problems(config, report=True):
        return 2
    print(f"config ok: {len(config.listeners)} listener(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mtlsproxy.server.workers import Supervisor, WorkerSettings, notify_ready
    config = _load(args)
    if config is None:
        return 2
    worker = WorkerSettings.from_env(os.environ)
    if worker is None and not admin_is_loopback(config):
        log.warning("admin listener is not on loopback: /metrics and /truststore are exposed")
    if worker is None and config.workers > 1:
        # Fail here, once and naming the key, rather than in N workers and a restart loop.
        if _load_problems(config):
            return 2
        try:
            return Supervisor(config, str(_config_path(args)), config.workers).run()
        except OSError as exc:
            print(f"error: cannot listen: {exc}", file=sys.stderr)
            return 1
    from mtlsproxy.server.proxy_server import ProxyServer
    from mtlsproxy.tls import native
    if worker is None and config.workers <= 1:
        problems = _upstream_tls_problems(config)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return 2
    if worker is not None:
        native.use_secret(worker.read_secret())
    try:
        server = ProxyServer(config, worker=worker)
    except TruststoreError as exc:
        print(f"{exc.key or 'error'}: {exc}", file=sys.stderr)
        return 2
    loop = _new_loop()
    try:
        loop.run_until_complete(server.serve(
            on_ready=None if worker is None else lambda: notify_ready(worker)))
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


def _crl_report(uris: list[str], bundle: Any) -> Any:
    from mtlsproxy.revocation.crl import build_state
    from mtlsproxy.truststore.sources import make_source
    datas: dict[str, bytes | None] = {}
    for uri in uris:
        try:
            fetched = make_source(uri).check(None)
            datas[uri] = fetched.data if fetched else None
        except TruststoreError:
            datas[uri] = None
    return build_state("soft", datas, bundle)


_INTERMEDIATES_LINE = {
    "ignore": "client intermediates: ignored (mutual_tls.client_intermediates: ignore, the "
              "default): a client must be issued by a CA of this bundle",
    "use": "client intermediates: used (mutual_tls.client_intermediates: use): a client may "
           "also send its own intermediates, up to a CA of this bundle",
}


def cmd_truststore_check(args: argparse.Namespace) -> int:
    """One line per certificate, then one WARNING line per problem; 0 usable, 1 not.
    With ``--config`` instead of a URI: every truststore of the config (each listener's,
    each domain's), with the settings the config gives it."""
    if args.uri is not None:
        if args.config or args.listener or args.domain:
            print("error: give a truststore URI or --config, not both", file=sys.stderr)
            return 2
        return _check_truststore(args.uri, args.version or "", args.max_chain_length,
                                 args.client_intermediates, args.crl or [])
    if not _config_path(args):
        print("error: give a truststore URI, or --config (or $MTLSPROXY_CONFIG)",
              file=sys.stderr)
        return 2
    config = _load(args)
    if config is None:
        return 2
    checked, worst = 0, 0
    for listener in config.listeners:
        if args.listener and listener.name != args.listener:
            continue
        for lc in listener.domain_views():
            if args.domain and lc.domain != args.domain.lower():
                continue
            checked += 1
            mtls = lc.mutual_tls
            print(f"## {lc.label}")
            if not mtls.enabled:
                print("mutual TLS off: no truststore")
                continue
            worst = max(worst, _check_truststore(
                mtls.truststore_uri, mtls.truststore_version, mtls.max_chain_length,
                mtls.client_intermediates, list(mtls.revocation.crl_uris)))
    if not checked:
        print("error: no listener or domain of the config matches", file=sys.stderr)
        return 2
    return worst


def _check_truststore(uri: str, version: str, max_chain_length: int,
                      client_intermediates: str, crl_uris: list[str]) -> int:
    from mtlsproxy.truststore.bundle import analyse
    from mtlsproxy.truststore.sources import make_source
    try:
        fetched = make_source(uri, version).check(None)
    except (TruststoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    assert fetched is not None
    bundle = analyse(fetched.data, max_chain_length)
    usable = {c.fingerprint_sha256 for c in bundle.certs}
    print(f"# {uri} version={fetched.version} certificates={len(bundle.all_certs)} "
          f"usable={len(usable)} warnings={len(bundle.warnings)}")
    print(_INTERMEDIATES_LINE[client_intermediates])
    crls = _crl_report(crl_uris, bundle)
    for c in bundle.all_certs:
        d = c.describe()
        mark = "" if c.fingerprint_sha256 in usable else "  (not used)"
        print(f"{d['subject']}  issuer={d['issuer']}  not_after={d['not_after']}  "
              f"sha256={d['fingerprint_sha256']}{mark}")
        if crl_uris:
            crl = crls.crls.get(c.cert.subject.public_bytes())
            print(f"  CRL: {crl.uri} next_update={crl.next_update} revoked={len(crl.revoked)}"
                  if crl else "  CRL: none covers this CA")
    for problem in crls.problems:
        print(f"WARNING {problem}")
    for w in bundle.warnings:
        print(f"WARNING {w.subject}: {w.problem}")
    if not usable:
        print("error: no usable CA: this truststore would not be applied", file=sys.stderr)
        return 1
    return 0


def cmd_dev_pki(args: argparse.Namespace) -> int:
    pki = write_dev_pki(Path(args.directory))
    print(f"wrote a development PKI to {pki.directory}:")
    for name in ("root-ca.pem", "intermediate-ca.pem", "truststore.pem", "server.pem",
                 "server.key", "client.pem", "client.key"):
        print(f"  {pki.directory / name}")
    return 0


def _demo_config(pki: DevPKI, upstream_port: int, port: int) -> Config:
    raw = {
        "listeners": [{
            "name": "demo",
            "address": f"127.0.0.1:{port}",
            "tls": {"certificates": [{"cert_file": str(pki.server_cert),
                                      "key_file": str(pki.server_key)}]},
            "mutual_tls": {"truststore_uri": str(pki.truststore)},
            "routes": [{"path_prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        }],
        "admin": {"address": "127.0.0.1:0"},
        "access_log": False,
    }
    return parse_config(raw, pki.directory)


async def _demo(pki: DevPKI, once: bool, port: int) -> int:
    from mtlsproxy.dev.demo_client import mtls_get
    from mtlsproxy.dev.echo import start_echo
    from mtlsproxy.server.proxy_server import ProxyServer
    echo = await start_echo()
    upstream_port = echo.sockets[0].getsockname()[1]
    server = ProxyServer(_demo_config(pki, upstream_port, port))
    await server.start()
    bound = server.listeners[0].bound_port
    try:
        status, body = await asyncio.get_running_loop().run_in_executor(
            None, mtls_get, "127.0.0.1", bound, "/hello", pki)
    except OSError as exc:
        print(f"demo request failed: {exc}", file=sys.stderr)
        return 1
    print(f"GET https://localhost:{bound}/hello with the demo client certificate -> {status}")
    print(body.decode("utf-8", "replace"))
    if status != 200:
        return 1
    print("\nTry it yourself:")
    print(f"  curl --cert {pki.client_cert} --key {pki.client_key} "
          f"--cacert {pki.root_cert} https://localhost:{bound}/hello")
    if once:
        await server.drain()
        echo.close()
        return 0
    try:
        await server.serve(on_ready=lambda: print("\nServing until Ctrl-C.", flush=True))
    finally:
        echo.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mtlsproxy-demo-") as tmp:
        pki = write_dev_pki(Path(tmp))
        loop = _new_loop()
        try:
            return loop.run_until_complete(_demo(pki, args.once, args.port))
        finally:
            loop.close()


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {value!r} (choose from {', '.join(LOG_LEVELS)})")
    return level


def build_parser() -> argparse.ArgumentParser:
    # --log-level before or after the subcommand: the subcommands share it through a
    # parent parser whose default does not override one given before them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS,
                        help=f"{', '.join(LOG_LEVELS)} (default: $MTLSPROXY_LOG_LEVEL "
                             "or info)")
    parser = argparse.ArgumentParser(prog="mtlsproxy",
                                     description="A mutual-TLS reverse proxy sidecar.")
    parser.add_argument("--version", action="version", version=f"mtlsproxy {__version__}")
    parser.add_argument("--log-level", type=_log_level, default=None,
                        help=f"{', '.join(LOG_LEVELS)} (default: $MTLSPROXY_LOG_LEVEL "
                             "or info)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common], help="run the proxy")
    p.add_argument("--config", help="config file (default: $MTLSPROXY_CONFIG)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate a config file without serving")
    p.add_argument("--config", help="config file (default: $MTLSPROXY_CONFIG)")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("demo", parents=[common],
                       help="throw-away PKI + echo upstream + proxy, one request")
    p.add_argument("--once", action="store_true", help="make the request and exit")
    p.add_argument("--port", type=int, default=8443, help="proxy port (0: any free port)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("truststore", parents=[common], help="truststore tools")
    tsub = p.add_subparsers(dest="truststore_command", required=True)
    t = tsub.add_parser("check", parents=[common],
                        help="analyse a truststore (file or s3://) without serving")
    t.add_argument("uri", nargs="?",
                   help="a path, file:// or s3://bucket/key (or --config: every truststore "
                        "of a config file)")
    t.add_argument("--config", help="check the truststores of this config file")
    t.add_argument("--listener", help="with --config: only this listener's")
    t.add_argument("--domain", help="with --config: only this domain's (its first name)")
    t.add_argument("--version", help="S3 VersionId (default: the newest)")
    t.add_argument("--max-chain-length", type=int, default=4)
    t.add_argument("--client-intermediates", choices=CLIENT_INTERMEDIATES, default="ignore",
                   help="the listener's mutual_tls.client_intermediates (default: ignore)")
    t.add_argument("--crl", action="append", metavar="URI",
                   help="a CRL to report per CA (repeatable): path, s3:// or http(s)://")
    t.set_defaults(func=cmd_truststore_check)
    p = sub.add_parser("dev-pki", parents=[common], help="write a development PKI to DIR")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_dev_pki)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        try:
            args.log_level = _log_level(os.environ.get("MTLSPROXY_LOG_LEVEL", "info"))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"MTLSPROXY_LOG_LEVEL: {exc}")
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
