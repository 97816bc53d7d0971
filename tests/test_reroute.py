"""Rerouting under a deadline: the stage split, the on-device rule, main_deadline, run_deadline.

The rule is tested as the very PrimFunc the module compiles (``nested_reroute_rule``), with crafted
latency tables and an injected elapsed time; whole-module tests use tables and deadlines that make
the decision independent of this machine's speed (no wall-clock assertion anywhere).
"""

import json
import math
import os
import time

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_nested
from tvm_nested import reroute
from tvm_nested.authoring import nn as tnn
from tvm_nested.build import AUTO_MAX_SHARE
from tvm_nested.contract import DEADLINE_FUNC
from tvm_nested.relay_passes import merge_stages
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
TABLE = np.array([[100.0, 60.0, 30.0], [100.0, 60.0, 30.0], [100.0, 60.0, 30.0], [100.0, 60.0, 30.0]])
NO_HISTORY = np.array([0.0, 0.0, 1.0])  # acc at the start of a request without history: f = 1
F64 = lambda v: tvm.runtime.tensor(np.asarray(v, "float64"))
I32 = lambda v: tvm.runtime.tensor(np.asarray(v, "int32"))


def _rules(table, overhead_us=0.0):
    """The compiled rule, start and finish PrimFuncs for ``table``, as plain Python calls."""
    funcs = {
        "rule": reroute_rule.reroute_rule(table, overhead_us=overhead_us),
        "start": reroute_rule.reroute_start(table),
        "finish": reroute_rule.reroute_finish(table),
    }
    ex = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}), "llvm")

    def rule(elapsed, deadline, requested, current, stage, acc=NO_HISTORY, policy="evidence", aggressiveness=0.0):
        out, acc_out = I32(-7), F64(np.full(3, -1.0))
        policy_id = I32(reroute_rule.REROUTE_POLICIES.index(policy))
        ex["rule"](F64(elapsed), F64(deadline), I32(requested), I32(current), F64(acc), F64(table), stage,
                   policy_id, F64(aggressiveness), out, acc_out)  # fmt: skip
        return int(out.numpy()), acc_out.numpy()

    def start(t0_ns, state):
        acc = F64(np.full(3, -1.0))
        ex["start"](tvm.runtime.tensor(np.array(t0_ns, "int64")), F64(state), acc)
        return acc.numpy()

    def finish(elapsed, current, acc, t0_ns):
        state = F64(np.full(2, -1.0))
        ex["finish"](
            F64(elapsed), I32(current), F64(acc), F64(table), tvm.runtime.tensor(np.array(t0_ns, "int64")), state
        )
        return state.numpy()

    return rule, start, finish


@pytest.fixture(scope="module")
def rules():
    return _rules(TABLE)


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
        (0.0, 0.0, 0, 0, 0),  # before the first stage the paper's rule keeps the requested level
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
        "first-stage",
    ],
)
def test_paper_rule_switches_exactly_where_it_should(rules, elapsed, deadline, level, stage, expected):
    rule, _, _ = rules
    ref, acc = reroute_rule.decide(TABLE, elapsed, deadline, level, level, stage, NO_HISTORY, "paper")
    assert ref == expected
    got, got_acc = rule(elapsed, deadline, level, level, stage, policy="paper")
    assert got == ref
    np.testing.assert_allclose(got_acc, acc)
    assert acc[0] == (TABLE[stage - 1, level] if stage else 0.0) and acc[1] == elapsed  # predicted, seen


def test_paper_rule_ignores_the_slowdown_and_the_margin(rules):
    rule, _, _ = rules
    slow = np.array([0.0, 0.0, 50.0])  # 50x slower than profiled, a huge margin: the paper rule sees neither
    assert rule(100.0, 400.0, 0, 0, 1, slow, "paper", aggressiveness=10.0)[0] == 0
    assert rule(100.0, 400.0, 0, 0, 1, slow, "evidence", aggressiveness=10.0)[0] == 2


def test_evidence_rule_predicts_with_the_observed_slowdown(rules):
    rule, _, _ = rules
    tau = reroute_rule.time_constants(TABLE)[0]  # 40 us: a tenth of the densest request
    # stage 0 took 200 us where the table says 100: f moves from 1 towards 2 by 100 / (100 + tau)
    level, acc = rule(200.0, 1000.0, 0, 0, 1)
    f = 1 + 100 / (100 + tau) * (2 - 1)
    np.testing.assert_allclose(acc, [100.0, 200.0, f])
    assert level == 0  # 200 + f * 300 = 714 < 1000
    assert rule(200.0, 200.0 + f * 300 - 1, 0, 0, 1)[0] == 1  # just short of level 0's prediction
    assert rule(200.0, 200.0 + f * 300, 0, 0, 1)[0] == 0  # fits exactly
    # the paper's rule at the same point predicts 300: level 0 still fits a 520 us deadline
    assert rule(200.0, 520.0, 0, 0, 1, policy="paper")[0] == 0
    assert rule(200.0, 520.0, 0, 0, 1)[0] == 1  # 200 + f * 180 = 509 fits


