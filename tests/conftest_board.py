"""pytest plugin: the emulated aarch64 board (``tvm_nested.board``) as session fixtures.

Registered from ``tests/conftest.py``. Fixtures:

* ``board_env``: the built board (``ensure_board``). Gated by ``board_available``, a probe that
  never raises: a machine that has neither the host tools (qemu-user, the aarch64 cross gcc) nor
  root + apt-get to install them, or a cold cache and no route to the Debian and PyPI registries,
  skips with the reason. Where the probe passes, every build error fails the tests.
* ``board_server``: one emulated board running TVM's stock RPC server for the whole session.
* ``board_tracker``: a TVM tracker on the host and a board server registered with it under
  ``BOARD_KEY`` ("tvm-nested-board").

A server registered with a tracker only accepts clients that the tracker sent (TVM gives them a
random match key), so the direct and the tracker fixtures are two servers of the same board; both
start together the first time either fixture is used, and stop at the end of the session.
With CI=true the board is cached in the repo's ``.cache/board`` (git-ignored) so CI reuses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvm_nested.board import (
    BOARD_KEY,
    Board,
    BoardEnv,
    BoardProcess,
    board_available,
    ensure_board,
)

REPO = Path(__file__).resolve().parents[1]


def board_cache_dir() -> Path | None:
    """The repo's .cache/board on CI, else None (= the user cache, ensure_board's default)."""
    return REPO / ".cache" / "board" if os.environ.get("CI", "").lower() == "true" else None


@dataclass(frozen=True)
class BoardTracker:
    address: tuple[str, int]  # the tracker, for rpc.connect_tracker / board.connect(tracker=)
    key: str  # the key the board registered
    tracker: BoardProcess
    server: BoardProcess


@dataclass(frozen=True)
class _Services:
    server: BoardProcess
    tracker: BoardTracker
    start_s: float


@pytest.fixture(scope="session")
def board_env() -> BoardEnv:
    cache = board_cache_dir()
    ok, why = board_available(cache)
    if not ok:
        pytest.skip(f"emulated aarch64 board unavailable: {why}")
    return ensure_board(cache, install_tools=True)


@pytest.fixture(scope="session")
def _board_services(board_env):
    t0 = time.perf_counter()
    with Board(board_env) as board:
        # all three start at once; the registered server retries until the tracker is up
        tracker = board.start_tracker(wait=False)
        direct = board.start_server(wait=False)
        registered = board.start_server(tracker=tracker.address, key=BOARD_KEY, wait=False)
        for bp in (tracker, direct, registered):
            board.wait_ready(bp)
        yield _Services(
            direct,
            BoardTracker(tracker.address, BOARD_KEY, tracker, registered),
            time.perf_counter() - t0,
        )


@pytest.fixture(scope="session")
def board_server(_board_services) -> BoardProcess:
    """The board's RPC server (stock ``tvm.exec.rpc_server`` under qemu); ``.address``."""
    return _board_services.server


@pytest.fixture(scope="session")
def board_tracker(_board_services) -> BoardTracker:
    """A host tracker with the board registered as ``.key``; ``.address`` is the tracker's."""
    return _board_services.tracker
