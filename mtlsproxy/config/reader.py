"""Walking a decoded YAML document while recording every problem with its key path.

Rules of this module (shared by every reader in config/):
- Every problem is collected, not just the first, and each names its key path
  (``listeners[0].tls.certificates[0].key_file: file not found: ...``), like ghostunnel's
  validators.
- Unknown keys are errors: a typo must never silently fall back to a default.
- Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Reader:
    """Walks a YAML mapping, recording problems with their key paths."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(f"{path}.{key}" if path else str(key),
                             f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def get(self, data: dict[str, Any], key: str, path: str, kind: type[T] | tuple[type, ...],
            default: T, check: Callable[[Any], str | None] | None = None) -> T:
        where = f"{path}.{key}" if path else key
        if key not in data or data[key] is None:
            return default
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.problem(where, f"must be {kind_name(kind)}, got bool")
            return default
        if not isinstance(value, kind):
            self.problem(where, f"must be {kind_name(kind)}, got {type(value).__name__}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(where, message)
                return default
        return value  # type: ignore[return-value]

    def required(self, data: dict[str, Any], key: str, path: str) -> bool:
        if key not in data or data[key] in (None, ""):
            self.problem(f"{path}.{key}" if path else key, "required")
            return False
        return True

    def file(self, data: dict[str, Any], key: str, path: str) -> Path:
        if not self.required(data, key, path):
            return Path()
        raw = data[key]
        if not isinstance(raw, str):
            self.problem(f"{path}.{key}", "must be a string path")
            return Path()
        resolved = self.resolve(raw)
        if not resolved.is_file():
            self.problem(f"{path}.{key}", f"file not found: {resolved}")
        return resolved

    def resolve(self, raw: str) -> Path:
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"
