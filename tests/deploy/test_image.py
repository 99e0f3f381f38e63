"""The image's dependencies (issue 25, item 6): pinned with hashes in requirements.lock,
which covers every runtime dependency of pyproject.toml at a version its minimum admits;
the Dockerfile installs the lock with --require-hashes and leaves no wheel in a layer."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, str]:
    """name -> version of every requirement in the lock (each must carry hashes)."""
    text = (ROOT / "requirements.lock").read_text()
    out: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text.strip()):
        if entry.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\]+)", entry)
        assert m, entry[:80]
        assert "--hash=sha256:" in entry, f"{m.group(1)} has no hash"
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def minimums() -> dict[str, tuple[int, ...]]:
    """name -> minimum version of every runtime dependency in pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[[a-z0-9,-]+\])?>=([0-9.]+)", dep)
        assert m, f"{dep}: every dependency states a minimum"
        out[m.group(1).lower().replace("_", "-")] = version(m.group(2))
    return out


def test_the_lock_pins_every_runtime_dependency_with_hashes_above_its_minimum() -> None:
    pins = locked()
    for name, minimum in minimums().items():
        assert name in pins, f"{name} is not in requirements.lock"
        assert version(pins[name]) >= minimum, (name, pins[name], minimum)


def test_minimums_are_past_known_vulnerabilities() -> None:
    minimum = minimums()
    assert minimum["h11"] >= (0, 16)  # CVE-2025-43859: chunked-body request smuggling
    assert minimum["cryptography"] >= (44, 0, 1)  # CVE-2024-26130, CVE-2024-12797
    assert minimum["h2"] >= (4, 1)  # CONTINUATION frames bounded
    assert minimum["pyjwt"] >= (2, 10, 1)  # CVE-2024-53861: issuer partial match


def test_the_image_installs_the_lock_with_hashes_and_keeps_no_wheel_layer() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r /tmp/requirements.lock" in text
    assert "--mount=type=bind,source=requirements.lock" in text
    assert "--mount=type=bind,from=build,source=/wheels" in text
    assert "COPY --from=build" not in text  # a COPY'd wheel stays in its layer for good
    runtime = text.split("\nFROM ")[-1]
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", runtime)
