"""The bench scripts still run against today's API and check what they time (their figures are
measured by hand on a quiet machine, never asserted here): one small workload of each."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import tvm

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_bench_checks_every_level_against_numpy():
    kernels = _script("kernels")
    rows = kernels.bench_workload("pointnet_mlp_64-128_n1024", tvm.target.Target("llvm"), 1, np.random.default_rng(0))
    assert [r["level"] for r in rows] == list(range(len(kernels.DENSITIES)))
    assert all(r["ms"]["nested"] > 0 and r["ms"]["torch_dense"] > 0 for r in rows)


def test_qos_bench_serves_every_policy(tmp_path):
    qos = _script("qos")
    argv = ["--runs", "1", "--threads", "1", "--workloads", "digits", "--digits-s", "1", "--calibration-s", "0.3"]
    argv += ["--out", str(tmp_path)]
    assert qos.main(argv) == 0
    report = json.loads((tmp_path / "qos.json").read_text())
    (session,) = report["sessions"]
    assert set(session["summary"]) == {name for name, _ in qos._policies(len(qos.DENSITIES))}
    assert all(v["requests"] > 0 for v in session["summary"].values())
    assert "digits CNN" in (tmp_path / "qos.md").read_text()
