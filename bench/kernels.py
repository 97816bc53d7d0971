"""Nested sparse kernels side by side with dense and CSR peers, on CPU, in one run.

Workloads: ResNet-50 1x1 and 3x3 convs (several stages), GNMT-like LSTM gate matmuls (4096x1024 at
batch 1 and 8), a PointNet-like shared MLP (64->128->1024 over 1024 points, as linears). One nested
weight per workload with levels at 50/20/10/5% density (random level map, seeded).

Peers per workload and level:
  nested      our kernel at that level, default CPU schedule (schedules/cpu.py), untuned
  tvm_dense   TVM dense op on the masked weight, scheduled by schedules/cpu_dense.py (untuned)
  torch_dense torch.nn.functional.conv2d / linear on the masked weight
  torch_csr   torch.sparse_csr weight @ (im2col'd) input
  scipy_csr   scipy.sparse.csr_matrix weight @ (im2col'd) input (scipy is single-threaded)
  ideal       min(dense times) x density
Tuned nested kernels are not measured here (tvm_nested.tuning takes minutes per workload): see
bench/README.md.

Usage: python bench/kernels.py [--threads 1 2] [--quick]
Writes bench/results/kernels.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DENSITIES = (0.5, 0.2, 0.1, 0.05)

# name -> (kind, params); conv: (C, O, HW, k, stride, pad); linear: (rows=out, cols=in, batch)
WORKLOADS = {
    "rn50_s1_1x1_256-64_56": ("conv", (256, 64, 56, 1, 1, 0)),
    "rn50_s1_3x3_64_56": ("conv", (64, 64, 56, 3, 1, 1)),
    "rn50_s3_1x1_1024-256_14": ("conv", (1024, 256, 14, 1, 1, 0)),
    "rn50_s3_3x3_256_14": ("conv", (256, 256, 14, 3, 1, 1)),
    "rn50_s4_3x3_512_7": ("conv", (512, 512, 7, 3, 1, 1)),
    "gnmt_gates_4096x1024_b1": ("linear", (4096, 1024, 1)),
    "gnmt_gates_4096x1024_b8": ("linear", (4096, 1024, 8)),
    "pointnet_mlp_64-128_n1024": ("linear", (128, 64, 1024)),
    "pointnet_mlp_128-1024_n1024": ("linear", (1024, 128, 1024)),
}
QUICK = ["rn50_s1_1x1_256-64_56", "rn50_s4_3x3_512_7", "gnmt_gates_4096x1024_b1", "pointnet_mlp_64-128_n1024"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> str:
    """The vector ISA the host offers (what the llvm target compiles for): AVX-512 / AVX2 / NEON."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if "avx512f" in flags:
        return "AVX-512" + (" (VNNI)" if "avx512_vnni" in flags else "")
    if "avx2" in flags:
        return "AVX2"
    if "asimd" in flags or "neon" in flags:
        return "NEON"
    return platform.machine()


def host_mcpu(target) -> str:
    return str(target.attrs.get("mcpu", "generic"))


def _level_map(shape, rng) -> np.ndarray:
    """Level l keeps the weights with r < DENSITIES[l] (nested by construction)."""
    r = rng.random(shape)
    lm = np.full(shape, -1, np.int32)
    for lvl, d in enumerate(DENSITIES):
        lm[r < d] = lvl
    return lm


def _time_torch(fn, min_s=0.03, repeat=5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_s:
                break
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)) * 1e3


def _time_tvm(ex, args, name="main") -> float:
    import tvm

    f = ex.mod.time_evaluator(name, tvm.cpu(), number=3, repeat=5, min_repeat_ms=30)
    return float(np.median(f(*args).results)) * 1e3


def _time_vm(ex, args) -> float:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    f = vm.time_evaluator("main", tvm.cpu(), number=3, repeat=5, min_repeat_ms=30)
    return float(np.median(f(*args).results)) * 1e3


