"""Deploy to the emulated aarch64 board over TVM RPC: cross-compile on the host, run on the board.

Uses the fixtures of tests/conftest_board.py. Emulated run times are not performance numbers.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import psutil
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.support import cc  # 0.27: tvm.contrib.cc moved to tvm.support.cc

from tvm_nested.deploy import board as tb
from tvm_nested.deploy import connect

pytestmark = pytest.mark.board

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
ELF_MACHINE_AARCH64 = 183


@I.ir_module
class MatmulRelu:
    @R.function
    def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 32), "float32")) -> R.Tensor((8, 32), "float32"):
        with R.dataflow():
            y = R.nn.relu(R.matmul(x, w))
            R.output(y)
        return y


@pytest.fixture(scope="module")
def matmul_relu_so(tmp_path_factory, aarch64_cc):
    """MatmulRelu cross-compiled for aarch64 (NEON) into a shared library."""
    ex = tvm.compile(MatmulRelu, target=tvm.target.Target(TARGET))
    path = tmp_path_factory.mktemp("board") / "matmul_relu_aarch64.so"
    ex.export_library(str(path), fcompile=cc.cross_compiler(aarch64_cc))
    assert int.from_bytes(path.read_bytes()[18:20], "little") == ELF_MACHINE_AARCH64
    return path


def _open_session(via, request):
    if via == "direct":
        return connect(request.getfixturevalue("board_server").address, session_timeout=120)
    trk = request.getfixturevalue("board_tracker")
    return connect(tracker=trk.address, key=trk.key, session_timeout=120)


@pytest.mark.parametrize("via", ["direct", "tracker"])
def test_cross_compiled_matmul_relu_runs_on_board(via, request, matmul_relu_so):
    remote = _open_session(via, request)
    # the board's own TVM says aarch64: the code really runs emulated, not on the host
    assert remote.get_function("target.llvm_get_system_triple")().startswith("aarch64")
    remote.upload(str(matmul_relu_so))
    rlib = remote.load_module(matmul_relu_so.name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64), dtype=np.float32)
    w = rng.standard_normal((64, 32), dtype=np.float32)
    out = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()
    np.testing.assert_allclose(out, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("via", ["direct", "tracker"])
def test_unreachable_board_fails_fast(via):
    dead = ("127.0.0.1", tb.free_port("127.0.0.1", 20000, 21000))  # nobody listens there
    kw = {"rpc": dead} if via == "direct" else {"tracker": dead, "key": tb.BOARD_KEY}
    t0 = time.monotonic()
    with pytest.raises(tb.BoardError, match=f"127.0.0.1:{dead[1]} unreachable"):
        connect(**kw, timeout=5)
    assert time.monotonic() - t0 < 10


def test_tracker_without_the_key_fails_fast(board_tracker):
    t0 = time.monotonic()
    with pytest.raises(tb.BoardError, match="no free server with key 'no-such-board'"):
        connect(tracker=board_tracker.address, key="no-such-board", timeout=3)
    assert time.monotonic() - t0 < 10


# -- process handling, with a stand-in for the board's python (no qemu: these take a second) ----

FAKE_SERVER = """
import socket, subprocess, sys, time
if sys.argv[1:2] == ["--listen"]:  # the child: the real listener, like TVM's PopenWorker
    s = socket.socket()
    s.bind(("127.0.0.1", int(sys.argv[2])))
    s.listen()
    print(f"bind to 127.0.0.1:{sys.argv[2]}", flush=True)
    time.sleep(600)
argv = sys.argv[1:]
if "--crash" in argv:
    print("boom: no board here", flush=True)
    sys.exit(3)
if "--hang" in argv:
    time.sleep(600)
port = argv[argv.index("--port") + 1]
subprocess.Popen([sys.executable, __file__, "--listen", port]).wait()
"""


@pytest.fixture
def fake_env(tmp_path):
    """A BoardEnv whose "board python" is a host script that mimics the RPC server's processes."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    wrapper = tmp_path / "board-python"
    extra = tmp_path / "extra-args"
    extra.write_text("")
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@" $(cat {extra})\n')
    wrapper.chmod(0o755)
    env = tb.BoardEnv(tmp_path, tmp_path, wrapper, {})
    return env, extra


def _gone(pid) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_kills_the_whole_process_group(fake_env):
    env, _ = fake_env
    with tb.Board(env) as board:
        server = board.start_server(port=21000, port_end=21100)
        pids = server.pids()
        assert len(pids) == 2  # launcher + listener child: killing only the launcher orphans it
        assert tb.is_listening(*server.address)
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if not _gone(p)] == []
    assert not tb.is_listening(*server.address)


def test_server_that_dies_reports_its_log(fake_env):
    env, extra = fake_env
    extra.write_text("--crash")
    with tb.Board(env) as board, pytest.raises(tb.BoardError, match=r"(?s)exited with code 3.*boom"):
        board.start_server(port=21000, port_end=21100)


def test_server_that_never_listens_times_out(fake_env):
    env, extra = fake_env
    extra.write_text("--hang")
    with tb.Board(env, start_timeout=1) as board:
        with pytest.raises(tb.BoardError, match="not listening after 1s"):
            board.start_server(port=21000, port_end=21100)
        assert board.running == []  # the hung process was killed
