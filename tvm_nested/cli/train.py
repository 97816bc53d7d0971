"""``tvm-nested nest`` and ``tvm-nested train``: the command-line entry points of nested pruning.

``nest``: a dense model plus per-level densities to a nested model: a ``torch.export`` program
(``.pt2``, ``authoring.torch_nest``) or an ONNX model (``.onnx``, ``authoring.onnx_nest``).
``train``: ``tvm-nested train --config file.json|file.toml`` runs the configured experiment
(``authoring.experiment``) and writes ``results.json``, ``nested.pt2`` and ``nested.onnx``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..authoring.experiment import load_config, run_experiment
from ..authoring.onnx_nest import nest_onnx, prunable_weights
from ..authoring.pruning import PruningConfig, nested_levelmaps
from ..authoring.torch_nest import nest_exported
from ..authoring.training import export_onnx, export_torch


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tvm-nested train", description="Train a nested sparse model from a config file.")
    p.add_argument("--config", required=True, help="experiment config (.json or .toml), e.g. examples/digits.json")
    p.add_argument("--output", help="output directory (overrides the config's 'output')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    exp = load_config(args.config)
    out = Path(args.output or exp.output)
    out.mkdir(parents=True, exist_ok=True)
    nested, results = run_experiment(exp, progress=not args.no_progress)
    example = torch.zeros(1, 1, 8, 8)
    export_torch(nested, example, path=out / "nested.pt2")
    export_onnx(nested, example, path=out / "nested.onnx")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'nested.pt2'}, {out / 'nested.onnx'}, {out / 'results.json'}")
    return 0


def nest_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="tvm-nested nest",
        description="Nest a dense model: a torch.export program (.pt2) or an ONNX model (.onnx), by magnitude.",
    )
    p.add_argument("model", help="dense model: .pt2 (torch.export.save) or .onnx")
    p.add_argument("--densities", required=True, help="per-level densities, densest first, e.g. 0.5,0.25,0.13,0.05")
    p.add_argument("-o", "--output", required=True, help="nested model path (.pt2 for .pt2 input, .onnx for .onnx)")
    p.add_argument("--scope", choices=("layer", "global"), default=PruningConfig.scope)
    p.add_argument("--block", type=int, default=PruningConfig.block, help="output channels per block (1, 4, 8)")
    p.add_argument("--balanced", action="store_true", help="every output row keeps the same count per level")
    p.add_argument(
        "--first-last",
        type=float,
        default=None,
        help="minimum density of the first and last layer at every level (1.0: dense)",
    )
    args = p.parse_args(argv)
    config = PruningConfig(
        densities=tuple(float(s) for s in args.densities.split(",")),
        scope=args.scope,
        block=args.block,
        balanced=args.balanced,
        first_last=args.first_last,
    )
    src = Path(args.model)
    if src.suffix == ".pt2":
        ep = nest_exported(torch.export.load(str(src)), config)
        torch.export.save(ep, args.output)
    elif src.suffix == ".onnx":
        import onnx  # the ONNX route only
        from onnx import numpy_helper

        model = onnx.load(str(src))
        inits = {t.name: t for t in model.graph.initializer}
        # ONNX weights are taken as stored: blocks and row balance follow their first axis (Conv: O;
        # Gemm with transB=1, as PyTorch exports: out_features)
        weights = {n: numpy_helper.to_array(inits[n]) for n in prunable_weights(model)}
        onnx.save(nest_onnx(model, level_maps=nested_levelmaps(weights, config)), args.output)
    else:
        print(f"tvm-nested nest: {src}: expected a .pt2 (torch.export) or .onnx model", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {config.num_levels} levels, densities {list(config.densities)}")
    return 0


__all__ = ["nest_main", "train_main"]
