"""``tvm-nested nest`` and ``tvm-nested train``: the command-line entry points of nested pruning.

``nest``: a dense model plus per-level densities to a nested model: a ``torch.export`` program
(``.pt2``, ``authoring.torch_nest``) or an ONNX model (``.onnx``, ``authoring.onnx_nest``).
``train``: ``tvm-nested train --config file.json|file.toml`` runs the configured experiment
(``authoring.experiment``) and writes ``results.json``, ``nested.pt2`` and ``nested.onnx``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..authoring.experiment import load_config, run_experiment
from ..authoring.onnx_nest import nest_onnx, prunable_weights
from ..authoring.pruning import PruningConfig, nested_levelmaps
from ..authoring.torch_nest import nest_exported
from ..authoring.training import export_onnx, export_torch
from ..frontend import load_exported_program, load_onnx, quiet_torch
from .common import CLIError, Parser, check_output, densities, positive_int, replacing, say_overwrite

TRAIN_OUTPUTS = ("nested.pt2", "nested.onnx", "results.json")


def train_main(argv=None) -> int:
    p = Parser(prog="tvm-nested train", description="Train a nested sparse model from a config file.")
    p.add_argument("--config", required=True, help="experiment config (.json or .toml), e.g. examples/digits.json")
    p.add_argument("--output", help="output directory (overrides the config's 'output')")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the outputs of an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        raise CLIError(f"--config {args.config!r}: no such file")
    exp = load_config(args.config)
    out = Path(args.output or exp.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_OUTPUTS:  # refused before training, not after
        check_output(str(out / name), [args.config], force=args.force, flag="--output")
    nested, results = run_experiment(exp, progress=not args.no_progress)
    example = torch.zeros(1, 1, 8, 8)
    with quiet_torch():
        with replacing(str(out / "nested.pt2")) as tmp:
            export_torch(nested, example, path=tmp)
        with replacing(str(out / "nested.onnx")) as tmp:
            export_onnx(nested, example, path=tmp)
    with replacing(str(out / "results.json")) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'nested.pt2'}, {out / 'nested.onnx'}, {out / 'results.json'}")
    print(f"compile it: tvm-nested compile {out / 'nested.onnx'} --input-shapes 'x:[1,1,8,8]' -o nested.so")
    return 0


def nest_main(argv=None) -> int:
    p = Parser(
        prog="tvm-nested nest",
        description="Nest a dense model: a torch.export program (.pt2) or an ONNX model (.onnx), by magnitude.",
    )
    p.add_argument("model", help="dense model: .pt2 (torch.export.save) or .onnx")
    p.add_argument(
        "--densities", required=True, type=densities, help="per-level densities, densest first, e.g. 0.5,0.25,0.13"
    )
    p.add_argument("-o", "--output", required=True, help="nested model path (.pt2 for .pt2 input, .onnx for .onnx)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--trust-pt2", action="store_true", help="load a .pt2 from a place others can write to")
    p.add_argument("--scope", choices=("layer", "global"), default=PruningConfig.scope)
    p.add_argument(
        "--block", type=positive_int, default=PruningConfig.block, help="output channels per block (1, 4, 8)"
    )
    p.add_argument("--balanced", action="store_true", help="every output row keeps the same count per level")
    p.add_argument(
        "--first-last",
        type=float,
        default=None,
        help="minimum density of the first and last layer at every level (1.0: dense)",
    )
    args = p.parse_args(argv)
    config = PruningConfig(
        densities=args.densities,
        scope=args.scope,
        block=args.block,
        balanced=args.balanced,
        first_last=args.first_last,
    )
    src = Path(args.model)
    if not src.is_file():
        raise CLIError(f"no such file {args.model!r}")
    if src.suffix not in (".pt2", ".onnx"):
        raise CLIError(f"{args.model!r}: expected a .pt2 (torch.export) or .onnx model")
    if Path(args.output).suffix != src.suffix:
        raise CLIError(f"-o {args.output!r}: the nested model has the input's format ({src.suffix})")
    check_output(args.output, [args.model], force=args.force)
    if src.suffix == ".pt2":
        ep = nest_exported(load_exported_program(src, trusted=args.trust_pt2), config)
        say_overwrite(args.output)
        with quiet_torch(), replacing(args.output) as tmp:
            torch.export.save(ep, tmp)
    else:
        import onnx  # the ONNX route only
        from onnx import numpy_helper

        model = load_onnx(str(src))
        inits = {t.name: t for t in model.graph.initializer}
        # ONNX weights are taken as stored: blocks and row balance follow their first axis (Conv: O;
        # Gemm with transB=1, as PyTorch exports: out_features)
        weights = {n: numpy_helper.to_array(inits[n]) for n in prunable_weights(model)}
        nested = nest_onnx(model, level_maps=nested_levelmaps(weights, config))
        say_overwrite(args.output)
        with replacing(args.output) as tmp:
            onnx.save(nested, tmp)
    print(f"wrote {args.output}: {config.num_levels} levels, densities {list(config.densities)}")
    return 0


__all__ = ["nest_main", "train_main"]
