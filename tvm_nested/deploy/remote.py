"""deploy: run a compiled nested module on a board over TVM RPC.

    lib = tvm_nested.build(mod, "rpi4")                          # cross-compiled for the board's CPU
    rt = tvm_nested.deploy.deploy(lib, "192.168.1.42:9090")      # or tracker=("10.0.0.2", 9190), key="rpi4"
    outs = rt.run(x, level=2)                                     # runs on the board
    table = tvm_nested.deploy.time_levels(rt, x)                  # every level timed ON the board

``deploy`` exports the module as a shared library (cross-compiled: the toolchain is found from the
target, or ``cc=``), uploads it, loads it in the board's TVM runtime and returns the same
``NestedRuntime`` as ``tvm_nested.load`` does locally, over the remote module and the board's CPU.
The board needs only ``python -m tvm.exec.rpc_server`` from the same TVM version (README).

A TVM RPC server serves one client at a time: keep one runtime per board, and drop it (``del rt``)
before another client (``tvm-nested tune`` with the board's runner, another ``deploy``) needs it.
``connect`` (``runtime/rpc.py``) never waits longer than its ``timeout`` (unreachable board, a port
that does not answer the RPC handshake, a busy board, no free server with the key at the tracker):
it raises ``BoardError`` saying which.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from ..build import NestedModule
from ..runtime import BoardError, NestedRuntime, check_library, connect, parse_address
from ..target import is_cross

DEFAULT_TARGET = "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"  # any 64-bit ARM board with NEON
_EMULATED_MARK = "/.board-manifest.json"  # qemu -L maps it into the emulated board's sysroot


def is_emulated(session) -> bool:
    """True when the board is ``tvm_nested.board``'s emulated one (qemu-user): timings there are
    not performance numbers."""
    try:
        return bool(session.download(_EMULATED_MARK))
    except Exception:
        return False


def upload(session, module, *, cc: str | None = None):
    """Put ``module`` on the board and load it there; returns the remote runtime module.

    ``module``: a ``NestedModule`` (exported here, cross-compiled for its target) or the path of a
    shared library already built for the board (``tvm-nested compile --target ...``).
    """
    with tempfile.TemporaryDirectory(prefix="tvm_nested_deploy_") as tmp:
        if isinstance(module, NestedModule):
            path = module.export_library(os.path.join(tmp, "nested_model.so"), cc=cc)
        else:
            path = os.fspath(module)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no compiled module at {path!r}")
            if not path.endswith(".so"):
                raise ValueError(f"{path!r}: expected a shared library (.so) built for the board")
            # the board's loader must not see a truncated file or one for another CPU either
            check_library(path, expect_machine=(board_triple(session) or "").split("-")[0])
        name = f"tvm_nested_{os.getpid()}_{Path(path).name}"
        session.upload(path, name)
    return session.load_module(name)


def deploy(
    module,
    rpc=None,
    *,
    tracker=None,
    key: str | None = None,
    timeout: float = 30.0,
    session_timeout: float = 0,
    cc: str | None = None,
    num_threads: int | None = None,
    session=None,
) -> NestedRuntime:
    """Upload ``module`` (a ``NestedModule`` or a ``.so`` path) to a board and load it there.

    Returns the same ``NestedRuntime`` as ``tvm_nested.load`` gives locally: ``run(*inputs, level=k)``
    runs on the board and returns NumPy arrays, ``time(...)`` times on the board. Give ``rpc=
    "host:port"``, or ``tracker="host:port"`` with ``key=``, or an open ``session`` (``connect``).
    ``num_threads``: the board's TVM thread pool size (default: the board's own choice).
    """
    if isinstance(module, NestedModule) and module.target.kind.name != "llvm":
        raise ValueError(f"deploy runs CPU (llvm) modules on a board; this one is for {module.target.kind.name}")
    if isinstance(module, NestedModule) and not is_cross(module.target):
        warnings.warn(
            f"this module is built for this machine's CPU ({module.target.attrs.get('mtriple', '')}), "
            "not for a board: build it with the board's target (e.g. 'rpi4' or "
            f"{DEFAULT_TARGET!r})",
            stacklevel=2,
        )
    if num_threads is not None and int(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
    own = session is None
    if own:
        session = connect(rpc, tracker=tracker, key=key, timeout=timeout, session_timeout=session_timeout)
    try:
        if num_threads is not None:
            session.get_function("runtime.config_threadpool")(0, int(num_threads))
        if isinstance(module, NestedModule):
            _check_arch(session, str(module.target.attrs.get("mtriple", "")))
        return NestedRuntime(upload(session, module, cc=cc), session.cpu())
    except BaseException:
        if own:  # the traceback must not keep our session (and so the board) busy
            session = None
        raise


def board_triple(session) -> str | None:
    """The board's own LLVM triple (None when its TVM has no LLVM)."""
    try:
        return str(session.get_function("target.llvm_get_system_triple")())
    except Exception:
        return None


def _check_arch(session, triple: str) -> None:
    board = board_triple(session)
    if board and triple and board.split("-")[0] != triple.split("-")[0]:
        raise ValueError(f"module built for {triple}, but the board is {board}: build it for the board's target")


def time_levels(rt: NestedRuntime, *inputs, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0) -> list[dict]:
    """``[{"level", "density", "ms"}]`` for every level of ``rt``, timed on its device (the board)."""
    return [
        {
            "level": lvl,
            "density": rt.densities[lvl],
            "ms": rt.time(*inputs, level=lvl, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms),
        }
        for lvl in range(rt.num_levels)
    ]


__all__ = [
    "DEFAULT_TARGET",
    "BoardError",
    "board_triple",
    "connect",
    "deploy",
    "is_emulated",
    "parse_address",
    "time_levels",
    "upload",
]