def test_evidence_rule_margin_keeps_an_escape_to_the_sparsest(rules):
    """aggressiveness a: the stage about to run at the chosen level, then the sparsest level to the
    end, must still fit if the slowdown grows (1 + a) times what has been observed."""
    rule, _, _ = rules
    acc = np.array([100.0, 100.0, 1.0])  # stage 0 ran as profiled: f stays 1
    assert rule(200.0, 400.0, 0, 0, 2, acc)[0] == 0  # 200 + 200 fits exactly
    assert rule(200.0, 400.0, 0, 0, 2, acc, aggressiveness=0.5)[0] == 0  # escape 1.5 * (100 + 30) = 195 fits
    assert rule(200.0, 400.0, 0, 0, 2, acc, aggressiveness=0.6)[0] == 1  # 1.6 * 130 = 208 does not; 1.6 * 90 does
    assert rule(200.0, 400.0, 0, 0, 2, acc, aggressiveness=2.0)[0] == 2  # 3 * 90 = 270 > 200; 3 * 60 fits
    assert rule(200.0, 400.0, 0, 0, 2, acc, aggressiveness=-5.0)[0] == 0  # a negative margin counts as 0
    # before the last stage the escape is that stage alone: 1.1 * 100 > 100 left, 1.1 * 60 fits
    assert rule(300.0, 400.0, 0, 0, 3, [200.0, 200.0, 1.0], aggressiveness=0.1)[0] == 1
    # the margin scales the observed slowdown: at f = 2 level 0's 2 * 200 fits 400 left, its escape
    # 2 * 1.5 * 130 = 390 too, at a = 0.6 (416) it does not
    slow = np.array([100.0, 0.0, 2.0])  # stage 1 took 200 us for 100: f stays 2
    assert rule(200.0, 600.0, 0, 0, 2, slow, aggressiveness=0.5)[0] == 0
    assert rule(200.0, 600.0, 0, 0, 2, slow, aggressiveness=0.6)[0] == 1


def test_evidence_rule_returns_denser_but_never_above_the_requested_level(rules):
    rule, _, _ = rules
    # stage 0 ran at level 1 (60 us, as profiled); level 0 fits the rest again: back to it
    assert rule(60.0, 1000.0, 0, 1, 1)[0] == 0
    # requested level 1, stage 0 at level 2: back to 1 at most, however much time is left
    assert rule(60.0, 1000.0, 1, 2, 1)[0] == 1
    # the paper's rule never goes back
    assert rule(60.0, 1000.0, 0, 1, 1, policy="paper")[0] == 1


def test_evidence_rule_starts_from_earlier_requests(rules):
    """Before stage 0 the only evidence is the state: a slow last request makes stage 0 sparser."""
    rule, start, _ = rules
    tau_idle = reroute_rule.time_constants(TABLE)[1]
    t0_ns = 10**12
    assert start(t0_ns, [0.0, 0.0]).tolist() == [0.0, 0.0, 1.0]  # no history
    fresh = start(t0_ns, [3.0, t0_ns * 1e-3])  # a 3x slowdown that ended just now
    np.testing.assert_allclose(fresh, [0.0, 0.0, 3.0])
    aged = start(t0_ns, [3.0, t0_ns * 1e-3 - tau_idle])  # ... tau_idle ago: halfway back to 1
    np.testing.assert_allclose(aged, [0.0, 0.0, 2.0])
    # 400 us for the densest request: at 3x it cannot fit, the sparsest (3 * 120) does
    assert rule(0.0, 400.0, 0, 0, 0, NO_HISTORY)[0] == 0
    assert rule(0.0, 400.0, 0, 0, 0, fresh)[0] == 2


def test_finish_folds_the_last_stage_into_the_state(rules):
    _, _, finish = rules
    tau = reroute_rule.time_constants(TABLE)[0]
    acc = np.array([300.0, 300.0, 1.0])  # three stages as profiled
    state = finish(500.0, 0, acc, 10**9)  # the last one took 200 us for 100
    np.testing.assert_allclose(state, [1 + 100 / (100 + tau), 10**6 + 500.0])
    np.testing.assert_allclose(state, reroute_rule.finish(TABLE, 500.0, 0, acc, 10**9))


@pytest.mark.parametrize("overhead_us", [0.0, 37.5], ids=["no-reserve", "reserve"])
def test_rules_on_random_inputs_match_numpy(overhead_us):
    rng = np.random.default_rng(0)
    table = np.sort(rng.uniform(1, 100, (4, 3)), axis=1)[:, ::-1].copy()
    rule, start, finish = _rules(table, overhead_us)
    for _ in range(150):
        acc = np.array([rng.uniform(0, 200), rng.uniform(0, 100), rng.uniform(0.5, 3)])
        args = (
            float(rng.uniform(0, 300)),
            float(rng.uniform(0, 400)),
            int(rng.integers(0, 3)),
            int(rng.integers(0, 3)),
            int(rng.integers(0, 4)),
        )
        policy, margin = reroute_rule.REROUTE_POLICIES[int(rng.integers(0, 2))], float(rng.uniform(0, 1))
        got = rule(*args, acc, policy, margin)
        ref = reroute_rule.decide(table, *args, acc, policy, margin, overhead_us)
        assert got[0] == ref[0], (args, policy, margin)
        np.testing.assert_allclose(got[1], ref[1])
        t0, state = int(rng.integers(1, 10**12)), [float(rng.uniform(0, 5)), float(rng.uniform(0, 10**9))]
        np.testing.assert_allclose(start(t0, state), reroute_rule.start(table, t0, state))
        np.testing.assert_allclose(
            finish(args[0], args[3], acc, t0), reroute_rule.finish(table, args[0], args[3], acc, t0)
        )


def test_overhead_reserve_moves_the_switch_point(rules):
    """The per-call overhead beyond the table is reserved in every prediction (scaled like the table)."""
    rule50, _, _ = _rules(TABLE, overhead_us=50.0)
    rule, _, _ = rules
    # without the reserve 100 + 300 <= 400 keeps level 0; with it 100 + 350 > 400: level 1 (100 + 230)
    assert rule(100.0, 400.0, 0, 0, 1, policy="paper")[0] == 0
    assert rule50(100.0, 400.0, 0, 0, 1, policy="paper")[0] == 1
    assert rule50(100.0, 450.0, 0, 0, 1, policy="paper")[0] == 0  # 100 + 350 fits exactly
    with pytest.raises(ValueError, match="overhead_us"):
        reroute_rule.reroute_rule(TABLE, overhead_us=-1.0)


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
        reroute.profile_stages(rt, x, repeat=1)


def test_stage_times_are_taken_on_the_device(staged):
    """nested_stage_times: one clock reading after each stage, increasing; the outputs are main's."""
    _name, x, _model, _mod, _lib, rt = staged
    ends = rt.stage_times(x, level=0)
    assert ends.shape == (3,) and np.all(np.diff(ends) > 0) and ends[0] > 0


@pytest.fixture(scope="module")
def with_table(staged):
    name, x, _model, _mod, lib, rt = staged
    table = reroute.profile_stages(rt, x, repeat=2)
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
    assert loaded.info["reroute_rule"] == "evidence"
    assert loaded.info["reroute_aggressiveness"] == reroute_rule.DEFAULT_AGGRESSIVENESS


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize(("policy", "first"), [("paper", None), ("evidence", L - 1)], ids=["paper", "evidence"])
def test_deadline_zero_runs_sparsest(with_table, level, policy, first):
    """The paper's rule runs stage 0 at the requested level; the evidence rule decides it too."""
    _name, x, _lib2, rt2 = with_table
    outs, levels = rt2.run_deadline(x, deadline_ms=0, level=level, policy=policy)
    assert levels.tolist() == [level if first is None else first, L - 1, L - 1]
    np.testing.assert_array_equal(outs[0], rt2.run_stages(x, levels=levels)[0])


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("policy", ["paper", "evidence"])
def test_huge_deadline_never_switches(with_table, level, policy):
    _name, x, _lib2, rt2 = with_table
    outs, levels, ends = rt2.run_deadline(x, deadline_ms=HUGE_MS, level=level, policy=policy, times=True)
    assert levels.tolist() == [level] * 3
    assert ends.shape == (3,) and np.all(np.diff(ends) > 0)
    np.testing.assert_allclose(outs[0], rt2.run(x, level=level)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def crafted():
    """Level 0 predicted at 1e9 us per stage, level 1 at 1 us, level 2 at 0: with a 1000 s deadline
    only level 0 is ever predicted late, whatever this machine's speed."""
    x = _inputs("mlp")
    mod, _ = _nested(MLP, x)
    table = np.array([[1e9, 1.0, 0.0]] * 3)
    return x, tvm_nested.build(mod, "llvm", stages=3, latency_table=table).runtime()


@pytest.mark.parametrize(("policy", "expected"), [("paper", [0, 1, 1]), ("evidence", [1, 1, 1])])
def test_crafted_table_switches_where_the_rule_says(crafted, policy, expected):
    x, rt = crafted
    fresh = rt.new_deadline_state()  # the table is absurd: what one request learns would steer the next
    outs, levels = rt.run_deadline(x, deadline_ms=1e6, level=0, policy=policy, state=fresh)
    assert levels.tolist() == expected
    np.testing.assert_array_equal(outs[0], rt.run_stages(x, levels=expected)[0])
    outs, levels = rt.run_deadline(x, deadline_ms=1e6, level=2, policy=policy)  # already sparser: stays
    assert levels.tolist() == [2, 2, 2]


def test_state_carries_the_slowdown_between_requests(with_table):
    """The runtime keeps main_deadline's state on the device; a slow earlier request (an injected
    state: 100x slower, just now) makes the evidence rule start sparser, a fresh state does not."""
    _name, x, lib2, rt2 = with_table
    table = lib2.latency_table
    deadline_ms = 2 * table[:, 0].sum() / 1e3  # level 0 fits at the profiled speed, not 100x slower
    no_reserve = {"aggressiveness": 0.0}  # the state alone decides (the reserve is tested on the rule)
    fresh = rt2.new_deadline_state()
    assert fresh.slowdown == 1.0 and fresh.tensor.numpy().tolist() == [0.0, 0.0]
    assert rt2.run_deadline(x, deadline_ms=deadline_ms, state=fresh, **no_reserve)[1][0] == 0
    assert fresh.tensor.numpy()[1] > 0  # the call returned a state: when it ended
    slow = rt2.new_deadline_state()
    slow.tensor = tvm.runtime.tensor(np.array([100.0, time.monotonic_ns() / 1e3]))
    assert rt2.run_deadline(x, deadline_ms=deadline_ms, state=slow, **no_reserve)[1][0] > 0
    assert rt2.run_deadline(x, deadline_ms=deadline_ms, state=slow, policy="paper")[1][0] == 0  # no memory
    own = rt2.deadline_state
    before = own.tensor.numpy().copy()
    rt2.run_deadline(x, deadline_ms=HUGE_MS)
    assert rt2.deadline_state is own and own.tensor.numpy()[1] > before[1]
    own.reset()
    assert own.tensor.numpy().tolist() == [0.0, 0.0]


def test_overhead_is_compiled_into_main_deadline(with_table):
    """profile_overhead gives a finite non-negative number; a compiled-in reserve larger than the
    deadline makes every later stage sparsest, and the artifact records it."""
    _name, x, lib2, rt2 = with_table
    ovh = reroute.profile_overhead(rt2, x, calls=5)
    assert math.isfinite(ovh) and ovh >= 0
    table = lib2.latency_table
    lib3 = lib2.with_latency_table(table, overhead_us=1e9, policy="paper", aggressiveness=0.5)  # 1000 s reserve
    assert lib3.info["reroute_overhead_us"] == 1e9 and lib2.info["reroute_overhead_us"] == 0.0
    assert lib3.info["reroute_rule"] == "paper" and lib3.info["reroute_aggressiveness"] == 0.5
    rt3 = lib3.runtime()
    assert rt3.run_deadline(x, deadline_ms=1e5, level=0)[1].tolist() == [0, L - 1, L - 1]  # 100 s < reserve
    assert rt3.run_deadline(x, deadline_ms=1e5, level=0, policy="evidence")[1].tolist() == [L - 1] * 3
    assert rt2.run_deadline(x, deadline_ms=1e5, level=0)[1].tolist() == [0, 0, 0]


def test_deadline_arguments_are_checked(with_table):
    _name, x, _lib2, rt2 = with_table
    with pytest.raises(ValueError, match="out of range"):
        rt2.run_deadline(x, deadline_ms=1.0, level=L)
    with pytest.raises(ValueError, match="deadline_ms"):
        rt2.run_deadline(x, deadline_ms=-1.0)
    with pytest.raises(ValueError, match="shape"):
        rt2.run_deadline(np.zeros((1, 1), "float32"), deadline_ms=1.0)
    with pytest.raises(ValueError, match=r"unknown rerouting policy 'adaptive'.*paper, evidence"):
        rt2.run_deadline(x, deadline_ms=1.0, policy="adaptive")
    with pytest.raises(ValueError, match="aggressiveness must be a finite number >= 0"):
        rt2.run_deadline(x, deadline_ms=1.0, aggressiveness=-0.1)
    with pytest.raises(ValueError, match="state must be a DeadlineState"):
        rt2.run_deadline(x, deadline_ms=1.0, state=np.zeros(2))
    with pytest.raises(ValueError, match="unknown rerouting policy"):
        _lib2.with_latency_table(_lib2.latency_table, policy="nines")


def test_on_device_level_guard(with_table):
    """A raw VM call that bypasses the Python checks still cannot run a level outside 0..L-1."""
    _name, x, _lib2, rt2 = with_table
    args = rt2.deadline_arguments([x], 1.0, 0)
    args[1] = tvm.runtime.tensor(np.array(L, "int32"))  # the level, after the one input
    with pytest.raises(Exception, match="out of range"):
        rt2.invoke(DEADLINE_FUNC, args)


def test_cli_deadline_run(with_table, tmp_path, capsys):
    from tvm_nested import cli

    _name, x, lib2, _rt2 = with_table
    path = lib2.export_library(tmp_path / "m.so")
    np.save(tmp_path / "x.npy", x)
    base = ["run", str(path), "--deadline-ms", "0", "--level", "1", "--input", str(tmp_path / "x.npy")]
    assert cli.main([*base, "--repeat", "2", "--policy", "paper"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["levels"] for r in rows] == [[1, 2, 2], [1, 2, 2]]
    assert cli.main([*base, "--repeat", "1", "--aggressiveness", "0.3"]) == 0  # the module's rule: evidence
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["levels"] for r in rows] == [[2, 2, 2]]
    assert cli.main(["run", str(tmp_path / "missing.so"), "--deadline-ms", "1"]) == 2
    assert "no compiled module" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--policy", "paper"]) == 2
    assert "add --deadline-ms" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- stages="auto"
@pytest.fixture(scope="module")
def auto():
    x = _inputs("gru")
    mod, model = _nested(GRUish, x)
    return x, model, mod, tvm_nested.build(mod, "llvm", stages="auto")


def test_auto_stages_are_the_measured_merge_of_the_narrow_points(auto):
    """stages="auto": the candidates are the GRU's step ends (4 steps + the head), timed here; the
    cuts kept are exactly merge_stages over the recorded measurements; the table is compiled in."""
    x, model, mod, lib = auto
    note = lib.stage_plan["auto"]
    assert note["candidates"] == 5 and len(note["candidate_cost_us"]) == 5
    assert note["decision_us"] >= 0 and note["max_share"] == AUTO_MAX_SHARE
    candidates = tvm_nested.build(mod, "llvm", stages="blocks").stage_plan
    cuts, groups = merge_stages(candidates, note["candidate_cost_us"], note["decision_us"], note["max_share"])
    assert lib.stage_plan["cuts"] == cuts and lib.num_stages == len(groups)
    assert lib.latency_table.shape == (lib.num_stages, L) and np.all(lib.latency_table > 0)
    rt = lib.runtime()
    for lvl in range(L):
        outs, levels = rt.run_deadline(x, deadline_ms=HUGE_MS, level=lvl)
        assert levels.tolist() == [lvl] * lib.num_stages
        with torch.no_grad():
            ref = model(torch.from_numpy(x), level=torch.tensor(lvl)).numpy()
        np.testing.assert_allclose(outs[0], ref, rtol=1e-4, atol=1e-4)


def test_auto_stages_errors(auto):
    _x, _model, mod, _lib = auto
    with pytest.raises(ValueError, match="measure_on=lambda lib"):
        tvm_nested.build(mod, "llvm -mtriple=aarch64-linux-gnu", stages="auto")
    with pytest.raises(ValueError, match="measure_on is for stages='auto'"):
        tvm_nested.build(mod, "llvm", stages=2, measure_on=lambda lib: lib.runtime())
    with pytest.raises(ValueError, match="profiles its own latency table"):
        tvm_nested.build(mod, "llvm", stages="auto", latency_table=np.ones((2, L)))
    with pytest.raises(ValueError, match="stages must be a count, a list of cuts, 'blocks' or 'auto'"):
        tvm_nested.build(mod, "llvm", stages="many")
    with pytest.raises(TypeError, match="measure_on must return a NestedRuntime"):
        tvm_nested.build(mod, "llvm", stages="auto", measure_on=lambda lib: lib)


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
