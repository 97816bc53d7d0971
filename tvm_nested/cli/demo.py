"""The main job on an embedded default: a model-zoo architecture, nested, compiled once, every level
checked against onnxruntime running the masked dense model.

    tvm-nested demo                       # ResNet-50 (onnx package's model-zoo copy, seeded weights)
    tvm-nested demo --model squeezenet --densities 0.5,0.2,0.1,0.05
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ..authoring.onnx_nest import ort_run, ort_session
from ..authoring.zoo import load as load_dense
from ..authoring.zoo import nested
from ..build import build
from ..contract import LEVEL
from ..frontend import from_onnx
from ..runtime import load, set_num_threads

DEFAULT_MODEL = "resnet50"
DEFAULT_DENSITIES = (0.5, 0.2, 0.1, 0.05)


def _step(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def _median_ms(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def run_demo(
    model: str = DEFAULT_MODEL,
    densities=DEFAULT_DENSITIES,
    *,
    seed: int = 0,
    threads: int | None = None,
    target: str = "llvm",
    repeat: int = 5,
    out=None,
) -> list[dict]:
    """Nest, compile once, run and check every level; print and return the table rows."""
    t0 = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    set_num_threads(threads)
    _step(
        f"loading {model} from the onnx package's model zoo, seeded weights (seed {seed}), "
        f"nesting at densities {list(densities)}",
        t0,
    )
    onnx_model = nested(model, densities=densities, seed=seed)
    inputs = [
        i
        for i in onnx_model.graph.input
        if i.name != LEVEL and i.name not in {init.name for init in onnx_model.graph.initializer}
    ]
    rng = np.random.default_rng(seed)
    feeds = [rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype("float32") for i in inputs]

    _step("importing into Relax (tvm.relax.frontend.onnx)", t0)
    mod = from_onnx(onnx_model)
    _step(f"building ONE module for every level (target {target!r})", t0)
    lib = build(mod, target=target)
    with tempfile.TemporaryDirectory() as tmp:
        so = lib.export_library(os.path.join(tmp, f"{model}-nested.so"))
        module_bytes = os.path.getsize(so)
        _step(f"exported {module_bytes / 2**20:.1f} MiB; reloading it", t0)
        rt = load(so)
    dense_mb = lib.dense_bytes / 2**20
    _step(f"timing onnxruntime on the plain dense {model} (same weights, no level input), {threads} thread(s)", t0)
    names = [i.name for i in inputs]
    sess = ort_session(load_dense(model, seed), threads=threads)
    ort_ms = _median_ms(lambda: sess.run(None, dict(zip(names, feeds))), repeat)
    rows = []
    for level in range(lib.num_levels):
        _step(f"level {level}: running TVM and onnxruntime (the masked dense model)", t0)
        got = rt.run(*feeds, level=level)
        ref = ort_run(onnx_model, dict(zip([i.name for i in inputs], feeds)), level=level)
        err = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref))
        scale = max(float(np.max(np.abs(r))) for r in ref) or 1.0
        ms = float(np.median(rt.time_function("main", rt.arguments(feeds, level), number=1, repeat=repeat))) * 1e3
        rows.append(
            {
                "level": level,
                "density": lib.densities[level],
                "max_abs_err": err,
                "rel_err": err / scale,
                "latency_ms": ms,
                "ort_dense_ms": ort_ms,
                "speedup_vs_ort": ort_ms / ms,
            }
        )
    lines = [
        f"\n{model}: {lib.num_levels} levels in one module, target {target}, {threads} TVM thread(s), fp32, batch "
        f"{feeds[0].shape[0]}",
        f"weights: dense {dense_mb:.1f} MiB | nested payload {lib.payload_bytes / 2**20:.1f} MiB "
        f"({lib.payload_bytes / max(lib.csr_bytes, 1):.3f}x a plain CSR of level 0) | "
        f"module file {module_bytes / 2**20:.1f} MiB",
        "",
        f"onnxruntime on the plain dense model: {_ms(ort_ms)} ms (median of {repeat}, same run, same threads)",
        "",
        "| level | density | max abs err vs onnxruntime | rel. to output scale | latency (ms) | vs onnxruntime dense |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['level']} | {r['density']:.1%} | {r['max_abs_err']:.2e} | {r['rel_err']:.2e} "
            f"| {_ms(r['latency_ms'])} | {r['speedup_vs_ort']:.2f}x |"
        )
    ok = all(r["rel_err"] <= 1e-4 for r in rows)
    lines.append(f"\nevery level matches onnxruntime (rel. err <= 1e-4): {'yes' if ok else 'NO'}")
    print("\n".join(lines), file=out, flush=True)
    if not ok:
        raise SystemExit(1)
    return rows


def _ms(v: float) -> str:
    """Three significant digits or more: a small model's 0.3 ms must not print as 0.3 (the ratios
    beside it are computed unrounded)."""
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"
