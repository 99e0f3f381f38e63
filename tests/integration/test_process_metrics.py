"""The standard process metrics and the build info on /metrics (issue 22, item 8)."""

from __future__ import annotations

import platform
import ssl
import urllib.request

from mtlsproxy import __version__
from tests.support.harness import Harness


def scrape(h: Harness) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{h.admin_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_metrics_carry_the_process_and_gc_collectors(harness: Harness) -> None:
    harness.start()
    text = scrape(harness)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds",
                 "python_gc_objects_collected_total", "python_info"):
        assert f"\n{name}" in text, name


def test_build_info_names_the_version_python_and_openssl(harness: Harness) -> None:
    harness.start()
    labels = {"version": __version__, "python": platform.python_version(),
              "openssl": ssl.OPENSSL_VERSION}
    assert harness.registry.get_sample_value("mtlsproxy_build_info", labels) == 1.0
    assert "mtlsproxy_build_info{" in scrape(harness)
