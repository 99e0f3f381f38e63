"""The fast exchange's classes compiled, or their Python source: which one this process runs.

setup.py compiles ``MODULES`` from these very ``.py`` files with Cython, typed by the ``.pxd``
beside each (Cython's "pure Python mode" with an augmenting .pxd, Cython's documentation,
"Pure Python Mode"): their classes become extension types whose fields are C fields and
whose calls to each other are C calls. One source, two builds: the ``.py`` is the
pure-Python path, run where no compiler was there at install, with the same behaviour (CI
runs the suite both ways). ``mtlsproxy/http/_speedups.pyx`` (http/speedups.py) is the
other compiled part.

Rules of this module:
- All or nothing. The compiled modules are imported only when every one of them is there
  for this interpreter and was built from the sources beside it: setup.py writes
  ``MANIFEST``, each source's SHA-256, after building them all (one manifest per
  interpreter: its extension suffix is in the name). Otherwise (``MTLSPROXY_PURE=1`` when
  the process starts, no compiler at install, a source edited since the build) every one
  of them is imported from its ``.py``: a compiled session with bio's Python class, or
  with an older build of it, would disagree about the types they share, and an edited
  source must never be shadowed by a build of its old text.
- ``mtlsproxy/__init__.py`` calls ``install`` before any of them can be imported. The
  source finder is installed only where a built module would otherwise be found first; it
  finds a ``.py`` or a sourceless ``.pyc`` in a directory, and leaves anything else (a zip)
  to the usual finders.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Sequence
from importlib.machinery import (
    BYTECODE_SUFFIXES,
    SOURCE_SUFFIXES,
    FileFinder,
    ModuleSpec,
    SourceFileLoader,
    SourcelessFileLoader,
)
from pathlib import Path
from types import ModuleType

# Lowest layer first: the order setup.py builds them in (each cimports those before it).
MODULES = ("mtlsproxy.runtime.writes", "mtlsproxy.runtime.series", "mtlsproxy.http.events",
           "mtlsproxy.http.checks", "mtlsproxy.http.wire", "mtlsproxy.http.llhttp_parser",
           "mtlsproxy.tls.bio",
           "mtlsproxy.proxy.upstream", "mtlsproxy.proxy.pool", "mtlsproxy.proxy.session")
# This interpreter's extension modules, and the manifest of their build (in the package's
# directory, beside them).
EXT_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
MANIFEST = f"compiled{EXT_SUFFIX}.sha256"
PACKAGE = Path(__file__).resolve().parent


def sources(module: str) -> list[Path]:
    """The files one compiled module is built from: its ``.py`` and its ``.pxd``."""
    base = PACKAGE.joinpath(*module.split(".")[1:])
    return [base.with_suffix(".py"), base.with_suffix(".pxd")]


def manifest_text() -> str:
    """What setup.py writes after a complete build: each source's SHA-256."""
    lines = []
    for module in MODULES:
        for path in sources(module):
            rel = path.relative_to(PACKAGE)
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    return "\n".join(lines) + "\n"


def _built(module: str) -> bool:
    """Built for this interpreter (not a bare ``.so`` or ``.abi3.so``: another Python's)."""
    base = PACKAGE.joinpath(*module.split(".")[1:])
    return base.with_name(base.name + EXT_SUFFIX).exists()


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
    """A meta-path finder that imports ``MODULES`` from their Python (the default finder
    takes a built extension module beside a ``.py`` first)."""

    _LOADERS = ((SourceFileLoader, SOURCE_SUFFIXES), (SourcelessFileLoader, BYTECODE_SUFFIXES))

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in MODULES or not path:
            return None
        for entry in path:
            if os.path.isdir(entry):
                spec = FileFinder(entry, *self._LOADERS).find_spec(fullname)
                if spec is not None:
                    return spec
        return None  # not in a directory (a zip): no built module there either


WHY_PURE = ""
COMPILED = False


def install() -> None:
    """Decide once, before any of ``MODULES`` is imported."""
    global WHY_PURE, COMPILED
    if any(isinstance(f, SourceFinder) for f in sys.meta_path) or COMPILED:
        return
    WHY_PURE = why_pure()
    COMPILED = not WHY_PURE
    if not COMPILED and any(_built(m) for m in MODULES):
        sys.meta_path.insert(0, SourceFinder())
