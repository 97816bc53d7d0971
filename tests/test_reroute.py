"""Rerouting under a deadline: the stage split, the on-device rule, main_deadline, run_deadline.

The rule is tested as the very PrimFunc the module compiles (``nested_reroute_rule``), with crafted
latency tables and an injected elapsed time; whole-module tests use tables and deadlines that make
the decision independent of this machine's speed (no wall-clock assertion anywhere).
"""

import json
import math
import os

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_nested
from tvm_nested import reroute
from tvm_nested.authoring import nn as tnn
from tvm_nested.contract import DEADLINE_FUNC
from tvm_nested.schedules import reroute_rule

DENSITIES = (0.5, 0.2, 0.1)
L = len(DENSITIES)
HUGE_MS = 1e9  # ~11 days: nothing in a test runs that long


# ------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """PointNet-like shared MLP over points, then a max-pool and a classifier head."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = (
            nn.Linear(3, 64),
            nn.Linear(64, 128),
            nn.Linear(128, 256),
            nn.Linear(256, 10),
        )

    def forward(self, pts):  # pts [N, 3]
        h = torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(pts))))))
        return self.head(torch.max(h, dim=0, keepdim=True)[0])


class GRUish(nn.Module):
    """A recurrent cell (minimal gated unit) unrolled over 4 steps; the state carries across stages."""

    def __init__(self, d=32, hdim=64):
        super().__init__()
        self.steps = 4
        self.cells = nn.ModuleList(
            [nn.ModuleDict({"x": nn.Linear(d, 2 * hdim), "h": nn.Linear(hdim, 2 * hdim)}) for _ in range(self.steps)]
        )
        self.out = nn.Linear(hdim, 8)
        self.hdim = hdim

    def forward(self, xs):  # xs [steps, 1, d]
        h = torch.zeros(1, self.hdim)
        for t in range(self.steps):
            z, c = (self.cells[t]["x"](xs[t]) + self.cells[t]["h"](h)).chunk(2, dim=-1)
            z = torch.sigmoid(z)
            h = (1 - z) * h + z * torch.tanh(c)
        return self.out(h)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.Conv2d(32, 32, 3, padding=1),
        )
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        h = h + torch.relu(self.c3(h))  # a residual: two activations live across a cut
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(h, 2), 1))


