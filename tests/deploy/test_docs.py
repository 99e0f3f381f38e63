"""The README stays a front door whose example works, and no link in the docs is broken."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mtlsproxy.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "README.md"]


def test_the_readme_is_a_front_door_of_under_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    example = text.split("## A short example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    for name in ("server.pem", "server.key"):  # files are only checked to exist
        (tmp_path / name).write_text("")
    config = parse_config(yaml.safe_load(example), tmp_path)
    assert [r.path_prefix for r in config.listeners[0].routes] == ["/payments", "/"]


def test_every_relative_link_of_the_docs_points_to_a_file() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken
