"""Accuracy per level of a nested sparse CNN on scikit-learn's digits (held-out split), vs dense.

    .venv/bin/python bench/accuracy.py [--config examples/digits.json] [--out bench/results]

Trains the dense baseline, prunes it progressively into nested levels (densest first) with joint
training of every level (tvm_nested.authoring.training), and writes accuracy.md (table), accuracy.png
(accuracy vs % FLOPs per level) and accuracy.json. Seeded: the same config gives the same numbers
on the same machine and torch build. Threads come from the config (2 by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm_nested.cli.train import load_config, run_experiment  # noqa: E402

# paper targets (Grimaldi et al., arXiv 2112.10930) restated as this benchmark's pass criteria
TARGETS = [
    {"weights": 0.13, "max_drop_points": 0.5, "what": "~13% of weights within 0.5 points of dense"},
    {"weights": 0.05, "max_rel_drop": 0.02, "what": "~5% of weights within 2% relative of dense"},
]


def _closest(levels, weights):
    return min(levels, key=lambda s: abs(s["weights"] - weights))


def check_targets(results) -> list[dict]:
    dense = results["dense_accuracy"]
    out = []
    for t in TARGETS:
        s = _closest(results["levels"], t["weights"])
        drop = dense - s["accuracy"]
        ok = drop * 100 <= t["max_drop_points"] if "max_drop_points" in t else drop / dense <= t["max_rel_drop"]
        out.append(
            {
                "target": t["what"],
                "level": s["level"],
                "weights": s["weights"],
                "accuracy": s["accuracy"],
                "drop_points": 100 * drop,
                "met": bool(ok),
            }
        )
    return out


def markdown(results, checks) -> str:
    dense = results["dense_accuracy"]
    cfg = results["config"]
    lines = [
        "# Nested sparse CNN on digits: accuracy per level",
        "",
        f"scikit-learn digits, stratified held-out split ({results['split']['train']} train / "
        f"{results['split']['test']} test, seed {results['split']['seed']}); CNN width {cfg['width']}; "
        f"pruning {cfg['pruning']}; torch {results['torch']}, {results['threads']} threads; "
        f"runtime {results['runtime_s']['total']:.0f} s.",
        "",
        "| model | accuracy (%) | Δ vs dense (points) | weights (%) | FLOPs (%) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| dense | {100 * dense:.2f} | 0.00 | 100.00 | 100.00 |",
    ]
    for s in results["levels"]:
        lines.append(
            f"| level {s['level']} | {100 * s['accuracy']:.2f} | {100 * (s['accuracy'] - dense):+.2f} | "
            f"{100 * s['weights']:.2f} | {100 * s['flops']:.2f} |"
        )
    lines += [
        "",
        "Weights: kept Conv/Linear weights over all of them; FLOPs: multiply-adds of every Conv/Linear "
        "at that level over the dense model's.",
        "",
        "| target | level | weights (%) | Δ (points) | met |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for c in checks:
        lines.append(
            f"| {c['target']} | {c['level']} | {100 * c['weights']:.2f} | {-c['drop_points']:+.2f} | "
            f"{'yes' if c['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    xs = [100 * s["flops"] for s in results["levels"]]
    ys = [100 * s["accuracy"] for s in results["levels"]]
    ax.plot(xs, ys, "o-", label="nested levels")
    for s, x, y in zip(results["levels"], xs, ys):
        ax.annotate(f"L{s['level']} ({100 * s['weights']:.0f}% w)", (x, y), textcoords="offset points", xytext=(4, -12))
    ax.axhline(100 * results["dense_accuracy"], color="gray", ls="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (% of dense, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("digits CNN: accuracy vs FLOPs per level")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "digits.json"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _, results = run_experiment(load_config(args.config), progress=not args.no_progress)
    checks = check_targets(results)
    results["targets"] = checks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2))
    (out / "accuracy.md").write_text(markdown(results, checks))
    plot(results, out / "accuracy.png")
    print(markdown(results, checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