def _nested(model, x):
    torch.manual_seed(0)
    dense = model().eval()
    names = [n for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    nested = tnn.nest(dense, {n: DENSITIES for n in names}).eval()
    return tvm_nested.from_torch(nested, (torch.from_numpy(x), torch.tensor(0))), nested


def _inputs(name):
    rng = np.random.default_rng(0)
    return {
        "mlp": rng.standard_normal((64, 3)),
        "gru": rng.standard_normal((4, 1, 32)),
        "cnn": rng.standard_normal((1, 3, 16, 16)),
    }[name].astype("float32")


MODELS = {"mlp": MLP, "gru": GRUish, "cnn": SmallCNN}


@pytest.fixture(scope="module", params=["mlp", "gru", "cnn"])
def staged(request):
    """(name, x, torch model, staged lib without table, runtime)."""
    x = _inputs(request.param)
    mod, model = _nested(MODELS[request.param], x)
    lib = tvm_nested.build(mod, "llvm", stages=3)
    return request.param, x, model, mod, lib, lib.runtime()


# ------------------------------------------------------------------------------------- the rule
def _rule_runner(k, levels, adaptive=False, overhead_us=0.0):
    rule = reroute_rule.reroute_rule(k, levels, adaptive=adaptive, overhead_us=overhead_us).with_attr(
        "global_symbol", "rule"
    )
    ex = tvm.compile(tvm.IRModule({"rule": rule}), "llvm")

    def run(table, elapsed_us, deadline_us, level, stage, spent_us=0.0):
        out, spent = tvm.runtime.tensor(np.array(-7, "int32")), tvm.runtime.tensor(np.array(-1.0, "float64"))
        f64 = lambda v: tvm.runtime.tensor(np.array(v, "float64"))
        ex["rule"](
            f64(elapsed_us),
            f64(deadline_us),
            tvm.runtime.tensor(np.array(level, "int32")),
            f64(spent_us),
            tvm.runtime.tensor(np.asarray(table, "float64")),
            stage,
            out,
            spent,
        )
        return int(out.numpy()), float(spent.numpy())

    return run


TABLE = np.array([[100.0, 60.0, 30.0], [100.0, 60.0, 30.0], [100.0, 60.0, 30.0], [100.0, 60.0, 30.0]])


@pytest.mark.parametrize(
    ("elapsed", "deadline", "level", "stage", "expected"),
    [
        (100.0, 400.0, 0, 1, 0),  # 100 + 300 = 400 fits exactly: keep the level
        (100.1, 400.0, 0, 1, 1),  # just over: level 1 (100.1 + 180) fits
        (250.0, 400.0, 0, 1, 2),  # 250 + 180 > 400, 250 + 90 fits: level 2
        (350.0, 400.0, 0, 1, 2),  # nothing fits: the sparsest
        (100.0, 300.0, 0, 3, 0),  # stage 3 of 4: one stage left, 100 + 100 fits
        (250.0, 300.0, 0, 3, 2),  # 250 + 100 and 250 + 60 miss, 250 + 30 fits: level 2
        (0.0, 0.0, 1, 1, 2),  # deadline 0: the sparsest
        (5.0, 1e12, 0, 1, 0),  # huge deadline: never switches
        (300.0, 320.0, 1, 2, 2),  # already at 1: only sparser levels are considered
    ],
    ids=[
        "fits-exactly",
        "just-over",
        "skip-a-level",
        "none-fits",
        "last-stage",
        "last-stage-switch",
        "deadline-0",
        "huge",
        "from-level-1",
    ],
)
def test_table_rule_switches_exactly_where_it_should(elapsed, deadline, level, stage, expected):
    run = _rule_runner(*TABLE.shape, adaptive=False)
    ref, spent = reroute_rule.decide(TABLE, elapsed, deadline, level, stage, adaptive=False)
    assert ref == expected
    assert run(TABLE, elapsed, deadline, level, stage) == (ref, spent)
    assert spent == TABLE[stage - 1, level]


def test_adaptive_rule_scales_the_prediction_by_the_observed_slowdown():
    run = _rule_runner(*TABLE.shape, adaptive=True)
    # as profiled (elapsed == predicted 100): same as the table rule, keep level 0 (100 + 300 <= 400)
    assert run(TABLE, 100.0, 400.0, 0, 1) == (0, 100.0)
    # twice slower than profiled: 200 + 2 * 300 > 800? no, = 800 fits; 201 -> 201 + 2.01 * 300 > 800
    assert run(TABLE, 200.0, 800.0, 0, 1) == (0, 100.0)
    assert run(TABLE, 201.0, 800.0, 0, 1)[0] == 1  # 201 + 2.01 * 180 = 562.8 fits
    # the table rule would keep level 0 there (201 + 300 <= 800)
    assert _rule_runner(*TABLE.shape, adaptive=False)(TABLE, 201.0, 800.0, 0, 1)[0] == 0
    # faster than profiled never shrinks the prediction (factor >= 1); spent accumulates
    assert run(TABLE, 10.0, 400.0, 1, 2, spent_us=100.0) == (1, 160.0)


def test_rule_never_goes_denser_even_with_a_noisy_table():
    table = np.array([[10.0, 50.0, 5.0], [10.0, 50.0, 5.0]])  # level 1 slower than level 0 (noise)
    run = _rule_runner(2, 3)
    # at level 1 (predicted 50 us left) with 90 us elapsed and a 105 us deadline, level 0 (10 us left)
    # would fit but is denser: never considered; the sparsest (5 us) fits
    assert run(table, 90.0, 105.0, 1, 1)[0] == 2
    assert reroute_rule.decide(table, 90.0, 105.0, 1, 1, adaptive=False)[0] == 2


@pytest.mark.parametrize("adaptive", [False, True], ids=["table", "adaptive"])
def test_rule_on_random_tables_matches_numpy(adaptive):
    rng = np.random.default_rng(0)
    run = _rule_runner(4, 3, adaptive)
    for _ in range(200):
        table = np.sort(rng.uniform(1, 100, (4, 3)), axis=1)[:, ::-1].copy()
        args = (
            float(rng.uniform(0, 300)),
            float(rng.uniform(0, 400)),
            int(rng.integers(0, 3)),
            int(rng.integers(1, 4)),
            float(rng.uniform(0, 200)),
        )
        got = run(table, *args)
        ref = reroute_rule.decide(table, *args, adaptive=adaptive)
        assert got[0] == ref[0] and got[1] == pytest.approx(ref[1]), args


def test_overhead_reserve_moves_the_switch_point():
    """The per-call overhead beyond the table is reserved in every prediction (scaled like the table)."""
    run = _rule_runner(*TABLE.shape, adaptive=False, overhead_us=50.0)
    # without the reserve 100 + 300 <= 400 keeps level 0; with it 100 + 350 > 400: level 1 (100 + 230)
    assert _rule_runner(*TABLE.shape)(TABLE, 100.0, 400.0, 0, 1)[0] == 0
    assert (
        run(TABLE, 100.0, 400.0, 0, 1)
        == (1, 100.0)
        == reroute_rule.decide(TABLE, 100.0, 400.0, 0, 1, adaptive=False, overhead_us=50.0)
    )
    assert run(TABLE, 100.0, 450.0, 0, 1)[0] == 0  # 100 + 350 fits exactly
    # adaptive: twice slower than profiled doubles the reserve too: 200 + 2 * (300 + 50) = 900
    runa = _rule_runner(*TABLE.shape, adaptive=True, overhead_us=50.0)
    assert runa(TABLE, 200.0, 900.0, 0, 1)[0] == 0 and runa(TABLE, 200.0, 899.0, 0, 1)[0] == 1
    with pytest.raises(ValueError, match="overhead_us"):
        reroute_rule.reroute_rule(4, 3, overhead_us=-1.0)


@pytest.mark.parametrize("adaptive", [False, True], ids=["table", "adaptive"])
def test_rule_with_overhead_on_random_tables_matches_numpy(adaptive):
    rng = np.random.default_rng(1)
    run = _rule_runner(4, 3, adaptive, overhead_us=37.5)
    for _ in range(100):
        table = np.sort(rng.uniform(1, 100, (4, 3)), axis=1)[:, ::-1].copy()
        args = (
            float(rng.uniform(0, 300)),
            float(rng.uniform(0, 400)),
            int(rng.integers(0, 3)),
            int(rng.integers(1, 4)),
            float(rng.uniform(0, 200)),
        )
        got = run(table, *args)
        ref = reroute_rule.decide(table, *args, adaptive=adaptive, overhead_us=37.5)
        assert got[0] == ref[0] and got[1] == pytest.approx(ref[1]), args


# ------------------------------------------------------------------------------------- stages
def test_stages_compute_main_at_every_level(staged):
    _name, x, model, _, _lib, rt = staged
    plan = rt.stage_plan
    assert plan["num_stages"] == 3 and len(plan["functions"]) == 3
    for lvl in range(L):
        got = rt.run_stages(x, levels=[lvl] * 3)[0]
        np.testing.assert_allclose(got, rt.run(x, level=lvl)[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            ref = model(torch.from_numpy(x), level=torch.tensor(lvl)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_stages_share_weights_in_the_exported_library(staged, tmp_path):
    _name, _x, _model, mod, lib, _rt = staged
    plain = tvm_nested.build(mod, "llvm")
    a, b = lib.export_library(tmp_path / "staged.so"), plain.export_library(tmp_path / "plain.so")
    extra = os.path.getsize(a) - os.path.getsize(b)
    # stage functions + their fused glue kernels cost code, never a second copy of the packed weights
    assert extra < 0.5 * lib.payload_bytes + 64 * 1024, (extra, lib.payload_bytes)


# ------------------------------------------------------------------------------------- main_deadline
def test_no_latency_table_is_a_clear_error(staged):
    _name, x, *_, rt = staged
    with pytest.raises(ValueError, match=r"no latency table.*profile_stages.*with_latency_table"):
        rt.run_deadline(x, deadline_ms=5.0)


def test_unstaged_module_says_how_to_stage():
    x = _inputs("mlp")
    mod, _ = _nested(MLP, x)
    rt = tvm_nested.build(mod, "llvm").runtime()
    with pytest.raises(ValueError, match="stages=K"):
        rt.run_deadline(x, deadline_ms=5.0)
    with pytest.raises(ValueError, match="no stages to profile"):
        reroute.profile_stages(rt, x, number=1, repeat=1)


@pytest.fixture(scope="module")
def with_table(staged):
    name, x, _model, _mod, lib, rt = staged
    table = reroute.profile_stages(rt, x, number=1, repeat=2)
    assert table.shape == (3, L) and np.all(table > 0)
    lib2 = lib.with_latency_table(table)
    return name, x, lib2, lib2.runtime()


def test_table_is_inside_the_artifact(with_table, tmp_path):
    _name, x, lib2, _rt2 = with_table
    path = lib2.export_library(tmp_path / "model.so")
    loaded = tvm_nested.load(path)
    np.testing.assert_array_equal(loaded.latency_table, lib2.latency_table)
    np.testing.assert_array_equal(loaded.invoke(reroute_rule.TABLE_FUNC, []).numpy(), lib2.latency_table)
    _outs, levels = loaded.run_deadline(x, deadline_ms=HUGE_MS, level=1)
    assert levels.tolist() == [1, 1, 1]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_deadline_zero_runs_the_rest_sparsest(with_table, level):
    _name, x, _lib2, rt2 = with_table
    outs, levels = rt2.run_deadline(x, deadline_ms=0, level=level)
    assert levels.tolist() == [level, L - 1, L - 1]
    np.testing.assert_array_equal(outs[0], rt2.run_stages(x, levels=levels)[0])


@pytest.mark.parametrize("level", [0, 2])
def test_huge_deadline_never_switches(with_table, level):
    _name, x, _lib2, rt2 = with_table
    outs, levels = rt2.run_deadline(x, deadline_ms=HUGE_MS, level=level)
    assert levels.tolist() == [level] * 3
    np.testing.assert_allclose(outs[0], rt2.run(x, level=level)[0], rtol=1e-5, atol=1e-5)


def test_crafted_table_switches_where_the_rule_says():
    """Level 0 predicted at 1e9 us per stage, level 1 at 1 us, level 2 at 0: with a 1000 s deadline
    only level 0 is ever predicted late, so stage 1 onwards runs at level 1, whatever this machine's speed."""
    x = _inputs("mlp")
    mod, _ = _nested(MLP, x)
    table = np.array([[1e9, 1.0, 0.0]] * 3)
    rt = tvm_nested.build(mod, "llvm", stages=3, latency_table=table).runtime()
    outs, levels = rt.run_deadline(x, deadline_ms=1e6, level=0)
    assert levels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(outs[0], rt.run_stages(x, levels=[0, 1, 1])[0])
    outs, levels = rt.run_deadline(x, deadline_ms=1e6, level=2)  # already sparser: stays
    assert levels.tolist() == [2, 2, 2]


def test_overhead_is_compiled_into_main_deadline(with_table):
    """profile_overhead gives a finite non-negative number; a compiled-in reserve larger than the
    deadline makes every later stage sparsest, and the artifact records it."""
    _name, x, lib2, rt2 = with_table
    ovh = reroute.profile_overhead(rt2, x, calls=5)
    assert math.isfinite(ovh) and ovh >= 0
    table = lib2.latency_table
    lib3 = lib2.with_latency_table(table, overhead_us=1e9)  # 1000 s reserve
    assert lib3.info["reroute_overhead_us"] == 1e9 and lib2.info["reroute_overhead_us"] == 0.0
    rt3 = lib3.runtime()
    assert rt3.run_deadline(x, deadline_ms=1e5, level=0)[1].tolist() == [0, L - 1, L - 1]  # 100 s < reserve
    assert rt2.run_deadline(x, deadline_ms=1e5, level=0)[1].tolist() == [0, 0, 0]


def test_deadline_arguments_are_checked(with_table):
    _name, x, _lib2, rt2 = with_table
    with pytest.raises(ValueError, match="out of range"):
        rt2.run_deadline(x, deadline_ms=1.0, level=L)
    with pytest.raises(ValueError, match="deadline_ms"):
        rt2.run_deadline(x, deadline_ms=-1.0)
    with pytest.raises(ValueError, match="shape"):
        rt2.run_deadline(np.zeros((1, 1), "float32"), deadline_ms=1.0)


def test_on_device_level_guard(with_table):
    """A raw VM call that bypasses the Python checks still cannot run a level outside 0..L-1."""
    _name, x, _lib2, rt2 = with_table
    args = rt2.arguments([x], 0)
    args[-1] = tvm.runtime.tensor(np.array(L, "int32"))
    with pytest.raises(Exception, match="out of range"):
        rt2.invoke(DEADLINE_FUNC, [*args, tvm.runtime.tensor(np.array(1e3, "float64"))])


def test_cli_deadline_run(with_table, tmp_path, capsys):
    from tvm_nested import cli

    _name, x, lib2, _rt2 = with_table
    path = lib2.export_library(tmp_path / "m.so")
    np.save(tmp_path / "x.npy", x)
    assert (
        cli.main(
            [
                "run",
                str(path),
                "--deadline-ms",
                "0",
                "--level",
                "1",
                "--input",
                str(tmp_path / "x.npy"),
                "--repeat",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["levels"] for r in rows] == [[1, 2, 2], [1, 2, 2]]
    assert cli.main(["run", str(tmp_path / "missing.so"), "--deadline-ms", "1"]) == 2
    assert "no compiled module" in capsys.readouterr().err


def test_aarch64_cross_build_links_the_clock(tmp_path, aarch64_cc):
    """The on-device rule and clock cross-compile for aarch64 and link against the board's libc."""
    import shutil
    import subprocess

    x = _inputs("mlp")
    mod, _ = _nested(MLP, x)
    lib = tvm_nested.build(mod, "llvm -mtriple=aarch64-linux-gnu", stages=2, latency_table=np.ones((2, L)))
    path = lib.export_library(tmp_path / "arm.so")
    data = open(path, "rb").read()
    assert int.from_bytes(data[18:20], "little") == 183  # EM_AARCH64
    assert b"clock_gettime" in data and b"main_deadline" in data
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    syms = subprocess.run([nm, "-D", path], capture_output=True, text=True).stdout
    assert "U clock_gettime" in syms
