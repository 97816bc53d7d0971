"""A configured nested-training experiment (``tvm-nested train --config``): dense baseline,
progressive nested pruning with joint training, evaluation per level. See ``examples/digits.json``;
unknown keys are refused."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .pruning import PruningConfig, level_stats, prune_model
from .training import TrainConfig, digits_cnn, digits_data, evaluate, train_dense, train_nested


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
    dense: TrainConfig = field(default_factory=TrainConfig)
    nested: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)


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
        log(
            f"level {s['level']}: accuracy {s['accuracy']:.4f}, weights {100 * s['weights']:.2f}%, "
            f"FLOPs {100 * s['flops']:.2f}%"
        )
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


__all__ = ["TASKS", "Experiment", "experiment_from_dict", "load_config", "run_experiment"]
