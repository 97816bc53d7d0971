"""``tvm-nested nest`` and ``tvm-nested train``: the command-line entry points of nested pruning.

``nest_main(argv)``: a dense model plus per-level densities to a nested model.

* PyTorch: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``). It is chosen over
  TorchScript because it is what ``tvm_nested.from_torch`` consumes (Relax's ``from_exported_program``),
  it loads without the user's Python classes, and TorchScript is deprecated upstream. Every
  ``aten.conv2d`` / ``aten.linear`` whose weight is a parameter gets ``w * (level_map >= level)``; the
  result is again a ``.pt2`` whose user inputs are ``(*inputs, level)`` (``level``: 0-d int64). The
  program is re-exported at the example shapes recorded in it (dynamic dimensions are not kept).
* ONNX (``.onnx``): level maps computed here (same options), written into the graph by
  ``tvm_nested.onnx_nest.nest_onnx``.

``train_main(argv)``: ``tvm-nested train --config file.json|file.toml`` runs the configured experiment
(dense baseline, progressive nested pruning with joint training, evaluation per level) and writes
``results.json``, ``nested.pt2`` and ``nested.onnx`` to the configured output directory. See
``examples/digits.json``; unknown keys are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .pruning import PruningConfig, level_stats, nested_levelmaps, prune_model
from .training import (
    TrainConfig, digits_cnn, digits_data, evaluate, export_onnx, export_torch, train_dense, train_nested,
)

# --------------------------------------------------------------------------- experiment config


@dataclass(frozen=True)
class Experiment:
    """A configured run (the file ``train --config`` reads). Sections: top-level keys, plus
    ``dense`` and ``nested`` (:class:`TrainConfig` fields) and ``pruning`` (:class:`PruningConfig`)."""

    task: str = "digits"
    seed: int = 0
    threads: int = 2
    test_size: float = 0.25
    width: int = 32
    output: str = "runs/digits"
    dense: TrainConfig = TrainConfig()
    nested: TrainConfig = TrainConfig()
    pruning: PruningConfig = PruningConfig()


TASKS = ("digits",)


def load_config(path) -> Experiment:
    """An :class:`Experiment` from a ``.json`` or ``.toml`` file; unknown keys raise ``ValueError``."""
    path = Path(path)
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
    elif path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"{path}: config must be .json or .toml")
    return experiment_from_dict(raw, where=str(path))


def experiment_from_dict(raw: dict, where: str = "config") -> Experiment:
    def build(cls, d, section):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} in {section}; known: {sorted(known)}")
        return cls(**d)

    raw = dict(raw)
    sub = {}
    for key, cls in (("dense", TrainConfig), ("nested", TrainConfig), ("pruning", PruningConfig)):
        if key in raw:
            sub[key] = build(cls, raw.pop(key), f"[{key}]")
    exp = build(Experiment, {**raw, **sub}, "the top level")
    if exp.task not in TASKS:
        raise ValueError(f"{where}: task must be one of {TASKS}, got {exp.task!r}")
    return exp


def run_experiment(exp: Experiment, *, progress: bool = True, log=print) -> tuple[torch.nn.Module, dict]:
    """Dense baseline, then nested pruning and training from it; accuracy per level on the held-out split."""
    t0 = time.perf_counter()
    torch.set_num_threads(exp.threads)
    x_tr, y_tr, x_te, y_te = digits_data(exp.seed, exp.test_size)
    dense = digits_cnn(exp.width, seed=exp.seed)
    train_dense(dense, (x_tr, y_tr), exp.dense, progress=progress)
    dense_acc = evaluate(dense, x_te, y_te)
    t_dense = time.perf_counter() - t0
    log(f"dense accuracy {dense_acc:.4f} ({t_dense:.0f}s)")

    # start dense at every level; the progressive schedule prunes the densest level first
    nested = prune_model(dense, PruningConfig(densities=(1.0,) * exp.pruning.num_levels))
    history = train_nested(nested, (x_tr, y_tr), exp.nested, exp.pruning, progress=progress)
    stats = level_stats(nested, x_te[:1])
    levels = [{**s, "accuracy": evaluate(nested, x_te, y_te, s["level"])} for s in stats]
    for s in levels:
        log(f"level {s['level']}: accuracy {s['accuracy']:.4f}, weights {100 * s['weights']:.2f}%, "
            f"FLOPs {100 * s['flops']:.2f}%")
    results = {
        "config": _jsonable(asdict(exp)),
        "split": {"train": len(y_tr), "test": len(y_te), "seed": exp.seed},
        "dense_accuracy": dense_acc,
        "levels": levels,
        "history": history,
        "runtime_s": {"dense": t_dense, "total": time.perf_counter() - t0},
        "torch": torch.__version__,
        "threads": exp.threads,
    }
    return nested, results


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


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


# --------------------------------------------------------------------------- nest


def nest_exported(ep: torch.export.ExportedProgram, config: PruningConfig) -> torch.export.ExportedProgram:
    """A nested copy of a dense ``torch.export`` program: every ``conv2d`` / ``linear`` whose weight
    is a parameter computes with ``weight * (level_map >= level)``; ``level`` is a new last input."""
    import torch.fx

    gm = ep.module()
    g = gm.graph
    layer_ops = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    uses = [n for n in g.nodes if n.op == "call_function" and n.target in layer_ops
            and n.args[1].op == "get_attr"]
    if not uses:
        raise ValueError("no conv2d/linear with a parameter weight found in the exported program")
    weights = {}
    for n in uses:
        weights[n.args[1].target.rpartition(".")[0] or n.args[1].target] = gm.get_parameter(n.args[1].target)
    maps = nested_levelmaps(weights, config)

    for n in list(g.nodes):  # export-time input guards refer to the old signature
        if n.op == "call_module" and n.target == "_guards_fn":
            g.erase_node(n)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    examples = [_example_of(p) for p in placeholders]
    with g.inserting_after(placeholders[-1]):
        level = g.placeholder("level")
    for n in uses:
        w = n.args[1]
        layer = w.target.rpartition(".")[0] or w.target
        owner = gm.get_submodule(w.target.rpartition(".")[0]) if "." in w.target else gm
        buf = w.target.rpartition(".")[2] + "_level_map"
        owner.register_buffer(buf, torch.from_numpy(maps[layer]))
        with g.inserting_before(n):
            lm = g.get_attr(w.target.rpartition(".")[0] + "." + buf if "." in w.target else buf)
            keep = g.call_function(torch.ops.aten.ge.Tensor, (lm, level))
            mask = g.call_function(torch.ops.aten._to_copy.default, (keep,), {"dtype": w.meta.get("val", torch.empty(0)).dtype})
            w_eff = g.call_function(torch.ops.aten.mul.Tensor, (w, mask))
        n.replace_input_with(w, w_eff)
    g._codegen = torch.fx.graph.CodeGen()  # plain positional signature: (*inputs, level)
    g.lint()
    plain = _OutputsAsBefore(torch.fx.GraphModule(gm, g), ep.call_spec.out_spec)  # no input-spec hooks
    return torch.export.export(plain, tuple(examples), {"level": torch.tensor(0, dtype=torch.int64)})


class _OutputsAsBefore(torch.nn.Module):
    """The rewritten graph returns its flat outputs; give them the original program's structure."""

    def __init__(self, gm, out_spec):
        super().__init__()
        self.gm, self.out_spec = gm, out_spec

    def forward(self, *inputs, level):
        from torch.utils import _pytree

        return _pytree.tree_unflatten(list(self.gm(*inputs, level)), self.out_spec)


def _example_of(node) -> torch.Tensor:
    val = node.meta.get("val")
    if val is None:
        raise ValueError(f"input {node.name} has no recorded example shape")
    return torch.zeros([int(s) for s in val.shape], dtype=val.dtype)


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
    p.add_argument("--first-last", type=float, default=None,
                   help="minimum density of the first and last layer at every level (1.0: dense)")
    args = p.parse_args(argv)
    config = PruningConfig(
        densities=tuple(float(s) for s in args.densities.split(",")), scope=args.scope, block=args.block,
        balanced=args.balanced, first_last=args.first_last,
    )
    src = Path(args.model)
    if src.suffix == ".pt2":
        ep = nest_exported(torch.export.load(str(src)), config)
        torch.export.save(ep, args.output)
    elif src.suffix == ".onnx":
        try:
            from .onnx_nest import nest_onnx, prunable_weights
        except ImportError:
            print("tvm-nested nest: ONNX input needs tvm_nested.onnx_nest, which is not available in this "
                  "build; export the model with torch.export (.pt2) instead", file=sys.stderr)
            return 2
        import onnx
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


__all__ = ["Experiment", "load_config", "experiment_from_dict", "run_experiment", "train_main",
           "nest_exported", "nest_main"]
