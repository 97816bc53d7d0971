"""The ``tvm-nested`` command: compile, run, demo here; the other verbs in their own modules.

Verbs whose modules need optional dependencies (``nest`` and ``train`` need torch) are imported
when they are called, so ``tvm-nested compile`` works on an install without torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import numpy as np

from ..build import build
from ..deploy import BoardError, deploy, is_emulated
from ..runtime import example_inputs, load
from .common import densities, load_model
from .demo import DEFAULT_DENSITIES, DEFAULT_MODEL, run_demo
from .deploy import add_board_arguments, check_board_arguments, connect_from_args


def cmd_compile(args) -> int:
    lib = build(load_model(args.model), target=args.target, tuning_log=args.tuning_log)
    out = lib.export_library(args.output, cc=args.cc)
    print(f"wrote {out}: {lib.num_levels} levels, target {lib.target}")
    print(
        f"nested payload {lib.payload_bytes} B = {lib.payload_bytes / max(lib.csr_bytes, 1):.3f}x plain CSR "
        f"of level 0 (dense weights {lib.dense_bytes} B)"
    )
    print("| level | density |\n|---:|---:|")
    for lvl, d in enumerate(lib.densities):
        print(f"| {lvl} | {d:.2%} |")
    return 0


def cmd_run(args) -> int:
    if args.rpc or args.tracker:  # on a board over TVM RPC: the same runtime, the module uploaded
        session = connect_from_args(args)
        rt = deploy(args.module, session=session, num_threads=args.threads)
        if is_emulated(session):
            print("NOTE: emulated board (qemu-user): latency_ms is not a performance number", file=sys.stderr)
    else:
        rt = load(args.module, num_threads=args.threads)
    inputs = [np.load(f) for f in args.input] or example_inputs(rt.info, args.seed)
    if args.deadline_ms is not None:  # requests rerouted on the device under a deadline
        for i in range(args.repeat):
            t0 = time.perf_counter()
            outs, levels = rt.run_deadline(*inputs, deadline_ms=args.deadline_ms, level=args.level or 0)
            ms = (time.perf_counter() - t0) * 1e3
            print(
                json.dumps(
                    {
                        "request": i,
                        "latency_ms": round(ms, 3),
                        "met": ms <= args.deadline_ms,
                        "levels": [int(v) for v in levels],
                        "outputs": [list(o.shape) for o in outs],
                    }
                )
            )
        return 0
    levels = range(rt.num_levels) if args.level is None else [args.level]
    for lvl in levels:
        outs = rt.run(*inputs, level=lvl)
        ms = rt.time(*inputs, level=lvl, repeat=args.repeat)
        print(
            json.dumps(
                {
                    "level": lvl,
                    "density": rt.densities[lvl],
                    "latency_ms": round(ms, 3),
                    "outputs": [list(o.shape) for o in outs],
                }
            )
        )
    return 0


def cmd_demo(args) -> int:
    run_demo(args.model, args.densities, seed=args.seed, threads=args.threads, target=args.target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tvm-nested", description="Nested sparse networks for Apache TVM")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "compile", help="ONNX (.onnx) or torch.export (.pt2) model -> one compiled module + level report"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the shared library to write")
    p.add_argument(
        "--target", default="llvm", help='e.g. "llvm -mtriple=aarch64-linux-gnu -mattr=+neon" (default: this CPU)'
    )
    p.add_argument("--tuning-log", default=None, help="a tuning log directory from `tvm-nested tune`")
    p.add_argument("--cc", default=None, help="cross compiler for export (found automatically for aarch64)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled module at every level (or one), or under a deadline, and time it")
    p.add_argument("module")
    p.add_argument("--level", type=int, default=None, help="one level (default: every level; with --deadline-ms: 0)")
    p.add_argument("--input", action="append", default=[], help=".npy file per model input (default: seeded random)")
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="reroute on the device to meet this deadline per request (module built with stages and a "
        "latency table); prints the level each stage ran at",
    )
    p.add_argument("--threads", type=int, default=None, help="TVM CPU threads (default: TVM's own)")
    p.add_argument("--repeat", type=int, default=5, help="timing repeats (with --deadline-ms: requests)")
    p.add_argument("--seed", type=int, default=0)
    add_board_arguments(p, required=False)  # --rpc host:port | --tracker host:port --key K: run on a board
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "demo", help="nest a model-zoo architecture, compile one module, check every level vs onnxruntime"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"onnx model-zoo architecture (default {DEFAULT_MODEL})")
    p.add_argument("--densities", type=densities, default=DEFAULT_DENSITIES, help="per-level densities, densest first")
    p.add_argument("--threads", type=int, default=None, help="TVM CPU threads (default: all cores)")
    p.add_argument("--target", default="llvm")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    for name, (_, _, text) in DELEGATED.items():  # listed in --help; parsed by their own modules
        sub.add_parser(name, help=text, add_help=False)
    return ap


# Verbs that parse their own arguments: name -> (module, function, help).
DELEGATED = {
    "tune": ("tvm_nested.cli.tune", "tune_main", "auto-tune a model with MetaSchedule into a reusable tuning log"),
    "deploy": (
        "tvm_nested.cli.deploy",
        "deploy_main",
        "compile (or take a .so), upload to a board over TVM RPC, run and time every level there",
    ),
    "board": ("tvm_nested.cli.board", "board_main", "build, serve and inspect an emulated aarch64 board (qemu-user)"),
    "nest": ("tvm_nested.cli.train", "nest_main", "a dense PyTorch or ONNX model + densities -> a nested model"),
    "train": ("tvm_nested.cli.train", "train_main", "train a nested model with nested gradient masking (config file)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, func, _ = DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "run":
        check_board_arguments(ap, args)
    try:
        return args.func(args)
    except (BoardError, ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"tvm-nested {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["DELEGATED", "build_parser", "main"]
