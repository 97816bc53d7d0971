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
``connect`` never waits longer than its ``timeout`` (unreachable board, a port that does not answer
the RPC handshake, a busy board, no free server with the key at the tracker): it raises
``BoardError`` saying which.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .board import BoardError
from .info import example_inputs
from .runtime import NestedRuntime

DEFAULT_TARGET = "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"  # any 64-bit ARM board with NEON
_EMULATED_MARK = "/.board-manifest.json"  # qemu -L maps it into the emulated board's sysroot


def parse_address(text) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; ValueError otherwise."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return str(text[0]), int(text[1])
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _bounded(fn, timeout: float, what: str):
    """``fn()`` in a daemon thread; BoardError when it has not returned after ``timeout`` seconds.

    TVM's RPC handshake and tracker protocol read sockets without a time-out: a port that accepts
    and never answers (a board busy with another client, not an RPC server) would block forever.
    """
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = err

    thread = threading.Thread(target=call, name="tvm-nested-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BoardError(f"{what}: no answer within {timeout:.0f}s (a TVM RPC server serves one client at a time: "
                         "is another client using the board? is it a TVM RPC server/tracker at all?)")
    if "error" in box:
        err = box["error"]
        if isinstance(err, BoardError):
            raise err
        raise BoardError(f"{what}: {type(err).__name__}: {err}") from err
    return box["value"]


def connect(rpc=None, *, tracker=None, key: str | None = None, timeout: float = 30.0,
            session_timeout: float = 0):
    """An RPC session with a board: ``rpc="host:port"`` (its server) or ``tracker="host:port"`` + ``key``.

    Raises ``BoardError`` within about ``timeout`` seconds when the board or tracker cannot be
    reached, does not answer, or has no free server registered under ``key``.
    ``session_timeout``: seconds after which the board ends the session (0: never).
    """
    from tvm import rpc as tvm_rpc

    if (rpc is None) == (tracker is None):
        raise ValueError("give exactly one of rpc='host:port' (a board) or tracker='host:port' (with key=)")
    if tracker is not None and not key:
        raise ValueError("a tracker needs the board's key (key=)")
    target = parse_address(rpc if rpc is not None else tracker)
    what = f"board {target[0]}:{target[1]}" if rpc is not None else f"tracker {target[0]}:{target[1]}"
    deadline = time.monotonic() + timeout
    try:  # a bounded reachability check: a bare connect() blocks for minutes on a dropped SYN
        socket.create_connection(target, timeout=timeout).close()
    except OSError as err:
        raise BoardError(f"{what} unreachable: {err}") from err
    if rpc is not None:
        return _bounded(lambda: tvm_rpc.connect(*target, session_timeout=session_timeout),
                        max(deadline - time.monotonic(), 1.0), f"{what}: RPC connect")

    def via_tracker():
        while True:
            try:
                queue = tvm_rpc.connect_tracker(*target).summary()["queue_info"]
            except Exception as err:  # noqa: BLE001
                raise BoardError(f"{what}: not a TVM RPC tracker ({err})") from err
            if queue.get(key, {}).get("free", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise BoardError(f"{what}: no free server with key {key!r} after {timeout:.0f}s "
                                 f"(keys: {sorted(queue) or 'none'})")
            time.sleep(0.5)
        return tvm_rpc.connect_tracker(*target).request(key, session_timeout=session_timeout, max_retry=2)

    return _bounded(via_tracker, max(deadline - time.monotonic(), 1.0) + 2.0, what)


def is_emulated(session) -> bool:
    """True when the board is ``tvm_nested.board``'s emulated one (qemu-user): timings there are
    not performance numbers."""
    try:
        return bool(session.download(_EMULATED_MARK))
    except Exception:  # noqa: BLE001 (a real board has no such file)
        return False


def upload(session, module, *, cc: str | None = None):
    """Put ``module`` on the board and load it there; returns the remote runtime module.

    ``module``: a ``NestedModule`` (exported here, cross-compiled for its target) or the path of a
    shared library already built for the board (``tvm-nested compile --target ...``).
    """
    from .build import NestedModule

    with tempfile.TemporaryDirectory(prefix="tvm_nested_deploy_") as tmp:
        if isinstance(module, NestedModule):
            path = module.export_library(os.path.join(tmp, "nested_model.so"), cc=cc)
        else:
            path = os.fspath(module)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no compiled module at {path!r}")
            if not path.endswith(".so"):
                raise ValueError(f"{path!r}: expected a shared library (.so) built for the board")
        name = f"tvm_nested_{os.getpid()}_{Path(path).name}"
        session.upload(path, name)
    return session.load_module(name)


def deploy(module, rpc=None, *, tracker=None, key: str | None = None, timeout: float = 30.0,
           session_timeout: float = 0, cc: str | None = None, num_threads: int | None = None,
           session=None) -> NestedRuntime:
    """Upload ``module`` (a ``NestedModule`` or a ``.so`` path) to a board and load it there.

    Returns the same ``NestedRuntime`` as ``tvm_nested.load`` gives locally: ``run(*inputs, level=k)``
    runs on the board and returns NumPy arrays, ``time(...)`` times on the board. Give ``rpc=
    "host:port"``, or ``tracker="host:port"`` with ``key=``, or an open ``session`` (``connect``).
    ``num_threads``: the board's TVM thread pool size (default: the board's own choice).
    """
    from .build import NestedModule
    from .target import is_cross

    if isinstance(module, NestedModule) and module.target.kind.name != "llvm":
        raise ValueError(f"deploy runs CPU (llvm) modules on a board; this one is for {module.target.kind.name}")
    if isinstance(module, NestedModule) and not is_cross(module.target):
        import warnings

        warnings.warn(f"this module is built for this machine's CPU ({module.target.attrs.get('mtriple', '')}), "
                      "not for a board: build it with the board's target (e.g. 'rpi4' or "
                      f"{DEFAULT_TARGET!r})", stacklevel=2)
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
    except Exception:  # noqa: BLE001
        return None


def _check_arch(session, triple: str) -> None:
    board = board_triple(session)
    if board and triple and board.split("-")[0] != triple.split("-")[0]:
        raise ValueError(f"module built for {triple}, but the board is {board}: build it for the board's target")


def time_levels(rt: NestedRuntime, *inputs, number: int = 10, repeat: int = 3,
                min_repeat_ms: int = 0) -> list[dict]:
    """``[{"level", "density", "ms"}]`` for every level of ``rt``, timed on its device (the board)."""
    return [{"level": lvl, "density": rt.densities[lvl],
             "ms": rt.time(*inputs, level=lvl, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)}
            for lvl in range(rt.num_levels)]


# ------------------------------------------------------------------------------------------ CLI
def add_board_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--rpc host:port | --tracker host:port --key K`` and ``--timeout`` (shared by run/deploy)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rpc", type=_address, default=None, help="host:port of the board's TVM RPC server")
    g.add_argument("--tracker", type=_address, default=None, help="host:port of a TVM RPC tracker (with --key)")
    p.add_argument("--key", default=None, help="the board's key at the tracker")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to reach the board (default 30)")


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def check_board_arguments(p: argparse.ArgumentParser, args) -> None:
    if args.tracker and not args.key:
        p.error("--tracker needs --key")
    if args.key and not args.tracker:
        p.error("--key goes with --tracker")


def connect_from_args(args, session_timeout: float = 0):
    return connect(args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout,
                   session_timeout=session_timeout)


def deploy_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = ap or argparse.ArgumentParser(prog="tvm-nested deploy")
    p.description = ("compile (given .onnx/.pt2) or take a compiled .so, upload it to a board over TVM RPC, "
                     "run and time every level there")
    p.add_argument("model", help="a compiled module (.so built for the board) or a model (.onnx, .pt2)")
    add_board_arguments(p, required=True)
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"board target when compiling a model (default {DEFAULT_TARGET!r}; presets rpi4, rpi5, "
                        "jetson-orin-cpu, tags like raspberry-pi/4b-aarch64)")
    p.add_argument("--tuning-log", default=None, help="a tuning log for this board target (tvm-nested tune)")
    p.add_argument("--cc", default=None, help="cross compiler (found automatically for aarch64)")
    p.add_argument("--no-check", action="store_true",
                   help="when compiling a model: skip the comparison with this machine's build at every level")
    p.add_argument("--threads", type=int, default=None, help="TVM threads on the board (default: the board's)")
    p.add_argument("--number", type=int, default=10, help="runs per timing (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="timings per level (default 3)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _target_summary(canonical: str) -> str:
    import json

    try:
        t = json.loads(canonical)
    except ValueError:
        return canonical or "?"
    attrs = [f"-{k}={','.join(t[k]) if isinstance(t[k], list) else t[k]}" for k in ("mtriple", "mcpu", "mattr") if k in t]
    return " ".join([t.get("kind", "?"), *attrs])


def _print_table(rt, rows, errors, emulated: bool, where: str) -> None:
    print(f"board {where}: {rt.num_levels} levels, target {_target_summary(rt.info.get('target', ''))}")
    if emulated:
        print("NOTE: this board is EMULATED (qemu-user, tvm-nested board): the timings below check the "
              "deployment, they are NOT performance numbers")
    head = "| level | density | board ms |" + (" max abs err vs host |" if errors else "")
    print(head + "\n|---:|---:|---:|" + ("---:|" if errors else ""))
    for row in rows:
        line = f"| {row['level']} | {row['density']:.2%} | {row['ms']:.3f} |"
        if errors:
            line += f" {errors[row['level']]:.3g} |"
        print(line)


def deploy_main(argv=None) -> int:
    """``tvm-nested deploy MODEL --rpc host:port | --tracker host:port --key K [--target T]``."""
    p = deploy_parser()
    args = p.parse_args(argv)
    check_board_arguments(p, args)
    model = args.model
    if not os.path.isfile(model):
        p.error(f"no such file {model!r}")
    try:
        reference = None
        if model.endswith((".onnx", ".pt2")):
            from .build import build
            from .cli import _load_model

            mod = _load_model(model)
            t0 = time.perf_counter()
            module = build(mod, target=args.target, tuning_log=args.tuning_log)
            print(f"compiled {model} for {args.target} in {time.perf_counter() - t0:.1f}s")
            if not args.no_check:
                reference = build(mod, target="llvm").runtime()
        elif model.endswith(".so"):
            module = model
        else:
            p.error(f"{model!r}: expected a compiled module (.so) or a model (.onnx, .pt2)")
        t0 = time.perf_counter()
        session = connect_from_args(args)
        rt = deploy(module, session=session, cc=args.cc, num_threads=args.threads)
        print(f"uploaded and loaded on the board in {time.perf_counter() - t0:.1f}s")
        inputs = example_inputs(rt.info, args.seed)
        errors = {}
        for lvl in range(rt.num_levels):
            outs = rt.run(*inputs, level=lvl)
            if reference is not None:
                ref = reference.run(*inputs, level=lvl)
                errors[lvl] = max(float(np.max(np.abs(o - r))) if o.size else 0.0 for o, r in zip(outs, ref))
        rows = time_levels(rt, *inputs, number=args.number, repeat=args.repeat)
        where = (f"{args.rpc[0]}:{args.rpc[1]}" if args.rpc
                 else f"via tracker {args.tracker[0]}:{args.tracker[1]} key {args.key}")
        _print_table(rt, rows, errors, is_emulated(session), where)
    except (BoardError, ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DEFAULT_TARGET", "BoardError", "board_triple", "connect", "deploy", "deploy_main", "is_emulated", "parse_address",
           "time_levels", "upload"]
