"""Instructions per keep-alive request, counted by callgrind: a stable A/B measure.

    python bench/instructions.py [--requests 2000] [--warmup 500] [--conns 10] [--keep DIR]

Why: on a shared 2-core VM the CPU time per request of ``bench/run.py`` swings +-20-30%
between rounds, which hides any change smaller than that. Callgrind counts the user-space
instructions mtlsproxy executes, the same from run to run (within ~1%), so two commits can
be compared by running this on each. It does not see kernel time (system calls): count
those with ``strace -c -f -p PID`` when a change touches I/O.

mtlsproxy runs under ``valgrind --tool=callgrind`` (installs nothing: needs valgrind, nginx
and ab from the distribution); the nginx upstream and the load generator (``ab -k``) run
natively. After ``--warmup`` requests, two runs of N and 2N requests over ``--conns`` new
connections are counted (``callgrind_control --zero`` / ``--dump``); their difference
gives instructions per keep-alive request without the handshakes, and the rest gives
instructions per connection (a full mutual-TLS handshake and its close); ``--resumed S``
adds instructions per resumed connection (``openssl s_time -reuse``). ``--top N``
prints the heaviest functions of the second run by inclusive count. Everything started is
stopped by PID.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    ab,
    free_port,
    mtlsproxy_conf,
    nginx_proxy_conf,
    nginx_upstream_conf,
    s_time,
    stop_processes,
    wait_port,
    write_dev_pki,
)


def total_instructions(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--top", type=int, default=0, help="print the N heaviest functions")
    p.add_argument("--keep", type=Path, help="copy the callgrind profile here")
    p.add_argument("--resumed", type=int, default=0, metavar="SECONDS",
                   help="also count instructions per resumed connection (openssl s_time "
                        "-reuse for SECONDS, one request per connection)")
    p.add_argument("--proxy", choices=("mtlsproxy", "nginx"), default="mtlsproxy",
                   help="count nginx's instructions instead (the same configuration as "
                        "bench/run.py's nginx, one process): the native floor to compare")
    p.add_argument("--nginx-session-cache", action="store_true",
                   help="with --proxy nginx: stateful session cache like mtlsproxy's")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "ab"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (valgrind, nginx, apache2-utils)")

    d = Path(tempfile.mkdtemp(prefix="mtlsproxy-callgrind-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pki = write_dev_pki(d / "pki").directory
        client = d / "client-combined.pem"
        client.write_bytes((pki / "client.pem").read_bytes() + (pki / "client.key").read_bytes())
        up, port, admin = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_upstream_conf(d, up))],
                                      stdout=subprocess.DEVNULL))
        wait_port(up, procs[-1])
        if args.proxy == "nginx":
            conf = nginx_proxy_conf(d, pki, up, port, pki / "truststore.pem",
                                    args.nginx_session_cache)
            # One process: the worker is the one valgrind runs and callgrind_control finds.
            conf.write_text("master_process off;\n" + conf.read_text())
            cmd = ["nginx", "-c", str(conf)]
        else:
            conf = mtlsproxy_conf(d, pki, up, port, admin, pki / "truststore.pem")
            cmd = [sys.executable, "-m", "mtlsproxy", "run", "--config", str(conf)]
        out = d / "callgrind.out"
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
            stdout=subprocess.DEVNULL, stderr=open(d / "proxy.log", "wb"))
        procs.append(proxy)
        for _ in range(1200):  # Python under valgrind starts in ~10-30 s
            if proxy.poll() is not None:
                raise SystemExit((d / "proxy.log").read_text()[-3000:])
            try:
                wait_port(port, proxy)
                break
            except SystemExit:
                time.sleep(0.5)
        ab(port, client, args.warmup, args.conns, tmp=d)
        # Two measured runs, N and 2N requests over the same number of new connections:
        # their difference is N keep-alive requests with the handshakes cancelled out.
        counts = []
        for n in (args.requests, 2 * args.requests):
            subprocess.run(["callgrind_control", "--zero", str(proxy.pid)], check=True,
                           capture_output=True)
            ab(port, client, n, args.conns, tmp=d)
            subprocess.run(["callgrind_control", "--dump", str(proxy.pid)], check=True,
                           capture_output=True)
            dumps = sorted(d.glob("callgrind.out.*"), key=lambda f: f.stat().st_mtime)
            if not dumps:
                raise SystemExit("callgrind wrote no dump")
            counts.append(total_instructions(dumps[-1]))
        per_request = (counts[1] - counts[0]) / args.requests
        per_handshake = (counts[0] - per_request * args.requests) / args.conns
        print(f"instructions per keep-alive request: {per_request:,.0f}")
        print(f"instructions per connection (full mTLS handshake + close): "
              f"{per_handshake:,.0f}")
        if args.keep:
            shutil.copy(dumps[-1], args.keep)
        if args.resumed:
            s_time(port, pki, 2, True, 1)  # warm: the session cache and the pool
            subprocess.run(["callgrind_control", "--zero", str(proxy.pid)], check=True,
                           capture_output=True)
            made, _ = s_time(port, pki, args.resumed, True, 1)
            subprocess.run(["callgrind_control", "--dump", str(proxy.pid)], check=True,
                           capture_output=True)
            dumps = sorted(d.glob("callgrind.out.*"), key=lambda f: f.stat().st_mtime)
            print(f"instructions per resumed connection (TLS 1.3, one request): "
                  f"{total_instructions(dumps[-1]) / made:,.0f} over {made} connections")
            if args.keep:
                shutil.copy(dumps[-1], args.keep.with_suffix(".resumed"))
        if args.top:
            ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dumps[-1])],
                                 capture_output=True, text=True).stdout
            print("\n".join(ann.splitlines()[:args.top + 25]))
    finally:
        stop_processes(procs, timeout=60)  # Python under valgrind drains slowly
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
