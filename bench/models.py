"""Nested ResNet-50 at every level vs onnxruntime on the plain dense model, untuned and tuned, CPU.

One nested model (tvm_nested.authoring.zoo.nested, seeded weights) with levels at 50/20/10/5 %
density and one more at 0.1 %: with almost no sparse work left, that level measures what the
module spends outside the sparse FMAs (staging, epilogues, output writes, pooling, the classifier).

Peers, timed in one run, interleaved round by round (each round times every peer once, so load
that drifts during the run hits them alike; the median over rounds counts):
  ort_dense   onnxruntime on the plain dense zoo model (same seeded weights, no level input: the
              nested ONNX would recompute W * (LM >= level) every call)
  untuned     tvm_nested.build(..., "llvm"): every target family's default knobs and schedules
  tuned       the same with --tune N trials per function (tvm_nested.tune into --tuning-log, or a
              temporary log), or with an existing --tuning-log
and, per level, the profile of the (tuned, else untuned) module at 1 thread: time per nested
layer shape and for the dense remainder (tvm_nested.runtime.profile).

Usage: python bench/models.py [--model resnet50] [--threads 1 2] [--tune 16] [--tuning-log DIR]
Writes bench/results/models.{md,json,png}.

With --families [NAME ...]: one row per paper family of tvm_nested.authoring.families (ResNet,
MobileNet, PointNet++, GNMT, GAT, Transformer; small models, nested by prune_model) and level: the
nested module's latency against the stock dense PyTorch model (eager, no_grad, same threads).
Writes bench/results/families.{md,json}. --repeat sets the timing repeats (1 for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import RESULTS, _time_torch, cpu_isa, cpu_model, host_mcpu

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.001)
FAMILY_DENSITIES = (0.5, 0.2, 0.1, 0.05)


def _interleaved(fns: dict, rounds: int) -> dict:
    """name -> median ms of one call, every name timed once per round (after one warm-up call)."""
    for fn in fns.values():
        fn()
    times = defaultdict(list)
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}


def _call(rt, arguments):
    """One call of ``main`` with prepared arguments (no conversion inside the timed call)."""
    return lambda: rt.invoke("main", arguments)


def _shape_groups(profile, layers) -> dict:
    """Profile rows summed per nested layer shape (``conv2d rows x cols``) and the remainder."""
    shape = {lay["kernel"]: f"{lay['op']} {lay['rows']}x{lay['cols']}" for lay in layers}
    out = defaultdict(lambda: [0, 0.0])
    for r in profile.rows:
        key = shape.get(r.function, "dense remainder")
        out[key][0] += 1 if r.layer else r.calls
        out[key][1] += r.ms
    return dict(out)


def families_main(args) -> None:
    """One row per family and level: nested module vs the stock dense PyTorch model."""
    import copy

    import torch

    import tvm_nested
    from tvm_nested.authoring import families
    from tvm_nested.authoring import nn as tnn
    from tvm_nested.authoring.pruning import PruningConfig, prune_model

    names = args.families or sorted(families.FAMILIES)
    print(f"CPU {cpu_model()} ({cpu_isa()}), families {names}, float32, threads {args.threads}", flush=True)
    rows = []
    for name in names:
        dense, inputs = families.build(name)
        nested = prune_model(dense, PruningConfig(FAMILY_DENSITIES))
        t0 = time.perf_counter()
        lib = tvm_nested.build(tvm_nested.from_torch(nested, inputs, {"level": torch.tensor(0)}), "llvm")
        build_s = time.perf_counter() - t0
        rt = lib.runtime()
        feed = [i.numpy() for i in inputs]
        ref = copy.deepcopy(dense)
        ref.load_state_dict(tnn.masked_state_dict(nested, 0))
        with torch.no_grad():
            want = ref.eval()(*inputs).numpy()
        err = float(np.abs(rt.run(*feed, level=0)[0] - want).max() / max(1.0, np.abs(want).max()))
        for threads in args.threads:
            tvm_nested.set_num_threads(threads)
            torch.set_num_threads(threads)
            with torch.no_grad():
                torch_ms = _time_torch(lambda d=dense: d(*inputs), min_s=0.05, repeat=args.repeat)
            for lvl in range(lib.num_levels):
                rt.run(*feed, level=lvl)  # warm-up: first-call costs are not the level's latency
                ms = rt.time(*feed, level=lvl, number=2, repeat=args.repeat)
                row = {
                    "family": name,
                    "threads": threads,
                    "level": lvl,
                    "density": lib.densities[lvl],
                    "nested_ms": ms,
                    "torch_dense_ms": torch_ms,
                    "build_s": build_s,
                    "payload_bytes": lib.payload_bytes,
                    "dense_bytes": lib.dense_bytes,
                    "level0_rel_err": err,
                }
                rows.append(row)
                print(
                    f"  {name} t={threads} L{lvl} density={row['density']:.3f} nested={ms:.3f} ms "
                    f"torch_dense={torch_ms:.3f} ms",
                    flush=True,
                )
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_model(), "isa": cpu_isa(), "dtype": "float32", "threads": args.threads, "repeat": args.repeat}
    (RESULTS / "families.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        "# Paper families: nested (one module, every level) vs stock dense PyTorch",
        "",
        f"CPU {meta['cpu']}, {meta['isa']}, float32, untuned default schedules, {args.repeat} timing repeats. "
        "Small models "
        "(tvm_nested.authoring.families) nested by prune_model; level 0 checked against the stock model.",
        "",
        "| family | threads | level | density | nested ms | torch dense ms | nested / torch | payload KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['family']} | {r['threads']} | {r['level']} | {r['density']:.3f} | {r['nested_ms']:.3f} | "
            f"{r['torch_dense_ms']:.3f} | {r['nested_ms'] / r['torch_dense_ms']:.2f} | "
            f"{r['payload_bytes'] / 1024:.1f} |"
        )
    (RESULTS / "families.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS}/families.md/.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="tune with TRIALS per function first")
    ap.add_argument("--tuning-log", help="the log to tune into / build with (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--families", nargs="*", default=None, help="paper families instead of --model (all if none named)")
    ap.add_argument("--repeat", type=int, default=5, help="--families: timing repeats")
    args = ap.parse_args(argv)
    if args.families is not None:
        families_main(args)
        return

    import tvm

    import tvm_nested
    from tvm_nested.authoring import zoo
    from tvm_nested.authoring.onnx_nest import ort_run, ort_session
    from tvm_nested.runtime.profile import profile

    target = tvm_nested.parse_target("llvm")
    meta = {
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "mcpu": host_mcpu(target),
        "model": args.model,
        "dtype": "float32",
        "batch": 1,
        "threads": args.threads,
        "densities": list(DENSITIES),
        "rounds": args.rounds,
        "load_start": os.getloadavg()[0],
        "tvm": tvm.__version__,
    }
    print(
        f"CPU {meta['cpu']} ({meta['isa']}, llvm -mcpu={meta['mcpu']}), {args.model}, fp32, batch 1, "
        f"threads {args.threads}, load {meta['load_start']:.2f}",
        flush=True,
    )
    dense_model = zoo.load(args.model)
    nested_model = zoo.nested(args.model, densities=DENSITIES)
    feed = zoo.example_input(dense_model)
    ((_in_name, x),) = feed.items()
    mod = tvm_nested.from_onnx(nested_model)
    t0 = time.perf_counter()
    libs = {"untuned": tvm_nested.build(mod, "llvm")}
    meta["build_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        log = args.tuning_log or os.path.join(tmp, "log")
        if args.tune:
            t0 = time.perf_counter()
            tvm_nested.tune(mod, "llvm", log, max_trials=args.tune, progress=False)
            meta["tune_s"] = time.perf_counter() - t0
            meta["tune_trials"] = args.tune
        if args.tune or args.tuning_log:
            libs["tuned"] = tvm_nested.build(mod, "llvm", tuning_log=log)
        lib = libs["untuned"]
        meta.update(
            so_bytes=os.path.getsize(lib.export_library(os.path.join(tmp, "model.so"))),
            payload_bytes=lib.payload_bytes,
            csr_bytes=lib.csr_bytes,
            dense_bytes=lib.dense_bytes,
            onnx_dense_bytes=dense_model.ByteSize(),
        )
    rts = {name: lb.runtime() for name, lb in libs.items()}
    # numerics: every level of every build against onnxruntime on the nested model (masked dense)
    errs = {}
    for name, rt in rts.items():
        for lvl in range(lib.num_levels):
            ref = ort_run(nested_model, [x], level=lvl)[0]
            got = rt.run(x, level=lvl)[0]
            errs[f"{name} L{lvl}"] = float(np.abs(got - ref).max() / max(1e-12, np.abs(ref).max()))
    meta["max_rel_err_vs_ort"] = max(errs.values())

    rows = []
    for threads in args.threads:
        tvm_nested.set_num_threads(threads)
        sess = ort_session(dense_model, threads=threads)
        fns = {"ort_dense": lambda sess=sess: sess.run(None, feed)}
        for name, rt in rts.items():
            for lvl in range(lib.num_levels):
                fns[f"{name} L{lvl}"] = _call(rt, rt.arguments([x], lvl))
        ms = _interleaved(fns, args.rounds)
        for lvl in range(lib.num_levels):
            row = {"threads": threads, "level": lvl, "density": lib.densities[lvl], "ort_dense_ms": ms["ort_dense"]}
            for name in rts:
                row[f"{name}_ms"] = ms[f"{name} L{lvl}"]
            rows.append(row)
            print(
                f"  t={threads} L{lvl} density={row['density']:.3f} ort_dense={row['ort_dense_ms']:.2f} ms "
                + " ".join(f"{n}={row[f'{n}_ms']:.2f} ms ({row['ort_dense_ms'] / row[f'{n}_ms']:.2f}x)" for n in rts),
                flush=True,
            )

    # where the time goes, 1 thread, the best build
    best = "tuned" if "tuned" in rts else "untuned"
    tvm_nested.set_num_threads(1)
    profiles = [profile(rts[best], [x], lvl, repeat=5) for lvl in range(lib.num_levels)]
    groups = [_shape_groups(p, libs[best].info["layers"]) for p in profiles]
    meta["load_end"] = os.getloadavg()[0]
    _write(meta, rows, list(rts), best, profiles, groups)


def _write(meta, rows, builds, best, profiles, groups) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "models.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "rows": rows,
                "profile": [{"level": p.level, "total_ms": p.total_ms, "groups": g} for p, g in zip(profiles, groups)],
            },
            indent=1,
        )
    )
    tuned = (
        f"tuned: {meta['tune_trials']} trials per function, {meta['tune_s']:.0f} s"
        if "tune_s" in meta
        else ("tuned: from an existing log" if "tuned" in builds else "untuned only")
    )
    md = [
        f"# {meta['model']}: nested (one module, every level) vs onnxruntime dense",
        "",
        f"CPU {meta['cpu']}, **{meta['isa']}** (llvm -mcpu={meta['mcpu']}); float32, batch 1; "
        f"median of {meta['rounds']} interleaved rounds; load average {meta['load_start']:.2f} at start, "
        f"{meta['load_end']:.2f} at end (2-core machine, shared). TVM {meta['tvm']}; {tuned}.",
        "",
        f"Module: exported .so {meta['so_bytes'] / 2**20:.1f} MiB; nested payload {meta['payload_bytes'] / 2**20:.1f} "
        f"MiB (plain CSR of level 0: {meta['csr_bytes'] / 2**20:.1f} MiB, dense weights "
        f"{meta['dense_bytes'] / 2**20:.1f} MiB; dense ONNX {meta['onnx_dense_bytes'] / 2**20:.1f} MiB). "
        f"Every level of every build vs onnxruntime on the nested model: max rel. error "
        f"{meta['max_rel_err_vs_ort']:.1e}.",
        "",
        "The last level (0.1 % density) leaves almost no sparse work: it is the module's cost outside the sparse FMAs.",
        "",
        "| threads | level | density | ort dense ms | " + " | ".join(f"{b} ms | {b} speedup" for b in builds) + " |",
        "|---|---|---|---|" + "---|---|" * len(builds),
    ]
    for r in rows:
        md.append(
            f"| {r['threads']} | {r['level']} | {r['density']:.3f} | {r['ort_dense_ms']:.2f} | "
            + " | ".join(f"{r[f'{b}_ms']:.2f} | {r['ort_dense_ms'] / r[f'{b}_ms']:.2f}x" for b in builds)
            + " |"
        )
    keys = sorted({k for g in groups for k in g}, key=lambda k: -max(g.get(k, (0, 0))[1] for g in groups))
    md += [
        "",
        f"## Where the time goes ({best} build, 1 thread, ms per call; tvm_nested.runtime.profile)",
        "",
        "| layer shape (rows x cols) | calls | " + " | ".join(f"L{p.level}" for p in profiles) + " |",
        "|---|---|" + "---|" * len(profiles),
        "| **total** (uninstrumented) | | " + " | ".join(f"**{p.total_ms:.2f}**" for p in profiles) + " |",
    ]
    for k in keys:
        calls = max(g.get(k, (0, 0))[0] for g in groups)
        md.append(f"| {k} | {calls} | " + " | ".join(f"{g.get(k, (0, 0.0))[1]:.3f}" for g in groups) + " |")
    (RESULTS / "models.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for threads in meta["threads"]:
        sel = [r for r in rows if r["threads"] == threads]
        d = [r["density"] * 100 for r in sel]
        for b in builds:
            ax.plot(d, [r[f"{b}_ms"] for r in sel], marker="o", label=f"nested {b}, {threads}T")
        color = ax.lines[-1].get_color()
        ax.axhline(sel[0]["ort_dense_ms"], linestyle="--", color=color, label=f"ort dense, {threads}T")
    ax.set_xscale("log")
    ax.set_xlabel("density % (log)")
    ax.set_ylabel("ms (batch 1)")
    ax.set_title(f"{meta['model']}, {meta['isa']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "models.png", dpi=90)
    print(f"wrote {RESULTS}/models.md/.json/.png")


if __name__ == "__main__":
    main()
