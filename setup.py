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

import os
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# mtlsproxy/compiled.py's MODULES (not imported from there: the build must not import the
# package it builds); tests/unit/test_compiled_exchange.py checks that the two agree.
EXCHANGE = ("mtlsproxy.runtime.writes", "mtlsproxy.http.llhttp_parser", "mtlsproxy.tls.bio",
            "mtlsproxy.proxy.upstream", "mtlsproxy.proxy.pool", "mtlsproxy.proxy.session")
# One per interpreter (its extension suffix in the name): a build for another Python
# neither vouches for this one's modules nor removes this one's manifest.
MANIFEST = f"compiled{sysconfig.get_config_var('EXT_SUFFIX')}.sha256"


def manifest_text() -> str:
    """mtlsproxy/compiled.py's ``manifest_text``, over the sources being built."""
    import hashlib

    lines = []
    for module in EXCHANGE:
        rel = Path(*module.split(".")[1:])
        for path in (rel.with_suffix(".py"), rel.with_suffix(".pxd")):
            digest = hashlib.sha256((Path("mtlsproxy") / path).read_bytes()).hexdigest()
            lines.append(f"{digest}  {path}")
    return "\n".join(lines) + "\n"


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
        manifest = Path(self.get_ext_fullpath(EXCHANGE[0])).parents[1] / MANIFEST
        built = {ext.name for ext in self.extensions}
        if built >= set(EXCHANGE) and not set(self._failed) & {"*", *EXCHANGE}:
            manifest.write_text(manifest_text())
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
