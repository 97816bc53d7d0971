"""Every RPC operation honours its time-out and says what did not answer (no board needed).

Servers here are sockets on 127.0.0.1 in this process: one that accepts and never answers (a busy
board, or not an RPC server), and a fake RPC server that answers the handshake probe and then goes
silent (a board that hangs after accepting a client). Cases that hung or aborted the process before
run in a subprocess with a time-out.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from tvm.rpc import base as rpc_base
from tvm.s_tir import meta_schedule as ms

from tvm_nested.runtime.rpc import PROBE_KEY, BoardError, connect, probe_server, tracker_summary
from tvm_nested.tuning import RPCSettings
from tvm_nested.tuning.measure import BoundedRunner


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port  # closed: nothing listens


@pytest.fixture
def hanging_board():
    """Answers the probe like a TVM RPC server (key mismatch), then never answers a real client."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()
    held = []

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                _magic, keylen = struct.unpack("<ii", rpc_base.recvall(conn, 8))
                key = rpc_base.recvall(conn, keylen).decode()
            except OSError:
                conn.close()
                continue
            if key == PROBE_KEY:
                conn.sendall(struct.pack("<i", rpc_base.RPC_CODE_MISMATCH))
                conn.close()
            else:
                held.append(conn)  # a real client: silence

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def rpc_server(tmp_path):
    """A real TVM RPC server for this machine on 127.0.0.1 (a board that runs x86 code), in its own
    process group: (port, process group id, its log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "rpc_server.log"
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*cmd, "--port-end", str(port + 1)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the RPC server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield port, server.pid, log
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and the workers serving its sessions
        server.wait()


def _python(code: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_probe_names_a_silent_port_within_the_timeout(silent_port):
    t0 = time.monotonic()
    with pytest.raises(BoardError, match=rf"board 127\.0\.0\.1:{silent_port}: RPC handshake: no answer within 1s"):
        probe_server("127.0.0.1", silent_port, 1.0)
    with pytest.raises(BoardError, match=rf"tracker 127\.0\.0\.1:{silent_port}: no answer within 1s"):
        tracker_summary("127.0.0.1", silent_port, 1.0)
    assert time.monotonic() - t0 < 5


def test_nothing_listening_is_unreachable(dead_port):
    with pytest.raises(BoardError, match=rf"board 127\.0\.0\.1:{dead_port} unreachable"):
        connect(("127.0.0.1", dead_port), timeout=2)


def test_a_board_that_hangs_after_the_probe_is_still_bounded(hanging_board):
    t0 = time.monotonic()
    with pytest.raises(BoardError, match="RPC connect: no answer within"):
        connect(("127.0.0.1", hanging_board), timeout=2)
    assert time.monotonic() - t0 < 8


_DEPLOY_AT_EXIT = """
import socket, sys
from tvm_nested.deploy import BoardError, deploy
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(8)
try:
    deploy("model.so", ("127.0.0.1", listener.getsockname()[1]), timeout=2)
except BoardError as err:
    print("BoardError:", err)
