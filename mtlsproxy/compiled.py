"""The fast exchange's classes compiled, or their Python source: which one this process runs.

setup.py compiles ``MODULES`` from these very ``.py`` files with Cython, typed by the ``.pxd``
beside each (Cython's "pure Python mode", as uvloop's and aiohttp's optional parts are
built): their classes become extension types whose fields are C fields and whose calls to
each other are C calls. One source, two builds: the ``.py`` is the pure-Python path, run
where no compiler was there at install, with the same behaviour (CI runs the suite both
ways). ``mtlsproxy/http/_speedups.pyx`` (http/speedups.py) is the other compiled part.

Rules of this module:
- All or nothing. The compiled modules are imported only when every one of them is there
  and was built from the sources beside it: setup.py writes ``MANIFEST``, each source's
  SHA-256, after building them all. Otherwise (``MTLSPROXY_PURE=1`` when the process
  starts, no compiler at install, a source edited since the build) every one of them is
  imported from its ``.py``: a compiled session with bio's Python class, or with an older
  build of it, would disagree about the types they share, and an edited source must never
  be shadowed by a build of its old text.
- ``mtlsproxy/__init__.py`` calls ``install`` before any of them can be imported.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# Lowest layer first: the order setup.py builds them in (each cimports those before it).
MODULES = ("mtlsproxy.runtime.writes", "mtlsproxy.http.llhttp_parser", "mtlsproxy.tls.bio",
           "mtlsproxy.proxy.upstream", "mtlsproxy.proxy.pool", "mtlsproxy.proxy.session")
MANIFEST = "compiled.sha256"  # in the package's directory, beside the built modules
PACKAGE = Path(__file__).resolve().parent


def sources(module: str) -> list[Path]:
    """The files one compiled module is built from: its ``.py`` and its ``.pxd``."""
    base = PACKAGE.joinpath(*module.split(".")[1:])
    return [base.with_suffix(".py"), base.with_suffix(".pxd")]


def manifest_text(root: Path = PACKAGE) -> str:
    """What setup.py writes after a complete build (``root``: the source package)."""
    lines = []
    for module in MODULES:
        for path in sources(module):
            rel = path.relative_to(PACKAGE)
            lines.append(f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}")
    return "\n".join(lines) + "\n"


def _built(module: str) -> bool:
    base = PACKAGE.joinpath(*module.split(".")[1:])
    return any(base.with_name(base.name + suffix).exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def why_pure() -> str:
    """Why the compiled modules are not used ("" when they are)."""
    if os.environ.get("MTLSPROXY_PURE", "") not in ("", "0"):
        return "MTLSPROXY_PURE is set"
    missing = [m for m in MODULES if not _built(m)]
    if missing:
        return f"not built: {', '.join(missing)}"
    try:
        recorded = (PACKAGE / MANIFEST).read_text()
    except OSError:
        return f"no {MANIFEST} beside the built modules (an incomplete build)"
    try:
        current = manifest_text()
    except OSError as exc:
        return f"a source is unreadable: {exc.strerror}"
    if recorded != current:
        return "built from other sources than those beside them: rebuild (pip install)"
    return ""


class SourceFinder:
    """A meta-path finder that imports ``MODULES`` from their ``.py`` (the default finder
    would take the built extension module beside it first)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, sources(fullname)[0])


WHY_PURE = ""
COMPILED = False


def install() -> None:
    """Decide once, before any of ``MODULES`` is imported."""
    global WHY_PURE, COMPILED
    if any(isinstance(f, SourceFinder) for f in sys.meta_path) or COMPILED:
        return
    WHY_PURE = why_pure()
    COMPILED = not WHY_PURE
    if not COMPILED:
        sys.meta_path.insert(0, SourceFinder())
