"""The config file followed without SIGHUP (issue 25, item 3): a ConfigMap mounted as a
directory is updated by the kubelet with an atomic ``..data`` symlink swap; the proxy sees
it and applies it as SIGHUP would, or refuses the whole change and keeps serving."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.harness import Harness
from tests.support.tools import wait_for


class ConfigMapVolume:
    """The kubelet's layout (atomic_writer.go): ``config.yaml -> ..data/config.yaml``,
    ``..data -> ..<timestamp>``; an update writes a new timestamped directory and renames a
    new ``..data`` link over the old one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.version = 0
        directory.mkdir()
        (directory / "config.yaml").symlink_to("..data/config.yaml")

    def write(self, raw: dict[str, Any]) -> None:
        self.version += 1
        target = self.directory / f"..2026_12_04_{self.version:02d}"
        target.mkdir()
        (target / "config.yaml").write_text(yaml.safe_dump(raw))
        tmp = self.directory / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.directory / "..data")  # rename(2): atomic

    @property
    def path(self) -> Path:
        return self.directory / "config.yaml"


def routes(h: Harness, *prefixes: str) -> list[dict[str, str]]:
    return [{"path_prefix": p, "upstream": f"http://127.0.0.1:{h.echo_port}"} for p in prefixes]


def started(h: Harness, tmp_path: Path) -> tuple[ConfigMapVolume, dict[str, Any]]:
    h.start_echo()
    volume = ConfigMapVolume(tmp_path / "config")
    raw = h.config(routes=routes(h, "/a"), top={"config_watch_interval": 0.1})
    raw["parser"] = h.default_parser
    volume.write(raw)
    h.config_file = volume.path
    h.start(raw)
    return volume, raw


def reloads(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_config_reloads_total", result=result)


def test_a_configmap_update_by_symlink_swap_is_applied_without_a_signal(
        harness: Harness, tmp_path: Path) -> None:
    h = harness
    volume, raw = started(h, tmp_path)
    assert h.get("/b")[0] == 404
    raw["listeners"][0]["routes"] = routes(h, "/a", "/b")
    volume.write(raw)
    wait_for(lambda: h.get("/b")[0] == 200, timeout=10)
    assert reloads(h, "applied") == 1 and reloads(h, "failed") == 0


def test_a_change_that_cannot_apply_live_is_refused_whole_and_counted(
        harness: Harness, tmp_path: Path) -> None:
    h = harness
    volume, raw = started(h, tmp_path)
    raw["listeners"][0]["routes"] = routes(h, "/a", "/b")
    raw["listeners"][0]["address"] = "127.0.0.1:1"  # needs a restart
    volume.write(raw)
    wait_for(lambda: reloads(h, "failed") == 1, timeout=10)
    assert h.get("/a")[0] == 200 and h.get("/b")[0] == 404  # the old config serves on
    # Not tried again until the file changes again: the same bytes swapped in anew are
    # seen (ten checks' time) and left alone.
    volume.write(raw)
    time.sleep(1.0)
    assert reloads(h, "failed") == 1
    raw["listeners"][0]["address"] = "127.0.0.1:0"
    volume.write(raw)
    wait_for(lambda: h.get("/b")[0] == 200, timeout=10)


def test_a_swap_to_the_same_bytes_reloads_nothing(harness: Harness, tmp_path: Path) -> None:
    h = harness
    volume, raw = started(h, tmp_path)
    volume.write(raw)
    raw2 = dict(raw)
    raw2["listeners"] = [dict(raw["listeners"][0], routes=routes(h, "/a", "/c"))]
    volume.write(raw2)  # a real change after it, to know the watcher has looked
    wait_for(lambda: h.get("/c")[0] == 200, timeout=10)
    assert reloads(h, "applied") == 1


def test_config_watch_interval_0_leaves_reloads_to_sighup(harness: Harness,
                                                          tmp_path: Path) -> None:
    h = harness
    h.start_echo()
    volume = ConfigMapVolume(tmp_path / "config")
    raw = h.config(routes=routes(h, "/a"), top={"config_watch_interval": 0})
    raw["parser"] = h.default_parser
    volume.write(raw)
    h.config_file = volume.path
    h.start(raw)
    assert h.server is not None and h.server.config_watcher is None
