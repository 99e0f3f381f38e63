"""The fast exchange's modules, compiled from their own source or run from it
(mtlsproxy/compiled.py): which build a process runs, and that the two builds declare the
same objects.

The behaviour of the two builds is the whole suite's to check: CI runs it compiled (Python
3.11, ``MTLSPROXY_EXPECT_COMPILED=1``) and pure (``MTLSPROXY_PURE=1`` on 3.13).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mtlsproxy import compiled

ROOT = Path(__file__).resolve().parents[2]
EXPECT = os.environ.get("MTLSPROXY_EXPECT_COMPILED", "")
PURE = os.environ.get("MTLSPROXY_PURE", "") not in ("", "0")


def built_here() -> None:
    """Skip unless this checkout's modules are built; under MTLSPROXY_EXPECT_COMPILED (CI
    built them) fail instead."""
    if compiled.COMPILED:
        return
    if EXPECT and not PURE:
        pytest.fail(f"MTLSPROXY_EXPECT_COMPILED is set but the compiled exchange is not in "
                    f"use: {compiled.WHY_PURE}")
    pytest.skip(f"the compiled exchange is not in use ({compiled.WHY_PURE}); "
                "pip install -e . with Cython and a C compiler builds it")


def is_extension(module: str) -> bool:
    return not (importlib.import_module(module).__file__ or "").endswith(".py")


# -- the two lists of modules ---------------------------------------------------------------


def test_every_compiled_module_has_its_pxd_beside_its_source() -> None:
    for module in compiled.MODULES:
        py, pxd = compiled.sources(module)
        assert py.is_file() and pxd.is_file(), module


def test_every_pxd_is_installed_with_the_package() -> None:
    """A wheel's manifest names each .pxd (compiled.sources): one left out of the package
    data makes an installed build run pure, with no error anywhere."""
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = data["tool"]["setuptools"]["package-data"]
    for module in compiled.MODULES:
        package, name = module.rsplit(".", 1)
        assert f"{name}.pxd" in package_data.get(package, []), module


# -- the declarations the compiled build reads, against the Python source ---------------------

_PXD_CLASS = re.compile(r"^cdef class (\w+)", re.M)
_PXD_FIELD = re.compile(r"^    cdef (?:public |readonly )?(?:\w+ )(.+)$")


def pxd_fields(pxd: Path) -> dict[str, set[str]]:
    """Each ``cdef class`` of a .pxd: the names of its fields."""
    classes: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in pxd.read_text().splitlines():
        head = _PXD_CLASS.match(line)
        if head:
            current = classes[head.group(1)] = set()
            continue
        field = _PXD_FIELD.match(line)
        if current is not None and field and "(" not in line:
            current.update(name.strip() for name in field.group(1).split(","))
    return classes


def py_slots(py: Path) -> dict[str, set[str]]:
    """Each class of a module that declares ``__slots__``: its slot names; each dataclass:
    its fields (the annotated names of its body)."""
    slots: dict[str, set[str]] = {}
    for node in ast.parse(py.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        if any(isinstance(d, ast.Name) and d.id == "dataclass" for d in node.decorator_list):
            slots[node.name] = {stmt.target.id for stmt in node.body
                                if isinstance(stmt, ast.AnnAssign)
                                and isinstance(stmt.target, ast.Name)}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in stmt.targets):
                slots[node.name] = set(ast.literal_eval(stmt.value))
    return slots


@pytest.mark.parametrize("module", compiled.MODULES)
def test_a_compiled_class_declares_the_fields_its_python_class_has_as_slots(
        module: str) -> None:
    """The pure class's ``__slots__`` and the extension type's fields are one list: a field
    added to one only would be an AttributeError in the other build alone."""
    py, pxd = compiled.sources(module)
    declared, slots = pxd_fields(pxd), py_slots(py)
    for name, fields in declared.items():
        assert name in slots, f"{py.name}: class {name} has no __slots__ (or fields)"
        assert fields == slots[name], (name, fields ^ slots[name])


# -- which build a process runs ---------------------------------------------------------------


def test_a_process_runs_every_compiled_module_or_none() -> None:
    kinds = {is_extension(m) for m in compiled.MODULES}
    assert kinds == {compiled.COMPILED}


def test_the_compiled_exchange_is_in_use_when_built() -> None:
    built_here()
    assert all(is_extension(m) for m in compiled.MODULES)
    assert compiled.WHY_PURE == ""


def run_probe(package_parent: Path, env_extra: dict[str, str]) -> list[str]:
    """In a fresh interpreter on ``package_parent``: WHY_PURE, then each module's file."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTLSPROXY_PURE", "PYTHONPATH")}
    env.update(env_extra, PYTHONPATH=str(package_parent), PYTHONDONTWRITEBYTECODE="1")
    probe = ("import importlib, mtlsproxy.compiled as c\n"
             "print(c.WHY_PURE or '-')\n"
             "for m in c.MODULES: print(importlib.import_module(m).__file__)\n")
    cwd = package_parent if package_parent.is_dir() else package_parent.parent
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def test_mtlsproxy_pure_makes_every_module_run_from_its_source() -> None:
    lines = run_probe(ROOT, {"MTLSPROXY_PURE": "1"})
    assert lines[0] == "MTLSPROXY_PURE is set"
    assert all(line.endswith(".py") for line in lines[1:]), lines


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of this checkout's package, built modules and manifest included."""
    built_here()
    shutil.copytree(ROOT / "mtlsproxy", tmp_path / "mtlsproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    lines = run_probe(tmp_path, {})
    assert lines[0] == "-" and not any(line.endswith(".py") for line in lines[1:]), lines
    return tmp_path


def test_a_source_edited_since_the_build_makes_every_module_run_from_its_source(
        package_copy: Path) -> None:
    pool = package_copy / "mtlsproxy" / "proxy" / "pool.py"
    pool.write_text(pool.read_text() + "\n# edited after the build\n")
    lines = run_probe(package_copy, {})
    assert lines[0].startswith("built from other sources"), lines
    assert all(line.endswith(".py") for line in lines[1:]), lines


def test_an_edited_pxd_makes_every_module_run_from_its_source(package_copy: Path) -> None:
    pxd = package_copy / "mtlsproxy" / "runtime" / "writes.pxd"
    pxd.write_text(pxd.read_text() + "\n")
    lines = run_probe(package_copy, {})
    assert all(line.endswith(".py") for line in lines[1:]), lines


def test_one_module_not_built_makes_every_module_run_from_its_source(
        package_copy: Path) -> None:
    for built in (package_copy / "mtlsproxy" / "tls").glob("bio.*.so"):
        built.unlink()
    lines = run_probe(package_copy, {})
    assert lines[0] == "not built: mtlsproxy.tls.bio", lines
    assert all(line.endswith(".py") for line in lines[1:]), lines


def test_a_build_without_its_manifest_is_not_used(package_copy: Path) -> None:
    (package_copy / "mtlsproxy" / compiled.MANIFEST).unlink()
    lines = run_probe(package_copy, {})
    assert "incomplete build" in lines[0], lines
    assert all(line.endswith(".py") for line in lines[1:]), lines


def test_a_manifest_of_another_interpreters_build_does_not_vouch_for_this_one(
        package_copy: Path) -> None:
    """Each interpreter's build writes its own manifest: one made by another Python (here:
    this one's, renamed as 3.99's) says nothing about this interpreter's modules."""
    pkg = package_copy / "mtlsproxy"
    (pkg / compiled.MANIFEST).rename(pkg / "compiled.cpython-399-x86_64-linux-gnu.so.sha256")
    lines = run_probe(package_copy, {})
    assert "incomplete build" in lines[0], lines
    assert all(line.endswith(".py") for line in lines[1:]), lines


def test_a_build_without_its_sources_runs_their_bytecode(package_copy: Path) -> None:
    """An install of bytecode only (``compileall -b``, the ``.py`` removed): the sources
    cannot vouch for the build, so the modules run from their ``.pyc``."""
    pkg = package_copy / "mtlsproxy"
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-b", str(pkg)], check=True,
                   timeout=120)
    for module in compiled.MODULES:
        py = package_copy.joinpath(*module.split(".")).with_suffix(".py")
        py.unlink()
    lines = run_probe(package_copy, {})
    assert lines[0].startswith("a source is unreadable"), lines
    assert all(line.endswith(".pyc") for line in lines[1:]), lines


@pytest.mark.parametrize("pure", ["1", "0"])
def test_the_package_imports_from_a_zip(tmp_path: Path, pure: str) -> None:
    """A zip holds no built module: the usual finders import the sources from it, with or
    without MTLSPROXY_PURE."""
    archive = tmp_path / "mtlsproxy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((ROOT / "mtlsproxy").rglob("*.py")):
            z.write(path, path.relative_to(ROOT))
    lines = run_probe(archive, {"MTLSPROXY_PURE": pure})
    assert all(line.endswith(".py") and ".zip" in line for line in lines[1:]), lines
