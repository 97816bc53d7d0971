"""Nested sparse kernels on an NVIDIA GPU: every level against torch dense and torch CSR.

    .venv/bin/python bench/gpu.py [--out bench/results] [--repeat 50]
    .venv/bin/python bench/gpu.py --build-only --arch sm_80     # no GPU needed: build every workload

Workloads (fp32, batch 1, inference shapes):
* linear 4096 -> 4096 (a GEMV, the case sparse weights help most),
* conv2d 3x3 128 -> 128 on 28x28 and a 1x1 conv 256 -> 64 on 28x28,
each nested by magnitude with level densities 0.5 / 0.2 / 0.1 / 0.05.
For each level: our kernel (``schedules.cuda`` schedule, level chosen at run time by one compiled
kernel), torch dense with the level's masked weight (cuBLAS / cuDNN), and torch CSR of the level's
weight (``torch.sparse.mm``; conv through im2col). Every result is checked against torch dense
before it is timed. Times: median of ``--repeat`` runs, ms, measured on the device (TVM's
time_evaluator, CUDA events for torch).

Writes ``gpu.md`` and ``gpu.json`` to ``--out``. With no usable GPU it exits with status 2 and a
message, writing nothing: there are no made-up numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSITIES = (0.5, 0.2, 0.1, 0.05)
WORKLOADS = {  # name -> (op, params)
    "linear-4096x4096": ("linear", {"rows": 4096, "cols": 4096, "batch": 1}),
    "conv3x3-128x128-28": ("conv2d", {"o": 128, "c": 128, "hw": 28, "k": 3, "pad": 1}),
    "conv1x1-256x64-28": ("conv2d", {"o": 64, "c": 256, "hw": 28, "k": 1, "pad": 0}),
}


def gpu_probe() -> tuple[bool, str]:
    """(usable, why not) for both torch.cuda and TVM's CUDA runtime. Never raises."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)"
    except Exception as err:
        return False, f"torch is not usable: {err}"
    try:
        import tvm

        if not tvm.cuda(0).exist:
            return False, "TVM sees no CUDA device (tvm.cuda(0).exist is False)"
    except Exception as err:
        return False, f"TVM has no CUDA runtime: {err}"
    return True, ""


def _levels(weight: np.ndarray, densities=DENSITIES) -> np.ndarray:
    """A magnitude level map: level l keeps the largest ``densities[l]`` fraction of weights."""
    flat = np.abs(weight).ravel()
    order = np.argsort(-flat, kind="stable")
    lm = np.full(flat.size, -1, np.int32)
    for lvl, d in enumerate(densities):
        lm[order[: round(d * flat.size)]] = lvl
    return lm.reshape(weight.shape)


def make_workload(name: str, seed: int = 0):
    """(PrimFunc, host inputs without level/out, output shape, weight2d, level map2d, conv params)."""
    from tvm_nested.schedules import Conv2dSpec, LinearSpec, NestedCSR, Packed, kernel

    op, p = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    if op == "linear":
        w = rng.standard_normal((p["rows"], p["cols"])).astype(np.float32)
        lm = _levels(w)
        fmt = NestedCSR.pack(w, lm, len(DENSITIES))
        func = kernel(LinearSpec(Packed.of(fmt), p["batch"]))
        x = rng.standard_normal((p["batch"], p["cols"])).astype(np.float32)
        return func, fmt, x, (p["batch"], p["rows"]), w, lm
    k, pad = p["k"], p["pad"]
    w = rng.standard_normal((p["o"], p["c"] * k * k)).astype(np.float32)
    lm = _levels(w)
    fmt = NestedCSR.pack(w, lm, len(DENSITIES))
    shape = (1, p["c"], p["hw"], p["hw"])
    spec = Conv2dSpec(Packed.of(fmt), shape, (k, k), (1, 1), (pad,) * 4)
    func, out = kernel(spec), spec.out_shape
    x = rng.standard_normal(shape).astype(np.float32)
    return func, fmt, x, out, w, lm


def build_kernel(func, arch: str):
    import tvm

    from tvm_nested.schedules.cuda import schedule_cuda
    from tvm_nested.target import parse_target

    target = parse_target({"kind": "cuda", "arch": arch})
    return tvm.compile(schedule_cuda(func, target), target=target)


