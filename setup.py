"""The optional compiled parts of mtlsproxy.

Everything else is in pyproject.toml. Two parts, built when Cython and a C compiler are
there: ``mtlsproxy/http/_speedups.pyx`` (the head split and rewrite, http/speedups.py), and
the fast exchange's modules (mtlsproxy/compiled.py's ``MODULES``) compiled from their own
``.py`` with the types of the ``.pxd`` beside each. When either tool is missing, a compile
fails, or ``MTLSPROXY_PURE=1`` is set for the build, the install goes on without them and
mtlsproxy runs on its pure-Python path, which behaves the same. ``pip install .`` is one
command either way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _compiled() -> ModuleType:
    """mtlsproxy/compiled.py, loaded by its path: its MODULES, MANIFEST and manifest_text()
    are what is built and vouched for (importing the package would import what is being
    built; compiled.py needs only the standard library)."""
    path = Path(__file__).resolve().parent / "mtlsproxy" / "compiled.py"
    spec = importlib.util.spec_from_file_location("_mtlsproxy_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPILED = _compiled()
EXCHANGE: tuple[str, ...] = COMPILED.MODULES


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install: the fallback is complete."""

    def run(self) -> None:
        self._failed: list[str] = []
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler: DistutilsPlatformError etc.
            self._skip(exc)
            self._failed.append("*")
        # The fast exchange's modules are used all or nothing (mtlsproxy/compiled.py): the
        # manifest says every one was built, from which sources. (A failed _speedups is
        # http/speedups.py's business, not theirs.)
        # Beside the built modules: the package's directory in the build.
        manifest = Path(self.get_ext_fullpath("mtlsproxy.compiled")).parent / COMPILED.MANIFEST
        built = {ext.name for ext in self.extensions}
        if built >= set(EXCHANGE) and not set(self._failed) & {"*", *EXCHANGE}:
            manifest.write_text(COMPILED.manifest_text())
        elif manifest.exists():
            manifest.unlink()

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - compile or link errors
            self._skip(exc)
            self._failed.append(getattr(ext, "name", "?"))

    @staticmethod
    def _skip(exc: BaseException) -> None:
        print(f"mtlsproxy: a compiled part not built ({exc}); using its pure-Python "
              "path", file=sys.stderr)


def extensions() -> list[object]:
    if os.environ.get("MTLSPROXY_PURE", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("mtlsproxy: Cython not available; using the pure-Python path", file=sys.stderr)
        return []
    # Cython's own errors (a source it cannot translate) are not install failures either:
    # each part falls back on its own.
    try:
        speedups = cythonize(["mtlsproxy/http/_speedups.pyx"], quiet=True)
    except Exception as exc:  # noqa: BLE001 - Cython.Compiler.Errors.CompileError etc.
        OptionalBuildExt._skip(exc)
        speedups = []
    try:
        # Pure Python mode: the types come from the .pxd files alone, never from
        # annotations (an annotation ``data: bytes`` would make Cython refuse a bytearray
        # the Python source accepts). nonecheck: a None where a .pxd declares a type
        # raises as the Python source would, instead of reading through a null pointer.
        exchange = cythonize(
            [str(Path(*m.split(".")).with_suffix(".py")) for m in EXCHANGE], quiet=True,
            compiler_directives={"annotation_typing": False, "language_level": 3,
                                 "nonecheck": True})
    except Exception as exc:  # noqa: BLE001
        OptionalBuildExt._skip(exc)
        exchange = []
    return [*speedups, *exchange]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
