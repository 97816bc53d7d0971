"""The rerouting rule and the clock as TIR functions, compiled into a staged module.

``relay_passes/deadline.py`` states how ``main_deadline`` strings them together; the NumPy functions
at the end (``start``, ``decide``, ``finish``) are the references the tests compare the compiled
functions against.

* ``nested_clock_ns(dep)``, ``nested_elapsed_us(t0_ns, stage)``: ``clock_gettime(CLOCK_MONOTONIC)``
  through ``call_extern`` to libc with a stack ``timespec`` (links in any TVM-exported Linux .so,
  x86-64 and aarch64 alike, and in the in-process JIT);
* ``nested_reroute_start(t0_ns, state) -> acc``: the evidence a request starts with (the slowdown
  seen by earlier requests, aged by the time since the last one);
* ``nested_reroute_rule(elapsed, deadline, requested, current, acc, table, stage, policy,
  aggressiveness) -> (level, acc)``: the level of the next stage, and the evidence updated;
* ``nested_reroute_finish(elapsed, current, acc, table, t0_ns) -> state``: the state the next
  request starts from.

The evidence ``acc`` is three float64: the table's prediction for the stages already run, the
elapsed time at the previous decision, and the slowdown estimate ``f`` (observed / profiled time).
``f`` starts at the prior from ``state`` and moves towards each stage's observed slowdown ``g`` by
``w = dt / (dt + tau)`` (``dt``: the stage's profiled time), an exponential forgetting with time
constant ``tau`` written without ``exp`` so the module needs nothing but libc's clock. The state is
two float64: the last request's final ``f`` and the clock (microseconds) when it ended; the prior
decays towards 1 as ``tau_idle / (tau_idle + age)``.
"""

from __future__ import annotations

import math

import numpy as np
import tvm

from ..contract import REROUTE_POLICIES, T

TABLE_FUNC = "nested_latency_table"
RULE_FUNC = "nested_reroute_rule"
START_FUNC = "nested_reroute_start"
FINISH_FUNC = "nested_reroute_finish"
ELAPSED_FUNC = "nested_elapsed_us"
CLOCK_FUNC = "nested_clock_ns"
CLOCK_MONOTONIC = 1  # <time.h> on Linux, every architecture
PAPER, EVIDENCE = (REROUTE_POLICIES.index(p) for p in ("paper", "evidence"))
DEFAULT_POLICY = "evidence"
# the evidence rule's margin when a build names none: its escape survives three times the slowdown
# seen. From bench/qos.py's sweep (0, 0.5, 1, 2): the one value that met the QoS goal on both
# workloads at 1 thread, pooled over two runs
DEFAULT_AGGRESSIVENESS = 2.0
STATE_SIZE, ACC_SIZE = 2, 3
# tau: a tenth of the densest request's profiled time. A 2x slowdown that starts with a request is
# believed at ~1.8x after a fifth of it; one preempted stage moves f by its share of tau, not to 2x.
TAU_SHARE = 0.1
# tau_idle: ten densest requests. Back-to-back requests share their load; one an idle second later,
# on this scale, starts from a prior halfway back to "as profiled".
TAU_IDLE_REQUESTS = 10.0
SLOWDOWN_RANGE = (0.25, 100.0)  # numerical guard on f (a clock step, a zero-time stage)


def check_table(table, num_stages: int, num_levels: int) -> np.ndarray:
    """A latency table as float64 ``(stages, levels)`` microseconds; ValueError naming the problem."""
    t = np.asarray(table, dtype=np.float64)
    if t.shape != (num_stages, num_levels):
        raise ValueError(
            f"latency table must have shape (stages, levels) = ({num_stages}, {num_levels}), got {t.shape}"
        )
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("latency table entries must be finite, non-negative microseconds")
    return t


def check_overhead(overhead_us) -> float:
    ovh = float(overhead_us)
    if not math.isfinite(ovh) or ovh < 0:
        raise ValueError(f"overhead_us must be a finite number >= 0, got {overhead_us!r}")
    return ovh


