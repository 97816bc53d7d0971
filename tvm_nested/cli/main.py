"""The ``tvm-nested`` command: compile, run, demo here; the other verbs in their own modules.

Verbs whose modules need optional dependencies (``nest`` and ``train`` need torch) are imported
when they are called, so ``tvm-nested compile`` works on an install without torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings

from ..build import build
from ..contract import REROUTE_POLICIES
from ..deploy import BoardError, deploy, is_emulated
from ..runtime import example_inputs, load, num_threads
from ..runtime.profile import profile_levels, summary
from .common import (
    EXIT_USAGE,
    CLIError,
    Parser,
    add_model_arguments,
    check_output,
    densities,
    load_model,
    load_npy,
    non_negative_float,
    non_negative_int,
    positive_int,
    replacing,
    say_overwrite,
)
from .demo import DEFAULT_DENSITIES, DEFAULT_MODEL, run_demo
from .deploy import add_board_arguments, check_board_arguments, connect_from_args


def cmd_compile(args) -> int:
    check_output(args.output, [args.model], force=args.force)
    if args.tuning_log is not None and not os.path.isdir(args.tuning_log):
        raise CLIError(f"--tuning-log {args.tuning_log!r} is not a directory written by `tvm-nested tune`")
    mod = load_model(args.model, input_shapes=args.input_shapes, trust_pt2=args.trust_pt2)
    lib = build(mod, target=args.target, tuning_log=args.tuning_log)
    say_overwrite(args.output)
    with replacing(args.output) as tmp:
        lib.export_library(tmp, cc=args.cc)
    print(f"wrote {args.output}: {lib.num_levels} levels, target {lib.target}")
    print(
        f"nested payload {lib.payload_bytes} B = {lib.payload_bytes / max(lib.csr_bytes, 1):.3f}x plain CSR "
        f"of level 0 (dense weights {lib.dense_bytes} B)"
    )
    print("| level | density |\n|---:|---:|")
    for lvl, d in enumerate(lib.densities):
        print(f"| {lvl} | {d:.2%} |")
    return 0


def cmd_run(args) -> int:
    if args.deadline_ms is None and (args.policy is not None or args.aggressiveness is not None):
        raise CLIError("--policy and --aggressiveness apply to requests under a deadline: add --deadline-ms")
    inputs = [load_npy(f) for f in args.input]
    if args.rpc or args.tracker:  # on a board over TVM RPC: the same runtime, the module uploaded
        if not os.path.isfile(args.module):
            raise CLIError(f"no such file {args.module!r}")
        session = connect_from_args(args)
        rt = deploy(args.module, session=session, num_threads=args.threads)
        if is_emulated(session):
            print("NOTE: emulated board (qemu-user): latency_ms is not a performance number", file=sys.stderr)
    else:
        rt = load(args.module, num_threads=args.threads)
    inputs = inputs or example_inputs(rt.info, args.seed)
    if args.deadline_ms is not None:  # requests rerouted on the device under a deadline
        for i in range(args.repeat):
            t0 = time.perf_counter()
            outs, levels = rt.run_deadline(
                *inputs,
                deadline_ms=args.deadline_ms,
                level=args.level or 0,
                policy=args.policy,
                aggressiveness=args.aggressiveness,
            )
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
    levels = range(rt.num_levels) if args.level is None else [rt.check_level(args.level)]
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


def cmd_profile(args) -> int:
    rt = load(args.module, num_threads=args.threads)
    inputs = [load_npy(f) for f in args.input] or example_inputs(rt.info, args.seed)
    levels = range(rt.num_levels) if args.level is None else [rt.check_level(args.level)]
    profiles = profile_levels(rt, inputs, levels, repeat=args.repeat)
    print(f"{args.module}: {rt.num_levels} levels, {num_threads()} TVM thread(s), this machine\n")
    print(summary(profiles))
    for p in profiles:
        lines = str(p).splitlines()
        print("\n" + "\n".join(lines[: 4 + args.top]))
        if len(p.rows) > args.top:
            print(f"| ... {len(p.rows) - args.top} more | | | | | |")
    return 0


def cmd_demo(args) -> int:
    run_demo(args.model, args.densities, seed=args.seed, threads=args.threads, target=args.target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="tvm-nested", description="Nested sparse networks for Apache TVM")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (any position)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser(
        "compile", help="ONNX (.onnx) or torch.export (.pt2) model -> one compiled module + level report"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the shared library to write (never the input)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument(
        "--target", default="llvm", help='e.g. "llvm -mtriple=aarch64-linux-gnu -mattr=+neon" (default: this CPU)'
    )
    p.add_argument("--tuning-log", default=None, help="a tuning log directory from `tvm-nested tune`")
    p.add_argument("--cc", default=None, help="cross compiler for export (found automatically for aarch64)")
    add_model_arguments(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled module at every level (or one), or under a deadline, and time it")
    p.add_argument("module")
    p.add_argument(
        "--level", type=non_negative_int, default=None, help="one level (default: every level; with --deadline-ms: 0)"
    )
    p.add_argument("--input", action="append", default=[], help=".npy file per model input (default: seeded random)")
    p.add_argument(
        "--deadline-ms",
        type=non_negative_float,
        default=None,
        help="reroute on the device to meet this deadline per request (module built with stages and a "
        "latency table); prints the level each stage ran at",
    )
    p.add_argument(
        "--policy",
        choices=REROUTE_POLICIES,
        default=None,
        help="with --deadline-ms: the rerouting rule (default: the module's; 'paper': the seed paper's plain rule)",
    )
    p.add_argument(
        "--aggressiveness",
        type=non_negative_float,
        default=None,
        help="with --deadline-ms: the evidence rule's reserve: its escape to the sparsest level must survive "
        "a slowdown 1 + this (default: the module's)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="TVM CPU threads (default: TVM's own)")
    p.add_argument("--repeat", type=positive_int, default=5, help="timing repeats (with --deadline-ms: requests)")
    p.add_argument("--seed", type=int, default=0)
    add_board_arguments(p, required=False)  # --rpc host:port | --tracker host:port --key K: run on a board
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="where the time goes: every function of a compiled module, per level, sorted")
    p.add_argument("module")
    p.add_argument("--level", type=non_negative_int, default=None, help="one level (default: every level)")
    p.add_argument("--input", action="append", default=[], help=".npy file per model input (default: seeded random)")
    p.add_argument("--threads", type=positive_int, default=None, help="TVM CPU threads (default: TVM's own)")
    p.add_argument("--repeat", type=positive_int, default=10, help="calls timed per level")
    p.add_argument("--top", type=positive_int, default=15, help="functions listed per level (the slowest)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "demo", help="nest a model-zoo architecture, compile one module, check every level vs onnxruntime"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"onnx model-zoo architecture (default {DEFAULT_MODEL})")
    p.add_argument("--densities", type=densities, default=DEFAULT_DENSITIES, help="per-level densities, densest first")
    p.add_argument("--threads", type=positive_int, default=None, help="TVM CPU threads (default: all cores)")
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

# what to install for an optional module a verb needs
_EXTRAS = {"torch": "pip install 'tvm-nested[torch]'", "sklearn": "pip install 'tvm-nested[train]'"}


def _one_line(err: BaseException) -> str:
    """An exception as one line: TVM's errors carry a traceback of C++ frames before their message."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    if text.endswith(":") and text in lines[:-1]:  # "Compilation error:" and the compiler's words below it
        rest = lines[lines.index(text) + 1 :]
        text += " " + next((line for line in rest if "error" in line.lower()), rest[0])
    if isinstance(err, ModuleNotFoundError) and err.name:
        root = err.name.split(".")[0]
        return f"this needs the package {root!r}, which is not installed ({_EXTRAS.get(root, f'pip install {root}')})"
    if isinstance(err, (CLIError, ValueError, OSError, BoardError, KeyError, TypeError, RuntimeError)):
        return text
    return f"{type(err).__name__}: {text} (an internal error: run again with --debug for the traceback)"


def _show_warning(verb: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"tvm-nested {verb}: warning: {message}", file=sys.stderr)

    return show


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        module, func, _ = DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "run":
        check_board_arguments(ap, args)
    return int(args.func(args) or 0)


def main(argv=None) -> int:
    """``tvm-nested VERB ...``: the exit status. Any error is one line ``tvm-nested VERB: error: ...``
    on stderr and status 2; ``--debug`` (anywhere) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    verb = argv[0] if argv and not argv[0].startswith("-") else "command"
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning(verb)
        try:
            return _dispatch(argv)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            print(f"tvm-nested {verb}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug:
                raise
            print(f"tvm-nested {verb}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE


__all__ = ["DELEGATED", "build_parser", "main"]