def _tvm_dense(kind, p, x, w_eff, target):
    """A Relax conv2d / matmul on the masked dense weight, default dense schedule, compiled."""
    import tvm
    from tvm import relax

    from tvm_nested.pipeline import pipeline

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    wv = relax.Var("w", relax.TensorType(w_eff.shape, "float32"))
    with bb.function("main", [xv, wv]):
        with bb.dataflow():
            if kind == "conv":
                _, _, _, _, s, pad = p
                y = bb.emit(relax.op.nn.conv2d(xv, wv, strides=(s, s), padding=(pad, pad)))
            else:
                y = bb.emit(relax.op.matmul(xv, relax.op.permute_dims(wv, [1, 0])))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with target, tvm.transform.PassContext(opt_level=3):  # legalized and scheduled as build does
        return tvm.compile(bb.get(), target=target, relax_pipeline=pipeline(target, start_at="legalize"))


def bench_workload(name, target, threads, rng, seed_offset=0):
    import scipy.sparse as sp
    import torch
    import torch.nn.functional as F
    import tvm

    from tvm_nested.schedules import (
        Conv2dSpec,
        LinearSpec,
        NestedCSR,
        Packed,
        default_knobs,
        nested_conv2d_ref,
        nested_linear_ref,
    )
    from tvm_nested.schedules.cpu import cpu_kernel

    kind, p = WORKLOADS[name]
    if kind == "conv":
        C, O, HW, k, s, pad = p
        w = rng.standard_normal((O, C, k, k)).astype(np.float32)
        x = rng.standard_normal((1, C, HW, HW)).astype(np.float32)
        lm = _level_map(w.shape, rng)
        fmt = NestedCSR.pack(w.reshape(O, -1), lm.reshape(O, -1), len(DENSITIES))
        spec = Conv2dSpec(Packed.of(fmt), x.shape, (k, k), (s, s), (pad,) * 4)
        out_shape = spec.out_shape
    else:
        M, K, B = p
        w = rng.standard_normal((M, K)).astype(np.float32)
        x = rng.standard_normal((B, K)).astype(np.float32)
        lm = _level_map(w.shape, rng)
        fmt = NestedCSR.pack(w, lm, len(DENSITIES))
        spec, out_shape = LinearSpec(Packed.of(fmt), B), (B, M)
    # the CPU form an untuned build compiles: packed for its default knobs on this target
    func, packed = cpu_kernel(spec, fmt, default_knobs(spec, target))
    ex = tvm.compile(func, target=target)
    base = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in packed.arrays()]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))

    # peers' inputs: im2col for the CSR peers of a conv (its time is included)
    xt = torch.from_numpy(x)
    if kind == "conv":

        def cols_t():
            return F.unfold(xt, k, padding=pad, stride=s)[0]  # [C*k*k, OH*OW]

    dense_ex = _tvm_dense(kind, p, x, w, target)  # the masked weight is an argument
    rows = []
    for lvl, dens in enumerate(DENSITIES):
        w_eff = (w * (lm >= lvl)).astype(np.float32)
        lvl_t = tvm.runtime.tensor(np.array(lvl, np.int32))
        ex["main"](*base, lvl_t, out)
        got = out.numpy()
        if kind == "conv":
            ref = nested_conv2d_ref(x, (w, lm), lvl, (k, k), (s, s), (pad,) * 4, (1, 1), 1)
        else:
            ref = nested_linear_ref(x, (w, lm), lvl)
        err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
        if err > 1e-3:
            raise AssertionError(f"{name} level {lvl}: nested kernel differs from reference ({err})")
        t = {"nested": _time_tvm(ex, [*base, lvl_t, out])}
        t["tvm_dense"] = _time_vm(dense_ex, [tvm.runtime.tensor(x), tvm.runtime.tensor(w_eff)])
        wt = torch.from_numpy(w_eff)
        w2 = w_eff.reshape(w_eff.shape[0], -1)
        wcsr_t = torch.from_numpy(w2).to_sparse_csr()
        wcsr_s = sp.csr_matrix(w2)
        with torch.no_grad():
            if kind == "conv":
                t["torch_dense"] = _time_torch(lambda: F.conv2d(xt, wt, stride=s, padding=pad))
                t["torch_csr"] = _time_torch(lambda: wcsr_t @ cols_t())
                t["scipy_csr"] = _time_torch(lambda: wcsr_s @ cols_t().numpy())
            else:
                xT = np.ascontiguousarray(x.T)
                xTt = torch.from_numpy(xT)
                t["torch_dense"] = _time_torch(lambda: F.linear(xt, wt))
                t["torch_csr"] = _time_torch(lambda: wcsr_t @ xTt)
                t["scipy_csr"] = _time_torch(lambda: wcsr_s @ xT)
        rows.append(
            {
                "workload": name,
                "kind": kind,
                "threads": threads,
                "level": lvl,
                "density": float(fmt.density(lvl)),
                "target_density": dens,
                "ms": t,
            }
        )
    best_dense = min(min(r["ms"]["tvm_dense"], r["ms"]["torch_dense"]) for r in rows[:1])
    for r in rows:
        r["ms"]["ideal"] = best_dense * r["density"]
        print(
            f"  {name:30s} t={threads} L{r['level']} d={r['density']:.3f} "
            + " ".join(f"{k}={v:.3f}" for k, v in r["ms"].items()),
            flush=True,
        )
    return rows