def _torch_ms(fn, repeat: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def bench_workload(name: str, arch: str, repeat: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import tvm

    op, p = WORKLOADS[name]
    func, fmt, x, out_shape, w, lm = make_workload(name)
    ex = build_kernel(func, arch)
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (x, *fmt.arrays())]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    timer = ex.mod.time_evaluator("main", dev, number=10, repeat=repeat)
    xt = torch.from_numpy(x).cuda()
    rows = []
    for level in range(len(DENSITIES)):
        w_eff = torch.from_numpy(w * (lm >= level)).cuda()
        lvl = tvm.runtime.tensor(np.array(level, np.int32), dev)
        ex["main"](*args, lvl, out)
        if op == "linear":
            dense = lambda: F.linear(xt, w_eff)
            csr = w_eff.to_sparse_csr()
            sparse = lambda: torch.sparse.mm(csr, xt.t()).t()
        else:
            k, pad = p["k"], p["pad"]
            w4 = w_eff.reshape(p["o"], p["c"], k, k)
            dense = lambda: F.conv2d(xt, w4, padding=pad)
            csr = w_eff.to_sparse_csr()
            oh = out_shape[2]

            def sparse():
                cols = F.unfold(xt, k, padding=pad)[0]  # [C*k*k, OH*OW]
                return torch.sparse.mm(csr, cols).reshape(1, p["o"], oh, -1)

        want = dense().cpu().numpy()
        scale = max(1.0, float(np.abs(want).max()))
        for label, got in (("ours", out.numpy()), ("torch-csr", sparse().cpu().numpy())):
            err = float(np.abs(got.reshape(want.shape) - want).max())
            if err > 1e-3 * scale:
                raise AssertionError(f"{name} level {level}: {label} differs from torch dense by {err}")
        ours = float(np.median(timer(*args, lvl, out).results) * 1e3)
        rows.append(
            {
                "workload": name,
                "level": level,
                "density": float(fmt.density(level)),
                "ours_ms": ours,
                "torch_dense_ms": _torch_ms(dense, repeat),
                "torch_csr_ms": _torch_ms(sparse, repeat),
            }
        )
    return rows


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        f"# Nested sparse kernels on {meta['device']} ({meta['arch']})",
        "",
        f"TVM {meta['tvm']}, torch {meta['torch']}, CUDA {meta['cuda']}; median of "
        f"{meta['repeat']} runs, ms, batch 1, fp32. One compiled kernel per workload serves "
        "every level (the level is a run-time argument).",
        "",
        "| workload | level | density | ours (ms) | torch dense (ms) | torch CSR (ms) | vs dense | vs CSR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['level']} | {r['density']:.3f} | {r['ours_ms']:.4f} "
            f"| {r['torch_dense_ms']:.4f} | {r['torch_csr_ms']:.4f} "
            f"| {r['torch_dense_ms'] / r['ours_ms']:.2f}x | {r['torch_csr_ms'] / r['ours_ms']:.2f}x |"
        )
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument(
        "--workload", action="append", choices=sorted(WORKLOADS), help="run only these workloads (default: all)"
    )
    ap.add_argument(
        "--build-only", action="store_true", help="build every workload's kernel for --arch and exit (no GPU needed)"
    )
    ap.add_argument("--arch", default=None, help="sm_XY; default: the GPU's own")
    args = ap.parse_args(argv)
    names = args.workload or list(WORKLOADS)

    if args.build_only:
        arch = args.arch or "sm_80"
        for name in names:
            t0 = time.time()
            build_kernel(make_workload(name)[0], arch)
            print(f"built {name} for {arch} in {time.time() - t0:.1f}s")
        return 0

    ok, why = gpu_probe()
    if not ok:
        print(
            f"bench/gpu.py: no usable GPU here ({why}); nothing measured, no results written. "
            "Run it on a machine with an NVIDIA GPU, CUDA-enabled torch and TVM's CUDA runtime "
            "(cuda-bindings for NVRTC, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc).",
            file=sys.stderr,
        )
        return 2

    import torch
    import tvm

    major, minor = tvm.cuda(0).compute_version.split(".")
    arch = args.arch or f"sm_{major}{minor}"
    rows = []
    for name in names:
        rows += bench_workload(name, arch, args.repeat)
        print(f"{name}: done")
    meta = {
        "device": torch.cuda.get_device_name(0),
        "arch": arch,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "repeat": args.repeat,
        "host": platform.node(),
    }
    write_results(rows, meta, args.out)
    print(f"wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
