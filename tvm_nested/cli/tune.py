"""``tvm-nested tune``: tune a model into a tuning log (``tvm_nested.tune``)."""

from __future__ import annotations

import argparse

from ..tuning import RPCSettings, tune
from .common import CLIError, Parser, add_model_arguments, address, levels, load_model, positive_float, positive_int


def tune_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or Parser(prog="tvm-nested tune", description="Tune a nested model into a tuning log")
    ap.add_argument("model", help="ONNX model (.onnx) or torch.export archive (.pt2)")
    ap.add_argument("--target", default="llvm", help="target to tune for (default: this CPU)")
    ap.add_argument(
        "--log",
        required=True,
        help="tuning log directory (created, or appended to for the same target; one tune at a time)",
    )
    ap.add_argument("--trials", type=positive_int, default=64, help="measured candidates per function (default 64)")
    ap.add_argument("--levels", type=levels, default=None, help="comma-separated levels to measure (default: all)")
    ap.add_argument("--rpc-tracker", "--tracker", type=address, default=None, help="host:port of an RPC tracker")
    ap.add_argument("--rpc-key", "--key", default=None, help="device key at the tracker")
    ap.add_argument("--rpc", type=address, default=None, help="host:port of one board's RPC server")
    ap.add_argument(
        "--session-timeout",
        type=positive_float,
        default=60,
        help="seconds a board may take to answer one measurement before tuning stops, naming it (default 60)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    ap.add_argument(
        "--verbose", action="store_true", help="MetaSchedule's own log lines on the terminal (always in LOG/logs)"
    )
    add_model_arguments(ap)
    return ap


def tune_main(argv=None) -> int:
    """``tvm-nested tune model.onnx|.pt2 --target ... --log DIR --trials N``
    ``[--rpc-tracker host:port --rpc-key K | --rpc host:port]``; returns the exit status."""
    p = tune_parser()
    args = p.parse_args(argv)
    if args.rpc_tracker and args.rpc:
        p.error("give --rpc-tracker (with --rpc-key) or --rpc, not both")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        p.error("--rpc-tracker and --rpc-key go together")
    runner = "local"
    if args.rpc_tracker:
        runner = RPCSettings(
            tracker_host=args.rpc_tracker[0],
            tracker_port=args.rpc_tracker[1],
            key=args.rpc_key,
            session_timeout=args.session_timeout,
        )
    elif args.rpc:
        runner = RPCSettings(host=args.rpc[0], port=args.rpc[1], session_timeout=args.session_timeout)
    if args.quiet and args.verbose:
        raise CLIError("--quiet and --verbose contradict each other")
    tune(
        load_model(args.model, input_shapes=args.input_shapes, trust_pt2=args.trust_pt2),
        args.target,
        args.log,
        max_trials=args.trials,
        runner=runner,
        levels=args.levels,
        seed=args.seed,
        progress=not args.quiet,
        verbose=args.verbose,
    )
    return 0


__all__ = ["tune_main", "tune_parser"]