PEERS = ["nested", "tvm_dense", "torch_dense", "torch_csr", "scipy_csr", "ideal"]


def write_results(rows, meta, stem="kernels"):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Nested kernels vs peers ({stem})",
        "",
        f"CPU: {meta['cpu']}, {meta.get('isa', '?')} (llvm -mcpu={meta.get('mcpu', '?')}); "
        f"dtype {meta['dtype']}; batch as named (linear: rows x cols, "
        f"batch b / points n; conv: batch 1, NCHW); load average at start {meta['load_start']}, "
        f"at end {meta['load_end']}. Times in ms (median); nested = default schedule, untuned.",
        "",
    ]
    for threads in meta["threads"]:
        lines += [
            f"## {threads} thread(s)",
            "",
            "| workload | level | density | " + " | ".join(PEERS) + " | nested / best dense |",
            "|---|---|---|" + "---|" * (len(PEERS) + 1),
        ]
        for r in rows:
            if r["threads"] != threads:
                continue
            ms = r["ms"]
            best = min(ms["tvm_dense"], ms["torch_dense"])
            lines.append(
                f"| {r['workload']} | {r['level']} | {r['density']:.3f} | "
                + " | ".join(f"{ms[p]:.3f}" for p in PEERS)
                + f" | {ms['nested'] / best:.2f} |"
            )
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(
        len(meta["threads"]), len(names), figsize=(3.2 * len(names), 3.2 * len(meta["threads"])), squeeze=False
    )
    for i, threads in enumerate(meta["threads"]):
        for j, name in enumerate(names):
            ax = axes[i][j]
            sel = [r for r in rows if r["threads"] == threads and r["workload"] == name]
            dens = [r["density"] * 100 for r in sel]
            for peer in PEERS:
                ax.plot(
                    dens,
                    [r["ms"][peer] for r in sel],
                    marker="o",
                    label=peer,
                    linestyle="--" if peer == "ideal" else "-",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}\n{threads} thread(s)", fontsize=7)
            ax.set_xlabel("density %", fontsize=7)
            ax.set_ylabel("ms", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="four workloads (script check)")
    ap.add_argument("--stem", default="kernels", help="results file stem")
    args = ap.parse_args(argv)

    import torch
    import tvm

    import tvm_nested

    target = tvm_nested.parse_target("llvm")
    names = QUICK if args.quick else list(WORKLOADS)
    meta = {
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "mcpu": host_mcpu(target),
        "target": str(target),
        "dtype": "float32",
        "threads": args.threads,
        "densities": list(DENSITIES),
        "workloads": {n: WORKLOADS[n] for n in names},
        "load_start": os.getloadavg()[0],
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "tuned": "not measured (default schedule only)",
    }
    print(
        f"CPU {meta['cpu']} ({meta['isa']}, llvm -mcpu={meta['mcpu']}), dtype float32, "
        f"threads {args.threads}, load {meta['load_start']:.2f}",
        flush=True,
    )
    rows = []
    for threads in args.threads:
        tvm_nested.set_num_threads(threads)
        torch.set_num_threads(threads)
        for i, name in enumerate(names):
            rows += bench_workload(name, target, threads, np.random.default_rng(i))
    meta["load_end"] = os.getloadavg()[0]
    write_results(rows, meta, args.stem)
    print(f"wrote {RESULTS}/{args.stem}.md/.json/.png (load at end {meta['load_end']:.2f})")


if __name__ == "__main__":
    main()
