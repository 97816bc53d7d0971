"""``tvm-nested board {setup,serve,status}``: the emulated aarch64 board (``deploy.board``)."""

from __future__ import annotations

import json
import signal
import sys
from argparse import ArgumentTypeError
from pathlib import Path

from ..deploy.board import (
    DEFAULT_CPU,
    HOST_TOOLS,
    Board,
    BoardError,
    board_manifest,
    board_wheels,
    default_cache_dir,
    dir_size,
    ensure_board,
    log,
    missing_host_tools,
)
from .common import Parser, address

DEFAULT_PORTS = (9090, 9199)  # where `board serve` looks for a free port when none is given


def _cmd_setup(a) -> int:
    env = ensure_board(a.cache_dir, install_tools=a.install_tools, rebuild=a.rebuild)
    print(f"board python: {env.python}\nsysroot:      {env.sysroot}")
    print("wheels:       " + " ".join(f"{n}=={v}" for n, v in env.wheels.items()))
    return 0


def _cmd_serve(a) -> int:
    env = ensure_board(a.cache_dir)
    # the server runs in its own session: Ctrl-C (even if started with SIGINT ignored, as a
    # shell's background job is) and SIGTERM unwind and stop it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Board(env, cpu=a.cpu, inproc=a.inproc) as board:
        log(f"starting the board RPC server (qemu {a.cpu}; import under emulation takes a while)")
        # a port the user names is that port (busy: an error saying so); none: the first free one
        # of TVM's usual range
        port, port_end = (a.port, a.port_end or a.port + 1) if a.port is not None else DEFAULT_PORTS
        if port_end <= port:
            raise BoardError(f"--port-end {port_end} must be above --port {port}")
        tracker = f"{a.tracker[0]}:{a.tracker[1]}" if a.tracker else None
        bp = board.start_server(a.host, port, port_end, tracker=tracker, key=a.key)
        where = f"tracker {a.tracker} key {a.key}" if a.tracker else "direct"
        print(
            f"board RPC server listening on {bp.host}:{bp.port} ({where}); Ctrl-C stops it",
            flush=True,
        )
        try:
            bp.proc.wait()
            print(f"server exited ({bp.proc.returncode}):\n{bp.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            board.stop()
    return 0


def _cmd_status(a) -> int:
    cache = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    manifest = cache / "sysroot/.board-manifest.json"
    need = missing_host_tools()
    print(f"cache dir:  {cache}")
    tools = f"missing {' '.join(need)}" if need else f"ok ({', '.join(HOST_TOOLS.values())})"
    print(f"host tools: {tools}")
    if not manifest.exists():
        print("board:      not built (tvm-nested board setup)")
        return 1
    m = json.loads(manifest.read_text())
    fresh = m == board_manifest(board_wheels())
    print(f"board:      built{'' if fresh else ' but STALE (host versions changed; run setup)'}")
    print("wheels:     " + " ".join(f"{n}=={v}" for n, v in m["wheels"].items()))
    print(
        f"size:       downloads {dir_size(cache / 'downloads') / 1e6:.0f} MB, "
        f"sysroot {dir_size(cache / 'sysroot') / 1e6:.0f} MB"
    )
    return 0 if fresh and not need else 1


def board_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tvm-nested board", description="an emulated aarch64 board (qemu-user) for TVM RPC")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    common = Parser(add_help=False)
    common.add_argument("--cache-dir", default=None, help=f"where the board lives (default {default_cache_dir()})")
    s = sub.add_parser("setup", parents=[common], help="build the board (cached)")
    s.add_argument(
        "--install-tools",
        action="store_true",
        help=f"apt-get install missing host tools ({', '.join(HOST_TOOLS.values())})",
    )
    s.add_argument("--rebuild", action="store_true", help="re-extract the sysroot")
    s.set_defaults(func=_cmd_setup)
    s = sub.add_parser("serve", parents=[common], help="run a board RPC server until Ctrl-C")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"the port to serve on (default: the first free one in {DEFAULT_PORTS[0]}..{DEFAULT_PORTS[1] - 1})",
    )
    s.add_argument("--port-end", type=_port, default=None, help="with --port: also try ports up to this one (excluded)")
    s.add_argument("--tracker", type=address, default=None, help="host:port of a TVM RPC tracker")
    s.add_argument("--key", default=None, help="key to register with the tracker")
    s.add_argument("--cpu", default=DEFAULT_CPU, help="qemu CPU model (cortex-a72 = Pi 4)")
    s.add_argument(
        "--inproc",
        action="store_true",
        help="single-process server (faster start; the default is TVM's stock one)",
    )
    s.set_defaults(func=_cmd_serve)
    s = sub.add_parser("status", parents=[common], help="is the board built and current?")
    s.set_defaults(func=_cmd_status)
    a = p.parse_args(argv)
    if a.cmd == "serve" and a.tracker and not a.key:
        p.error("--tracker needs --key")
    if a.cmd == "serve" and a.port_end is not None and a.port is None:
        p.error("--port-end goes with --port")
    return a.func(a)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < port < 65536:
        raise ArgumentTypeError(f"a port is in 1..65535, got {port}")
    return port


__all__ = ["board_main"]