"""


def test_deploy_to_a_silent_port_exits_cleanly():
    """It raised BoardError, then aborted at exit ('terminate called without an active exception'):
    a thread was left blocked inside TVM's connect when the listener closed."""
    out = _python(_DEPLOY_AT_EXIT, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "BoardError: board 127.0.0.1:" in out.stdout and "no answer within 2s" in out.stdout
    assert "terminate called" not in out.stderr


_TUNE = """
import sys, time, torch, tvm_nested
from torch import nn
from tvm_nested.authoring import nn as tnn
from tvm_nested.tuning import RPCSettings
model = tnn.nest(nn.Sequential(nn.Linear(8, 4)).eval(), {"0": (0.5, 0.25)}).eval()
mod = tvm_nested.from_torch(model, (torch.ones(1, 8),), {"level": torch.tensor(0)})
t0 = time.monotonic()
try:
    tvm_nested.tune(mod, "llvm", sys.argv[1], max_trials=2, progress=False,
                    runner=RPCSettings(host="127.0.0.1", port=int(sys.argv[2]), session_timeout=3))
except Exception as err:
    print(f"{type(err).__name__} after {time.monotonic() - t0:.0f}s: {err}")
"""


@pytest.mark.parametrize("board", ["silent_port", "dead_port", "hanging_board"])
def test_tuning_on_a_board_that_does_not_answer_stops_naming_it(board, request, tmp_path):
    """It waited for ever (killed at 300 s), or said only 'RPCRunner: An exception occurred'."""
    port = request.getfixturevalue(board)
    out = _python(_TUNE, tmp_path / "log", port, timeout=240)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    line = out.stdout.strip().splitlines()[-1]
    assert f"board 127.0.0.1:{port}" in line, line
    want = "unreachable" if board == "dead_port" else "no answer within 3s"
    assert want in line, line


class _NeverDone:
    def done(self):
        return False

    def result(self):  # pragma: no cover - never reached: the bounded runner stops waiting first
        raise AssertionError("waited on a stalled measurement")


class _StuckRunner:
    """Stands in for MetaSchedule's RPCRunner: its measurements never come back."""

    def __init__(self):
        self.shut = False
        self.pool = self

    def run(self, inputs):
        return [_NeverDone() for _ in inputs]

    def shutdown(self, wait=True):
        self.shut = True


def test_bounded_runner_stops_on_the_first_stalled_measurement():
    inner = _StuckRunner()
    runner = BoundedRunner(inner, 1.0, "board 10.0.0.7:9090")
    t0 = time.monotonic()
    job = ms.runner.RunnerInput("candidate.so", "cpu", [])
    (future,) = runner.run([job])
    result = future.result()
    assert "board 10.0.0.7:9090 did not answer within 1s" in result.error_msg and result.run_secs is None
    assert inner.shut and time.monotonic() - t0 < 3  # the worker blocked on the board is killed
    later = runner.run([job, job])  # every later candidate fails at once
    assert all("did not answer" in f.result().error_msg for f in later)


def test_rpc_settings_check_the_timeout():
    with pytest.raises(ValueError, match="session_timeout"):
        RPCSettings(host="127.0.0.1", port=9090, session_timeout=0)


_FREEZE = """
import os, signal, sys, time
import numpy as np, tvm
from tvm_nested.runtime.rpc import abandon, connect
session = connect(("127.0.0.1", int(sys.argv[1])), timeout=30, session_timeout=2)
held = [tvm.runtime.tensor(np.ones(4, "float32"), session.cpu()) for _ in range(5)]
os.killpg(int(sys.argv[2]), signal.SIGSTOP)  # the board hangs in the middle of the session
t0 = time.monotonic()
try:
    held[0].numpy()
except Exception as err:
    print(f"failed after {time.monotonic() - t0:.1f}s")
    abandon(session)
t0 = time.monotonic()
del held, session
print(f"dropped after {time.monotonic() - t0:.1f}s")
"""


def test_a_board_that_freezes_in_a_call_fails_within_the_session_timeout(rpc_server):
    """TVM's client waits for every answer without a time-out: a board that hung mid-session (not
    at connect) blocked the caller for ever. With session_timeout it fails after that much
    silence, and an abandoned session's remote objects go without waiting once more each."""
    port, group, _ = rpc_server
    try:
        out = _python(_FREEZE, port, group, timeout=120)
    finally:
        os.killpg(group, signal.SIGCONT)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    failed, dropped = (float(line.split()[-1].rstrip("s")) for line in out.stdout.split("\n")[:2])
    assert 2 <= failed < 8 and dropped < 1, out.stdout


def test_tuning_several_nested_kernels_on_a_board(rpc_server, tmp_path):
    """Candidates of the second kernel were uploaded under the names of the first one's, which the
    board had loaded: its server died in dlsym and tuning failed ('code=kShutdown'). One session
    per candidate also keeps the board's session_timeout a bound on one measurement."""
    import torch
    from torch import nn

    import tvm_nested
    from tvm_nested.authoring import nn as tnn

    port, _, log = rpc_server
    model = tnn.nest(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).eval(), {"0": (0.5, 0.25), "1": (0.5, 0.25)})
    mod = tvm_nested.from_torch(model.eval(), (torch.ones(1, 16),), {"level": torch.tensor(0)})
    runner = RPCSettings(host="127.0.0.1", port=port, session_timeout=30)
    report = tvm_nested.tune(mod, "llvm", tmp_path / "log", max_trials=3, progress=False, runner=runner)
    assert len(report.nested) == 2, str(report)
    for kernel in report.nested:
        assert kernel.trials == 3 and len(kernel.level_seconds) == 2 and all(s > 0 for s in kernel.level_seconds)
    text = log.read_text()
    assert "Segfault" not in text and text.count("connected from") == 6  # a session per candidate
