"""The optional compiled part of mtlsproxy (``mtlsproxy/http/_speedups.pyx``).

Everything else is in pyproject.toml. The extension is built when Cython and a C compiler
are there; when either is missing, or ``MTLSPROXY_PURE=1`` is set for the build, the
install goes on without it and mtlsproxy runs on its pure-Python path, which behaves the
same (mtlsproxy/http/speedups.py). ``pip install .`` is one command either way.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install: the fallback is complete."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler: DistutilsPlatformError etc.
            self._skip(exc)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - compile or link errors
            self._skip(exc)

    @staticmethod
    def _skip(exc: BaseException) -> None:
        print(f"mtlsproxy: compiled speedups not built ({exc}); using the pure-Python "
              "path", file=sys.stderr)


def extensions() -> list[object]:
    if os.environ.get("MTLSPROXY_PURE", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("mtlsproxy: Cython not available; using the pure-Python path", file=sys.stderr)
        return []
    return list(cythonize(["mtlsproxy/http/_speedups.pyx"], quiet=True))


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
