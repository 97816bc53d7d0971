"""Nested ResNet-50 (tvm_nested.authoring.zoo.nested, seeded weights) at every level vs dense peers, CPU.

Peers:
  nested       the one compiled module (tvm_nested.build(..., "llvm"), default schedules, untuned)
               at each level; module size = exported .so, payload = packed nested weights
  ort_dense    onnxruntime on the dense zoo model (same seeded weights, no level input)
  torch_dense  torch conv2d/linear on the same list of conv and gemm layers only (no BN, pooling,
               ReLU, residual adds: onnx2torch/torchvision are not installed), a lower bound for a
               whole torch model
Usage: python bench/models.py [--threads 1 2] [--model resnet50]
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import RESULTS, _time_torch, cpu_model

DENSITIES = (0.5, 0.2, 0.1, 0.05)


def _conv_gemm_layers(model):
    """(kind, weight, input shape, attrs) of every Conv and Gemm of an ONNX model (shape-inferred)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(model)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    shapes = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    layers = []
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in init:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layers.append((node.op_type, init[node.input[1]].astype(np.float32), shapes.get(node.input[0]), attrs))
    return layers


def _torch_layers_ms(layers, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    calls = []
    for kind, w, shape, attrs in layers:
        x = torch.randn(*shape)
        wt = torch.from_numpy(w)
        if kind == "Conv":
            pads = attrs.get("pads", [0, 0, 0, 0])
            strides, groups = attrs.get("strides", [1, 1]), attrs.get("group", 1)
            calls.append(
                lambda x=x, wt=wt, s=strides, p=pads[:2], g=groups: F.conv2d(x, wt, stride=s, padding=p, groups=g)
            )
        else:
            if attrs.get("transB", 0) == 0:
                wt = wt.T.contiguous()
            calls.append(lambda x=x, wt=wt: F.linear(x, wt))

    def run_all():
        with torch.no_grad():
            for c in calls:
                c()

    return _time_torch(run_all, min_s=0.2, repeat=5)


def families_main(args) -> None:
    """One row per family and level: nested module vs the stock dense PyTorch model."""
    import copy

    import torch

    import tvm_nested
    from tvm_nested.authoring import families
    from tvm_nested.authoring import nn as tnn
    from tvm_nested.authoring.pruning import PruningConfig, prune_model

    names = args.families or sorted(families.FAMILIES)
    print(f"CPU {cpu_model()}, families {names}, float32, threads {args.threads}", flush=True)
    rows = []
    for name in names:
        dense, inputs = families.build(name)
        nested = prune_model(dense, PruningConfig(DENSITIES))
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
    meta = {"cpu": cpu_model(), "dtype": "float32", "threads": args.threads, "repeat": args.repeat}
    (RESULTS / "families.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        "# Paper families: nested (one module, every level) vs stock dense PyTorch",
        "",
        f"CPU {meta['cpu']}, float32, untuned default schedules, {args.repeat} timing repeats. Small models "
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
    ap.add_argument("--families", nargs="*", default=None, help="paper families instead of --model (all if none named)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.families is not None:
        families_main(args)
        return

    import onnxruntime as ort
    import tvm

    import tvm_nested
    from tvm_nested.authoring import zoo
    from tvm_nested.authoring.onnx_nest import ort_run

    load_start = os.getloadavg()[0]
    print(
        f"CPU {cpu_model()}, model {args.model}, dtype float32, batch 1, threads {args.threads}, load {load_start:.2f}",
        flush=True,
    )
    dense_model = zoo.load(args.model)
    nested_model = zoo.nested(args.model, densities=DENSITIES)
    feed = zoo.example_input(dense_model)
    ((_in_name, x),) = feed.items()
    t0 = time.perf_counter()
    lib = tvm_nested.build(tvm_nested.from_onnx(nested_model), "llvm")
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        so = lib.export_library(os.path.join(tmp, "model.so"))
        so_bytes = os.path.getsize(so)
        rt = tvm_nested.load(so)
        # numerics: level 0 against onnxruntime on the nested model (the masked-dense oracle)
        ref = ort_run(nested_model, [x], level=0)[0]
        got = rt.run(x, level=0)[0]
        err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
        layers = _conv_gemm_layers(dense_model)
        rows = []
        for threads in args.threads:
            tvm_nested.set_num_threads(threads)
            so_opts = ort.SessionOptions()
            so_opts.intra_op_num_threads = threads
            so_opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(dense_model.SerializeToString(), so_opts, providers=["CPUExecutionProvider"])
            ort_ms = _time_torch(lambda: sess.run(None, feed), min_s=0.2, repeat=5)
            torch_ms = _torch_layers_ms(layers, threads)
            for lvl in range(lib.num_levels):
                ms = rt.time(x, level=lvl, number=2, repeat=5)
                rows.append(
                    {
                        "threads": threads,
                        "level": lvl,
                        "density": lib.densities[lvl],
                        "nested_ms": ms,
                        "ort_dense_ms": ort_ms,
                        "torch_dense_layers_ms": torch_ms,
                    }
                )
                print(
                    f"  t={threads} L{lvl} density={lib.densities[lvl]:.3f} nested={ms:.1f} ms "
                    f"ort_dense={ort_ms:.1f} ms torch_dense(conv/gemm only)={torch_ms:.1f} ms",
                    flush=True,
                )
    meta = {
        "cpu": cpu_model(),
        "model": args.model,
        "dtype": "float32",
        "batch": 1,
        "threads": args.threads,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "build_s": build_s,
        "so_bytes": so_bytes,
        "payload_bytes": lib.payload_bytes,
        "csr_bytes": lib.csr_bytes,
        "dense_bytes": lib.dense_bytes,
        "onnx_dense_bytes": dense_model.ByteSize(),
        "level0_rel_err_vs_ort": err,
        "tvm": tvm.__version__,
        "tuned": "no (default schedules)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        f"# {args.model}: nested (one module, every level) vs dense peers",
        "",
        f"CPU {meta['cpu']}, float32, batch 1, untuned default schedules. Load average "
        f"{load_start:.2f} at start, {meta['load_end']:.2f} at end (2-core machine, shared).",
        "",
        f"Module: exported .so {so_bytes / 2**20:.1f} MiB; nested payload "
        f"{lib.payload_bytes / 2**20:.1f} MiB (plain CSR of level 0: {lib.csr_bytes / 2**20:.1f} MiB, "
        f"dense weights {lib.dense_bytes / 2**20:.1f} MiB; dense ONNX {meta['onnx_dense_bytes'] / 2**20:.1f} MiB). "
        f"Build {build_s:.0f} s. Level 0 vs onnxruntime (nested model): max rel. error {err:.1e}.",
        "",
        "torch_dense runs only the conv/gemm layers (no BN/pool/ReLU/add): a lower bound.",
        "",
        "| threads | level | density | nested ms | ort dense ms | torch dense (conv/gemm) ms | nested / ort |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['threads']} | {r['level']} | {r['density']:.3f} | {r['nested_ms']:.1f} | "
            f"{r['ort_dense_ms']:.1f} | {r['torch_dense_layers_ms']:.1f} | "
            f"{r['nested_ms'] / r['ort_dense_ms']:.2f} |"
        )
    (RESULTS / "models.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for threads in args.threads:
            sel = [r for r in rows if r["threads"] == threads]
            d = [r["density"] * 100 for r in sel]
            ax.plot(d, [r["nested_ms"] for r in sel], marker="o", label=f"nested, {threads}T")
            ax.axhline(
                sel[0]["ort_dense_ms"], linestyle="--", label=f"ort dense, {threads}T", color=ax.lines[-1].get_color()
            )
            ax.axhline(
                sel[0]["torch_dense_layers_ms"],
                linestyle=":",
                label=f"torch conv/gemm, {threads}T",
                color=ax.lines[-1].get_color(),
            )
        ax.set_xlabel("density %")
        ax.set_ylabel("ms (batch 1)")
        ax.set_title(f"{args.model} nested vs dense")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(RESULTS / "models.png", dpi=90)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"wrote {RESULTS}/models.md/.json/.png")


if __name__ == "__main__":
    main()
