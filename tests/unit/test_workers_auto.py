"""``workers: auto`` against fake cgroup files (issue 25, item 5): the cores the process may
use, capped by its cgroup's CPU quota rounded up, at least 1; cgroup v2 and v1."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlsproxy.config import cpu_count


def v2(tmp_path: Path, cpu_max: str | None, path: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (root / path.lstrip("/") / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def v1(tmp_path: Path, quota: int, period: int = 100000) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    base = root / "cpu,cpuacct" / "kubepods" / "pod1" / "c1"
    base.mkdir(parents=True)
    (base / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (base / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:memory:/kubepods/pod1/c1\n11:cpu,cpuacct:/kubepods/pod1/c1\n")
    return root, proc


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("100000 100000", 1),  # limits.cpu: 1 on a 64-core node
    ("150000 100000", 2),  # 1.5 CPUs: rounded up
    ("50000 100000", 1),  # half a CPU: at least one worker
    ("400000 100000", 4),
    ("max 100000", 64),  # no limit: the cores
])
def test_cgroup_v2_cpu_max_caps_the_workers(tmp_path: Path, cpu_max: str,
                                            expected: int) -> None:
    root, proc = v2(tmp_path, cpu_max)
    assert cpu_count(root, proc, affinity=64) == expected


def test_a_quota_above_the_cores_leaves_the_cores(tmp_path: Path) -> None:
    root, proc = v2(tmp_path, "800000 100000")
    assert cpu_count(root, proc, affinity=2) == 2


def test_the_processs_own_cgroup_directory_is_read_without_a_namespace(
        tmp_path: Path) -> None:
    root, proc = v2(tmp_path, "200000 100000", path="/kubepods.slice/pod1/c1")
    assert cpu_count(root, proc, affinity=64) == 2


@pytest.mark.parametrize(("quota", "expected"), [(250000, 3), (-1, 64), (100000, 1)])
def test_cgroup_v1_cfs_quota_caps_the_workers(tmp_path: Path, quota: int,
                                              expected: int) -> None:
    root, proc = v1(tmp_path, quota)
    assert cpu_count(root, proc, affinity=64) == expected


def test_no_cgroup_files_means_the_cores(tmp_path: Path) -> None:
    assert cpu_count(tmp_path / "none", tmp_path / "none-either", affinity=8) == 8