def time_constants(table) -> tuple[float, float]:
    """(tau, tau_idle) in microseconds for ``table`` (see the module docstring)."""
    request = float(np.asarray(table, dtype=np.float64)[:, 0].sum())
    return max(TAU_SHARE * request, 1.0), max(TAU_IDLE_REQUESTS * request, 1.0)


def _toward(f, dt, seen, tau: float):
    """``f`` moved towards a stage's observed slowdown ``seen / dt`` by ``dt / (dt + tau)``, kept in
    ``SLOWDOWN_RANGE`` (a TIR expression; ``_observe`` is its NumPy reference)."""
    fmin, fmax = SLOWDOWN_RANGE
    return T.min(T.max(f + dt / (dt + T.float64(tau)) * (seen / dt - f), T.float64(fmin)), T.float64(fmax))


def reroute_rule(table, level_dtype: str = "int32", overhead_us: float = 0.0) -> tvm.tirx.PrimFunc:
    """The decision before stage ``stage`` (= stages already run) as a PrimFunc.

    ``table``: the profiled ``(stages, levels)`` microseconds (its shape and time constants are
    compiled in; the values are an argument). ``policy`` 0 is the seed paper's plain rule, 1 the
    evidence rule (``relay_passes/deadline.py`` states both). ``overhead_us``: the per-call time the
    table does not cover, reserved in every prediction (``profile_overhead``).
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"reroute_rule needs a (stages, levels) table, got shape {table.shape}")
    K, L = table.shape
    ovh = check_overhead(overhead_us)
    tau, _ = time_constants(table)

    @T.prim_func(private=True)
    def rule(
        elapsed_us: T.Buffer((), "float64"),
        deadline_us: T.Buffer((), "float64"),
        requested: T.Buffer((), level_dtype),
        current: T.Buffer((), level_dtype),
        acc: T.Buffer((3,), "float64"),
        table: T.Buffer((K, L), "float64"),
        stage: T.int32,
        policy: T.Buffer((), "int32"),
        aggressiveness: T.Buffer((), "float64"),
        out: T.Buffer((), level_dtype),
        acc_out: T.Buffer((3,), "float64"),
    ):
        rem = T.alloc_buffer((L,), "float64")
        rest = T.alloc_buffer((1,), "float64")  # the sparsest level's time after this stage
        cur = T.max(T.min(T.Cast("int32", current[()]), L - 1), 0)
        req = T.max(T.min(T.Cast("int32", requested[()]), L - 1), 0)
        acc_out[0] = acc[0]
        acc_out[2] = acc[2]
        if stage >= 1:  # the stage just run: what the table predicted, and how much slower it was
            acc_out[0] = acc[0] + table[T.min(stage - 1, K - 1), cur]
            if table[T.min(stage - 1, K - 1), cur] > T.float64(0):
                acc_out[2] = _toward(acc[2], table[T.min(stage - 1, K - 1), cur], elapsed_us[()] - acc[1], tau)
        acc_out[1] = elapsed_us[()]
        rest[0] = T.float64(0)
        for s in range(K):
            if s > stage:
                rest[0] = rest[0] + table[s, L - 1]
        for l in range(L):
            rem[l] = T.float64(0)
            for s in range(K):
                if s >= stage:
                    rem[l] = rem[l] + table[s, l]
            rem[l] = rem[l] + T.float64(ovh)
            if policy[()] == EVIDENCE:  # as observed to the end, and the escape under the margin
                rem[l] = acc_out[2] * rem[l]
                if stage < K:
                    rem[l] = T.max(
                        rem[l],
                        acc_out[2]
                        * (T.float64(1) + T.max(aggressiveness[()], T.float64(0)))
                        * (table[T.min(stage, K - 1), l] + rest[0] + T.float64(ovh)),
                    )
        if policy[()] == EVIDENCE:  # the densest level from the requested one down that fits
            out[()] = T.Cast(level_dtype, L - 1)
            for i in range(L - 1):
                if L - 2 - i >= req and elapsed_us[()] + rem[L - 2 - i] <= deadline_us[()]:
                    out[()] = T.Cast(level_dtype, L - 2 - i)
        else:  # the paper: keep the level while it fits, else the densest sparser one that does
            out[()] = T.Cast(level_dtype, cur)
            if stage >= 1 and elapsed_us[()] + rem[cur] > deadline_us[()]:
                out[()] = T.Cast(level_dtype, L - 1)
                for i in range(L - 1):
                    if L - 2 - i > cur and elapsed_us[()] + rem[L - 2 - i] <= deadline_us[()]:
                        out[()] = T.Cast(level_dtype, L - 2 - i)

    return rule


def reroute_start(table) -> tvm.tirx.PrimFunc:
    """``acc`` at the start of a request: no stage run yet, ``f`` the aged prior of ``state``."""
    _, tau_idle = time_constants(table)
    fmin, fmax = SLOWDOWN_RANGE

    @T.prim_func(private=True)
    def start(t0_ns: T.Buffer((), "int64"), state: T.Buffer((2,), "float64"), acc: T.Buffer((3,), "float64")):
        age = T.alloc_buffer((1,), "float64")
        acc[0] = T.float64(0)
        acc[1] = T.float64(0)
        acc[2] = T.float64(1)
        age[0] = T.Cast("float64", t0_ns[()]) * T.float64(1e-3) - state[1]
        if state[1] > T.float64(0) and age[0] >= T.float64(0):
            acc[2] = T.min(
                T.max(
                    T.float64(1) + (state[0] - T.float64(1)) * T.float64(tau_idle) / (T.float64(tau_idle) + age[0]),
                    T.float64(fmin),
                ),
                T.float64(fmax),
            )

    return start


def reroute_finish(table, level_dtype: str = "int32") -> tvm.tirx.PrimFunc:
    """The state after the last stage: its observed slowdown folded into ``f``, and the clock."""
    table = np.asarray(table, dtype=np.float64)
    K, L = table.shape
    tau, _ = time_constants(table)

    @T.prim_func(private=True)
    def finish(
        elapsed_us: T.Buffer((), "float64"),
        current: T.Buffer((), level_dtype),
        acc: T.Buffer((3,), "float64"),
        table: T.Buffer((K, L), "float64"),
        t0_ns: T.Buffer((), "int64"),
        state: T.Buffer((2,), "float64"),
    ):
        cur = T.max(T.min(T.Cast("int32", current[()]), L - 1), 0)
        state[0] = acc[2]
        if table[K - 1, cur] > T.float64(0):
            state[0] = _toward(acc[2], table[K - 1, cur], elapsed_us[()] - acc[1], tau)
        state[1] = T.Cast("float64", t0_ns[()]) * T.float64(1e-3) + elapsed_us[()]

    return finish


def clock_ns(dep_dtype: str = "int32") -> tvm.tirx.PrimFunc:
    """Monotonic clock in ns; ``dep`` (the level) only anchors the call so nothing folds it."""

    @T.prim_func(private=True)
    def clock(dep: T.Buffer((), dep_dtype), out: T.Buffer((), "int64")):
        ts = T.alloc_buffer((2,), "int64")  # struct timespec {time_t tv_sec; long tv_nsec;} on LP64 Linux
        T.evaluate(T.call_extern("int32", "clock_gettime", CLOCK_MONOTONIC, T.address_of(ts[0])))
        out[()] = ts[0] * T.int64(1000000000) + ts[1] + T.Cast("int64", dep[()]) * T.int64(0)

    return clock


def elapsed_us() -> tvm.tirx.PrimFunc:
    """Microseconds since ``t0_ns``; ``stage`` makes every call site distinct (no CSE merges two)."""

    @T.prim_func(private=True)
    def elapsed(t0_ns: T.Buffer((), "int64"), stage: T.int32, out: T.Buffer((), "float64")):
        ts = T.alloc_buffer((2,), "int64")
        T.evaluate(T.call_extern("int32", "clock_gettime", CLOCK_MONOTONIC, T.address_of(ts[0])))
        out[()] = T.Cast("float64", ts[0] * T.int64(1000000000) + ts[1] - t0_ns[()]) * T.float64(1e-3) + T.Cast(
            "float64", stage
        ) * T.float64(0)

    return elapsed


# ------------------------------------------------------------------------------ NumPy references
def _observe(table, f, elapsed, previous, stage, cur):
    tau, _ = time_constants(table)
    dt = table[min(stage - 1, table.shape[0] - 1), cur]
    if dt <= 0:
        return f
    return float(np.clip(f + dt / (dt + tau) * ((elapsed - previous) / dt - f), *SLOWDOWN_RANGE))


def start(table, t0_ns: int, state) -> np.ndarray:
    """NumPy reference of ``nested_reroute_start``."""
    _, tau_idle = time_constants(table)
    f, last = float(state[0]), float(state[1])
    age = t0_ns * 1e-3 - last
    if last > 0 and age >= 0:
        f = float(np.clip(1 + (f - 1) * tau_idle / (tau_idle + age), *SLOWDOWN_RANGE))
    else:
        f = 1.0
    return np.array([0.0, 0.0, f])


def decide(
    table,
    elapsed_us_: float,
    deadline_us: float,
    requested: int,
    current: int,
    stage: int,
    acc,
    policy: str = "evidence",
    aggressiveness: float = 0.0,
    overhead_us: float = 0.0,
) -> tuple[int, np.ndarray]:
    """NumPy reference of ``nested_reroute_rule``: (next level, evidence after this decision)."""
    table = np.asarray(table, dtype=np.float64)
    K, L = table.shape
    cur, req = min(max(int(current), 0), L - 1), min(max(int(requested), 0), L - 1)
    spent, previous, f = (float(v) for v in acc)
    if stage >= 1:
        spent += table[min(stage - 1, K - 1), cur]
        f = _observe(table, f, elapsed_us_, previous, stage, cur)
    new_acc = np.array([spent, elapsed_us_, f])
    rem = table[stage:].sum(axis=0) + overhead_us
    if REROUTE_POLICIES.index(policy) == EVIDENCE:
        rem = f * rem
        if stage < K:
            escape = table[stage] + table[stage + 1 :, L - 1].sum() + overhead_us
            rem = np.maximum(rem, f * (1 + max(aggressiveness, 0.0)) * escape)

    def fits(lvl):
        return elapsed_us_ + rem[lvl] <= deadline_us

    if REROUTE_POLICIES.index(policy) == EVIDENCE:
        return next((lvl for lvl in range(req, L) if fits(lvl)), L - 1), new_acc
    if stage == 0 or fits(cur):
        return cur, new_acc
    return next((lvl for lvl in range(cur + 1, L) if fits(lvl)), L - 1), new_acc


def finish(table, elapsed_us_: float, current: int, acc, t0_ns: int) -> np.ndarray:
    """NumPy reference of ``nested_reroute_finish``."""
    table = np.asarray(table, dtype=np.float64)
    K, L = table.shape
    cur = min(max(int(current), 0), L - 1)
    f = _observe(table, float(acc[2]), elapsed_us_, float(acc[1]), K, cur)
    return np.array([f, t0_ns * 1e-3 + elapsed_us_])


__all__ = [
    "ACC_SIZE",
    "CLOCK_FUNC",
    "DEFAULT_AGGRESSIVENESS",
    "DEFAULT_POLICY",
    "ELAPSED_FUNC",
    "EVIDENCE",
    "FINISH_FUNC",
    "PAPER",
    "RULE_FUNC",
    "START_FUNC",
    "STATE_SIZE",
    "TABLE_FUNC",
    "check_overhead",
    "check_table",
    "clock_ns",
    "decide",
    "elapsed_us",
    "finish",
    "reroute_finish",
    "reroute_rule",
    "reroute_start",
    "start",
    "time_constants",
]
