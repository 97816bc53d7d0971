"""pytest plugin: the emulated aarch64 board (``tvm_nested.deploy.board``) as session fixtures.

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
start together the first time either fixture is used, and stop at the end of the session,
when the teardown checks that no board process or port is left.
With CI=true the board is cached in the repo's ``.cache/board`` (git-ignored) so CI reuses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvm_nested.deploy.board import (
    BOARD_KEY,
    Board,
    BoardEnv,
    BoardProcess,
    board_available,
    ensure_board,
    is_listening,
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


@pytest.fixture(scope="session")
def board_env() -> BoardEnv:
    cache = board_cache_dir()
    ok, why = board_available(cache)
    if not ok:
        pytest.skip(f"emulated aarch64 board unavailable: {why}")
    return ensure_board(cache, install_tools=True)


@pytest.fixture(scope="session")
def _board_services(board_env):
    board = Board(board_env)
    try:
        # All three start at once (the registered server retries until the tracker is up).
        # The direct one is TVM's stock server (launcher + PopenWorker: the faithful one); the
        # registered one is the in-process variant, same protocol, one emulated tvm import fewer.
        tracker = board.start_tracker(wait=False)
        direct = board.start_server(wait=False)
        registered = board.start_server(tracker=tracker.address, key=BOARD_KEY, wait=False, inproc=True)
        for bp in (tracker, direct, registered):
            board.wait_ready(bp)
        yield _Services(
            direct,
            BoardTracker(tracker.address, BOARD_KEY, tracker, registered),
        )
        procs = list(board.procs)
        pids = [pid for bp in procs for pid in bp.pids()]
    finally:
        board.stop()
    # the real qemu processes (stock server = launcher + PopenWorker) must all be gone
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and [p for p in pids if not _gone(p)]:
        time.sleep(0.1)
    left = [p for p in pids if not _gone(p)] + [bp.address for bp in procs if is_listening(*bp.address)]
    assert not left, f"board processes or ports left after stop(): {left}"


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session")
def board_server(_board_services) -> BoardProcess:
    """The board's RPC server (stock ``tvm.exec.rpc_server`` under qemu); ``.address``."""
    return _board_services.server


@pytest.fixture(scope="session")
def board_tracker(_board_services) -> BoardTracker:
    """A host tracker with the board registered as ``.key``; ``.address`` is the tracker's."""
    return _board_services.tracker
