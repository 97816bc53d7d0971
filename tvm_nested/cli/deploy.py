"""``tvm-nested deploy``: compile (or take a .so), upload to a board, run and time every level there;
and the board arguments ``run`` shares."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ..build import build
from ..deploy import DEFAULT_TARGET, connect, deploy, is_emulated, time_levels
from ..runtime import example_inputs
from .common import Parser, add_model_arguments, address, load_model, positive_float, positive_int


def add_board_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--rpc host:port | --tracker host:port --key K`` and ``--timeout`` (shared by run/deploy)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rpc", type=address, default=None, help="host:port of the board's TVM RPC server")
    g.add_argument("--tracker", type=address, default=None, help="host:port of a TVM RPC tracker (with --key)")
    p.add_argument("--key", default=None, help="the board's key at the tracker")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to reach the board (default 30)")


def check_board_arguments(p: argparse.ArgumentParser, args) -> None:
    if args.tracker and not args.key:
        p.error("--tracker needs --key")
    if args.key and not args.tracker:
        p.error("--key goes with --tracker")


def connect_from_args(args, session_timeout: float = 0):
    return connect(args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout, session_timeout=session_timeout)


def deploy_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = ap or Parser(prog="tvm-nested deploy")
    p.description = (
        "compile (given .onnx/.pt2) or take a compiled .so, upload it to a board over TVM RPC, "
        "run and time every level there"
    )
    p.add_argument("model", help="a compiled module (.so built for the board) or a model (.onnx, .pt2)")
    add_board_arguments(p, required=True)
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"board target when compiling a model (default {DEFAULT_TARGET!r}; presets rpi4, rpi5, "
        "jetson-orin-cpu, tags like raspberry-pi/4b-aarch64)",
    )
    p.add_argument("--tuning-log", default=None, help="a tuning log for this board target (tvm-nested tune)")
    p.add_argument("--cc", default=None, help="cross compiler (found automatically for aarch64)")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="when compiling a model: skip the comparison with this machine's build at every level",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="TVM threads on the board (default: the board's)")
    p.add_argument("--number", type=positive_int, default=10, help="runs per timing (default 10)")
    p.add_argument("--repeat", type=positive_int, default=3, help="timings per level (default 3)")
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p)
    return p


def _target_summary(canonical: str) -> str:
    try:
        t = json.loads(canonical)
    except ValueError:
        return canonical or "?"
    attrs = [
        f"-{k}={','.join(t[k]) if isinstance(t[k], list) else t[k]}" for k in ("mtriple", "mcpu", "mattr") if k in t
    ]
    return " ".join([t.get("kind", "?"), *attrs])


def _print_table(rt, rows, errors, emulated: bool, where: str) -> None:
    print(f"board {where}: {rt.num_levels} levels, target {_target_summary(rt.info.get('target', ''))}")
    if emulated:
        print(
            "NOTE: this board is EMULATED (qemu-user, tvm-nested board): the timings below check the "
            "deployment, they are NOT performance numbers"
        )
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
    reference = None
    if model.endswith((".onnx", ".pt2")):
        mod = load_model(model, input_shapes=args.input_shapes, trust_pt2=args.trust_pt2)
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
    where = (
        f"{args.rpc[0]}:{args.rpc[1]}"
        if args.rpc
        else f"via tracker {args.tracker[0]}:{args.tracker[1]} key {args.key}"
    )
    _print_table(rt, rows, errors, is_emulated(session), where)
    return 0


__all__ = ["add_board_arguments", "check_board_arguments", "connect_from_args", "deploy_main"]
