"""The fixtures every test folder shares; the harness itself is tests/support/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mtlsproxy.dev.echo import start_echo
from mtlsproxy.dev.pki import DevPKI, write_dev_pki
from tests.support.harness import Harness
from tests.support.loops import LoopThread
from tests.support.pki import PKI, make_pki
from tests.support.tools import require_tool


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness_for(pki: PKI, tmp_path: Path) -> Iterator[Callable[[str], Harness]]:
    made: list[tuple[Harness, LoopThread]] = []

    def make(kind: str = "uvloop") -> Harness:
        loop = LoopThread(kind)
        h = Harness(loop, pki, tmp_path)
        made.append((h, loop))
        return h
    yield make
    for h, loop in made:
        h.stop()
        loop.stop()
    escaped = [e for _, loop in made for e in loop.unhandled()]
    if escaped:
        pytest.fail("exceptions escaped to the event loop: " + "; ".join(escaped))


@pytest.fixture
def harness(harness_for: Callable[[str], Harness], loop_kind: str) -> Harness:
    """A harness on each event loop kind (socket-level tests run on both)."""
    return harness_for(loop_kind)


@pytest.fixture(params=["httptools", "h11"])
def parser_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def unstarted(harness_for: Callable[[str], Harness], parser_kind: str,
              loop_kind: str) -> Harness:
    """A harness on each loop kind whose proxy will use each parser; not started yet."""
    h = harness_for(loop_kind)
    h.default_parser = parser_kind
    return h


@pytest.fixture
def proxy(harness_for: Callable[[str], Harness], parser_kind: str, loop_kind: str) -> Harness:
    """A started proxy with the default config, on each parser and each loop kind."""
    h = harness_for(loop_kind)
    h.start(parser=parser_kind)
    return h


# -- the CLI process tests (test_process.py, test_workers.py) ------------------------------

@pytest.fixture(scope="module")
def devpki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    """The PKI ``mtlsproxy dev-pki`` writes, as users get it."""
    return write_dev_pki(tmp_path_factory.mktemp("devpki"))


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[LoopThread, int]]:
    """An echo upstream on its own loop thread: (loop, port)."""
    loop = LoopThread("uvloop")
    echo = loop.run(start_echo())
    yield loop, int(echo.sockets[0].getsockname()[1])
    loop.call(echo.close)
    loop.stop()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs_tool(name, package)``: see tests/support/tools.require_tool."""
    for mark in item.iter_markers("needs_tool"):
        require_tool(*mark.args)
