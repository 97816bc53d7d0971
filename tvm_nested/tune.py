"""tune: MetaSchedule (XGBoost cost model) over the nested kernels and the dense operators.

    report = tvm_nested.tune(mod, "llvm", "logs/model", max_trials=64)
    lib = tvm_nested.build(mod, "llvm", tuning_log="logs/model")   # no measurement

What is tuned, after lowering through ``pipeline.lower`` and TVM's CPU legalization (the same
passes ``tvm.compile`` runs, so the workloads are the functions ``build`` compiles):

* every nested kernel (a PrimFunc with a ``nested.op`` attr) over ``schedules.space.cpu_space``:
  the grid of ``schedule_cpu``'s knobs, measured with its REAL packed arrays (the constants at its
  ``call_tir`` site), a random input and the level. One compiled kernel serves every level, so its
  schedule is chosen on all levels together: the runner's ``alloc_repeat`` argument sets cycle
  through the levels, one timing each, and MetaSchedule ranks a candidate by their mean (the
  average latency over levels). The per-level timings stay in the record and in the report.
* every dense operator task (``extract_tasks``) with MetaSchedule's default space. Tasks without
  loops (the 0-d level guard) are skipped: there is nothing to tune.

Everything goes into one tuning log (``tunelog``: MetaSchedule's JSON database + manifest), one
line per measured candidate, so an interrupted run keeps what it measured and tuning again adds.

``apply_tuning_log`` is what ``build`` calls: the same lowering, then
``MetaScheduleApplyDatabase`` (query only, never measure). The functions it schedules carry
``tirx.is_scheduled``, so ``schedule_kernels`` leaves them alone and only untuned kernels get the
default knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from . import pipeline, tunelog
from .target import is_cross, parse_target

# MetaSchedule's evaluator: one timing (>= _MIN_REPEAT_MS) per level per candidate.
_MIN_REPEAT_MS = 40
_RUN_TIMEOUT_S = 60
# Cross toolchain per target architecture (the RPC path exports a .so the board can load).
_CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}
# TVM's tensor intrinsics per architecture: MetaSchedule's default CPU rules look them up.
_INTRIN_MODULES = {"x86_64": ("x86",), "aarch64": ("arm_cpu",), "arm": ("arm_cpu",)}


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class RPCSettings:
    """Where a remote board measures candidates: a tracker (host, port, key) or a board's RPC server.

    ``RPCSettings(tracker_host="10.0.0.2", tracker_port=9190, key="rk3588")`` or
    ``RPCSettings(host="10.0.0.7", port=9090)``. ``session_timeout``: seconds per measurement session.
    """

    tracker_host: str | None = None
    tracker_port: int | None = None
    key: str | None = None
    host: str | None = None
    port: int | None = None
    session_timeout: int = 60

    def __post_init__(self):
        tracker = (self.tracker_host, self.tracker_port, self.key)
        direct = (self.host, self.port)
        if all(v is not None for v in tracker) and all(v is None for v in direct):
            return
        if all(v is not None for v in direct) and all(v is None for v in tracker):
            return
        raise ValueError("RPCSettings needs either tracker_host, tracker_port and key (an RPC tracker), or host and "
                         f"port (one board's RPC server), not a mix: got {self}")

    @property
    def uses_tracker(self) -> bool:
        return self.tracker_host is not None


@dataclass
class KernelTuning:
    """One tuned function: a nested kernel or a dense operator task."""

    name: str
    kind: str                      # "nested" or "dense"
    op: str                        # nested.op ("conv2d", "linear") or the dense task's name
    trials: int                    # records this run added
    records: int                   # records of this workload in the log now
    best_seconds: float | None     # the best record's mean over its timings (levels, for nested)
    levels: list[int] = field(default_factory=list)
    level_seconds: list[float] | None = None   # per level in ``levels``, from the best record

    def latency(self, level: int) -> float:
        if self.level_seconds is None or level not in self.levels:
            raise KeyError(f"{self.name}: no measured latency for level {level}")
        return self.level_seconds[self.levels.index(level)]


@dataclass
class TuningReport:
    log_dir: str
    target: str
    kernels: list[KernelTuning]
    seconds: float

    @property
    def nested(self) -> list[KernelTuning]:
        return [k for k in self.kernels if k.kind == "nested"]

    @property
    def dense(self) -> list[KernelTuning]:
        return [k for k in self.kernels if k.kind == "dense"]

    def __str__(self) -> str:
        lines = [f"tuning log {self.log_dir} ({self.seconds:.0f} s)",
                 "| function | kind | new records | best ms | per level ms |",
                 "|---|---|---:|---:|---|"]
        for k in self.kernels:
            best = "-" if k.best_seconds is None else f"{k.best_seconds * 1e3:.4f}"
            per = "" if k.level_seconds is None else ", ".join(
                f"L{lvl}: {s * 1e3:.4f}" for lvl, s in zip(k.levels, k.level_seconds))
            lines.append(f"| {k.name} | {k.kind} {k.op} | {k.trials} | {best} | {per} |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- the workloads
def _legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """TVM's CPU legalization (LegalizeOps .. FuseTIR): the functions ``tvm.compile`` will build."""
    from tvm.relax.backend.cpu_generic import legalize_passes

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def _check_cpu(target: tvm.target.Target) -> None:
    if target.kind.name != "llvm":
        raise ValueError(f"tuning supports llvm (CPU) targets; {target.kind.name} has no nested-kernel "
                         "design space yet")


def _is_nested(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "nested.op" in func.attrs


def _has_loops(func) -> bool:
    """False for functions over 0-d tensors only (the level guard): nothing to tune."""
    return any(len(getattr(p.ty, "shape", ())) > 0 for p in func.params)


def _call_sites(mod: tvm.IRModule) -> dict[str, list]:
    """First ``call_tir`` argument list of every callee in the Relax functions."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites: dict[str, list] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            callee = expr.args[0]
            if isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint not in sites:
                sites[callee.name_hint] = list(expr.args[1].fields)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


def _arg_specs(args: list) -> list:
    """How the runner fills each kernel parameter: ('const', array) | ('level',) | ('random',)."""
    specs = []
    for a in args:
        if isinstance(a, tvm.ir.Constant):
            specs.append(("const", a.value.numpy()))
        elif len(a.ty.shape) == 0 and getattr(a.ty.dtype, "dtype", str(a.ty.dtype)).startswith("int"):
            specs.append(("level",))
        else:
            specs.append(("random",))
    return specs


# ------------------------------------------------------------------------- MetaSchedule plumbing
def register_tensor_intrinsics(target: tvm.target.Target) -> None:
    """Register the tensor intrinsics of ``target``'s architecture (idempotent, any order of targets).

    MetaSchedule's ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which registers every
    architecture's intrinsics (CUDA, ROCm, Hexagon, RISC-V...): 45-100 s on a small machine, per
    process. When nothing imported it yet, the package is entered empty (its real path, so any
    submodule still imports on demand); then this architecture's submodules are imported, on every
    call: a process that tuned for aarch64 first still gets the x86 intrinsics (``dot_16x4_vnni``,
    which MetaSchedule's x86 rules look up on VNNI CPUs) when it tunes for the host.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import types

        import tvm.s_tir as s_tir

        package = types.ModuleType(name, "Tensor intrinsics, entered per architecture by tvm_nested.tune")
        package.__path__ = [os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin")]
        package.__package__ = name
        sys.modules[name] = package
    import importlib
    import platform

    arch = str(target.attrs.get("mtriple", "") or platform.machine()).split("-")[0]
    for sub in _INTRIN_MODULES.get(arch, ()):
        importlib.import_module(f"{name}.{sub}")


def _build_candidate(mod, target, _params):
    """MetaSchedule's default build minus its import of every architecture's tensor intrinsics,
    which a fresh builder worker would pay on every batch (tvm027-cookbook section 4)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_cross(mod, cc: str) -> str:
    """A shared library the board can load (the RPC runner uploads it)."""
    import tempfile

    from tvm.support import cc as tvm_cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
    return path


def _signature(args_info) -> str:
    """A kernel's parameters as the runner sees them (args_info: ["TENSOR", dtype, shape] each)."""
    return ";".join(f"{info[1]}{[int(v) for v in info[2]]}" for info in args_info)


def _alloc_arguments(device, args_info, alloc_repeat, *, kernels, levels, seed):
    """Runner-side arguments. A nested kernel (found by its signature in ``kernels``) gets its real
    packed arrays, a random input and one argument set per level in ``levels`` (so its timings are
    per level, in that order); any other function gets random data, ``alloc_repeat`` times."""
    rng = np.random.default_rng(seed)
    specs = kernels.get(_signature(args_info))
    base = []
    for i, info in enumerate(args_info):
        dtype, shape = str(info[1]), [int(v) for v in info[2]]
        spec = specs[i] if specs is not None and i < len(specs) else ("random",)
        if spec[0] == "const":
            base.append(spec[1])
        elif spec[0] == "level":
            base.append(None)
        elif dtype.startswith("float"):
            base.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.startswith(("int", "uint")):
            base.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            base.append(np.zeros(shape, dtype))
    sets = [np.array(lvl, "int32") for lvl in levels] if specs is not None else [None] * alloc_repeat
    out = []
    for level in sets:
        row = []
        for a in (level if a is None else a for a in base):
            t = tvm.runtime.empty(a.shape, str(a.dtype), device)  # local or remote (RPC) device alike
            t.copyfrom(a)
            row.append(t)
        out.append(row)
    return out


def _rpc_alloc(session, device, args_info, alloc_repeat, **kwargs):
    return _alloc_arguments(device, args_info, alloc_repeat, **kwargs)


def _rpc_direct_session(rpc_config, *, host, port, timeout):
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def _export_local(mod) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="tvm_nested_tune_"), "candidate.so")
    mod.export_library(path)
    return path


@functools.lru_cache(maxsize=1)
def _in_process_builder_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        """Builds candidates in this process, one after another.

        MetaSchedule's LocalBuilder starts a fresh pool of worker processes for every batch, each
        importing TVM (10-30 s on a small, shared machine) before it builds anything; that start-up
        dominated tuning here. Candidates of the nested and dense spaces are plain loop nests whose
        compilation does not crash, so the isolation is not worth its price. Errors are reported
        per candidate like LocalBuilder does.
        """

        def __init__(self, f_export):
            super().__init__()
            self.f_export = f_export

        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    path = self.f_export(_build_candidate(item.mod, item.target, None))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as err:  # noqa: BLE001 (a failed candidate is a result, not a crash)
                    results.append(ms.builder.BuilderResult(None, f"{type(err).__name__}: {err}"))
            return results

    return InProcessBuilder


def _builder(target: tvm.target.Target, runner):
    f_export = _export_local
    if runner != "local" and is_cross(target):
        arch = str(target.attrs.get("mtriple", "")).split("-")[0]
        if arch not in _CROSS_CC:
            raise ValueError(f"no known cross compiler for {target.attrs.get('mtriple')}: cannot export candidates")
        f_export = functools.partial(_export_cross, cc=_CROSS_CC[arch])
    return _in_process_builder_class()(f_export)


def _runner(runner, *, kernels=None, levels=(0,), seed=0):
    """One MetaSchedule runner for ``runner`` ("local" | RPCSettings) serving every task: nested
    kernels (``kernels``: signature -> argument specs) are measured on real arrays at each level."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=_MIN_REPEAT_MS)
    alloc = {"kernels": dict(kernels or {}), "levels": list(levels), "seed": seed}
    if runner == "local":
        return ms.runner.LocalRunner(timeout_sec=_RUN_TIMEOUT_S, evaluator_config=config,
                                     f_alloc_argument=functools.partial(_alloc_arguments, **alloc))
    if not isinstance(runner, RPCSettings):
        raise TypeError(f"runner must be 'local' or tvm_nested.tune.RPCSettings, got {type(runner).__name__} "
                        "(MetaSchedule runners are not accepted: they would measure nested kernels on random indices)")
    extra = {}
    if runner.uses_tracker:
        rpc_config = ms.runner.RPCConfig(tracker_host=runner.tracker_host, tracker_port=runner.tracker_port,
                                         tracker_key=runner.key, session_timeout_sec=runner.session_timeout)
    else:
        # RPCConfig insists on tracker fields; the board's address stands in (f_create_session connects directly)
        rpc_config = ms.runner.RPCConfig(tracker_host=runner.host, tracker_port=runner.port, tracker_key="direct",
                                         session_timeout_sec=runner.session_timeout)
        extra["f_create_session"] = functools.partial(_rpc_direct_session, host=runner.host, port=runner.port,
                                                      timeout=runner.session_timeout)
    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=config,  # time-out: session_timeout
                               f_alloc_argument=functools.partial(_rpc_alloc, **alloc), **extra)


def _measure_defaults(db, task_mod, target, builder, runner) -> None:
    """Measure ``schedule_cpu``'s default knobs first and record them, so the log's best for a
    nested kernel is never worse than what an untuned build compiles (the search may not sample
    that grid point within a small trial budget)."""
    from tvm.s_tir import meta_schedule as ms

    from .schedules.cpu import apply_knobs, default_knobs

    sch = tvm.s_tir.Schedule(task_mod, debug_mask="all")
    apply_knobs(sch, default_knobs(target))
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg is not None:
        raise RuntimeError(f"default schedule does not build: {built.error_msg}")
    args_info = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
    result = future.result()
    if result.error_msg is not None or not result.run_secs:
        raise RuntimeError(f"default schedule does not run: {result.error_msg}")
    workload = db.commit_workload(task_mod)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [float(v) for v in result.run_secs],
                                                     target, args_info))


def _workload_records(db, task_mod) -> list:
    if not db.has_workload(task_mod):
        return []
    wl = db.commit_workload(task_mod)
    return [r for r in db.get_all_tuning_records() if tvm_ffi.structural_equal(r.workload.mod, wl.mod)]


def _best(records):
    ok = [r for r in records if r.run_secs]
    return min(ok, key=lambda r: float(np.mean([float(s) for s in r.run_secs])), default=None)


# ------------------------------------------------------------------------------------- public
@contextlib.contextmanager
def _metaschedule_logging():
    """TVM 0.27's ``tune_tir`` re-configures its logger with ``dictConfig``, listing the handlers already
    on it by name: one it did not create (pytest's log capture, a user's unnamed handler) makes it
    crash ("'NoneType' object has no attribute 'format'"). Those are detached while it tunes and put
    back afterwards."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(logger.name)]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)


def tune(mod: tvm.IRModule, target, work_dir: str | os.PathLike, *, max_trials: int = 64, runner="local",
         levels=None, num_trials_per_iter: int = 16, seed: int = 0, progress: bool = True) -> TuningReport:
    """Tune every nested kernel and dense operator of ``mod`` for ``target`` into the log ``work_dir``.

    ``max_trials``: measured candidates per function (each nested kernel, each dense task).
    ``runner``: ``"local"`` (this machine) or ``RPCSettings`` (a board). ``levels``: the levels a
    nested kernel is measured at (default: all); a candidate's cost is their mean.
    """
    from tvm.s_tir import meta_schedule as ms

    from .schedules.space import cpu_space

    if max_trials < 1 or num_trials_per_iter < 1:
        raise ValueError(f"max_trials and num_trials_per_iter must be >= 1, got {max_trials}, {num_trials_per_iter}")
    if runner != "local" and not isinstance(runner, RPCSettings):
        _runner(runner)  # raises the explanatory TypeError
    tgt = parse_target(target)
    _check_cpu(tgt)
    if runner == "local" and is_cross(tgt):
        raise ValueError(f"target {tgt} does not run on this machine: tune it on the board with "
                         "runner=RPCSettings(...)")
    path = tunelog.open_for_tuning(work_dir, tgt)
    start = time.time()
    say = print if progress else (lambda *a, **k: None)

    # CPU structure of the kernels (lanes, flat conv) and the sparse-or-dense choice per layer and
    # level, measured here (local runner), so the log records the kernels build compiles
    from .schedules import choice

    lowered, _ = choice.specialize_module(pipeline.lower(mod), tgt)
    if runner == "local":
        measured = choice.measure_choices(lowered, tgt, levels, progress=say)
        choice.save_choices(path, measured, str(tgt))
    lowered, _ = choice.apply_choices(lowered, choice.load_choices(path))
    lowered = _legalize(lowered, tgt)
    from .relay_passes.lower_nested import read_nested_info

    info = read_nested_info(lowered) or {"num_levels": 1}
    num_levels = int(info["num_levels"])
    levels = list(range(num_levels)) if levels is None else [int(v) for v in levels]
    bad = [v for v in levels if not 0 <= v < num_levels]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of 0..{num_levels - 1}, got {levels}")
    sites = _call_sites(lowered)
    tasks = [t for t in ms.relax_integration.extract_tasks(lowered, tgt)
             if _has_loops(t.dispatched[0]["main"])]
    tasks.sort(key=lambda t: not _is_nested(t.dispatched[0]["main"]))  # nested kernels first
    kernels = {}  # signature -> real arguments, for every nested kernel
    for t in tasks:
        func = t.dispatched[0]["main"]
        if _is_nested(func):
            infos = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)]
            kernels[_signature(infos)] = _arg_specs(sites[t.task_name])
    register_tensor_intrinsics(tgt)
    builder = _builder(tgt, runner)
    measure = _runner(runner, kernels=kernels, levels=levels, seed=seed)
    db = tunelog.database(path)
    say(f"[tvm-nested tune] {len(tasks)} functions ({sum(_is_nested(t.dispatched[0]['main']) for t in tasks)} nested), "
        f"{max_trials} trials each, levels {levels}, log {path}")
    results = []
    for i, task in enumerate(tasks, start=1):
        task_mod = task.dispatched[0]
        func = task_mod["main"]
        nested = _is_nested(func)
        before = len(_workload_records(db, task_mod))
        kind = f"nested {func.attrs['nested.op']}" if nested else "dense"
        say(f"[tvm-nested tune] {i}/{len(tasks)} {task.task_name} ({kind})"
            f": {before} records in the log", flush=True)
        space = cpu_space(tgt) if nested else "post-order-apply"
        if nested and before == 0:
            _measure_defaults(db, task_mod, tgt, builder, measure)
        with _metaschedule_logging():
            ms.tune_tir(task_mod, tgt, str(path), max_trials_global=max_trials,
                        num_trials_per_iter=min(num_trials_per_iter, max_trials), builder=builder, runner=measure,
                        database=db, cost_model="xgb", space=space, seed=seed,
                        strategy=ms.search_strategy.EvolutionarySearch(
                            population_size=max(64, min(512, 8 * max_trials)), max_fail_count=2))
        records = _workload_records(db, task_mod)
        best = _best(records)
        run_secs = [float(s) for s in best.run_secs] if best is not None else None
        per_level = run_secs if nested and run_secs and len(run_secs) == len(levels) else None
        results.append(KernelTuning(
            name=task.task_name, kind="nested" if nested else "dense",
            op=str(func.attrs["nested.op"]) if nested else task.task_name,
            trials=len(records) - before, records=len(records),
            best_seconds=float(np.mean(run_secs)) if run_secs else None,
            levels=list(levels) if nested else [], level_seconds=per_level))
        r = results[-1]
        say(f"[tvm-nested tune] {i}/{len(tasks)} {task.task_name}: +{r.trials} records, best "
            + ("-" if r.best_seconds is None else f"{r.best_seconds * 1e3:.4f} ms")
            + ("" if per_level is None
               else " (" + ", ".join(f"L{lv} {s * 1e3:.4f}" for lv, s in zip(levels, per_level)) + ")"),
            flush=True)
    report = TuningReport(str(path), str(tgt), results, time.time() - start)
    say(str(report))
    return report


def apply_tuning_log(mod: tvm.IRModule, target, tuning_log) -> tvm.IRModule:
    """Schedule ``mod`` (already through ``pipeline.lower``) from a tuning log, measuring nothing.

    Raises ``tunelog.TuningLogError`` for a log of another target or an incompatible version. The
    returned module is legalized and fused; its tuned functions carry ``tirx.is_scheduled``.
    """
    tgt = parse_target(target)
    path = tunelog.check(tuning_log, tgt)
    db = tunelog.database(path)
    legal = _legalize(mod, tgt)
    with db, tgt, tvm.transform.PassContext(opt_level=3):  # the pass queries Database.current()
        return relax.transform.MetaScheduleApplyDatabase(None, enable_warning=False)(legal)


# ------------------------------------------------------------------------------------------ CLI
def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def tune_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="tvm-nested tune", description="Tune a nested model into a tuning log")
    ap.add_argument("model", help="ONNX model (.onnx) or torch.export archive (.pt2)")
    ap.add_argument("--target", default="llvm", help="target to tune for (default: this CPU)")
    ap.add_argument("--log", required=True, help="tuning log directory (created, or appended to for the same target)")
    ap.add_argument("--trials", type=int, default=64, help="measured candidates per function (default 64)")
    ap.add_argument("--levels", default=None, help="comma-separated levels to measure (default: all)")
    ap.add_argument("--rpc-tracker", "--tracker", type=_host_port, default=None, help="host:port of an RPC tracker")
    ap.add_argument("--rpc-key", "--key", default=None, help="device key at the tracker")
    ap.add_argument("--rpc", type=_host_port, default=None, help="host:port of one board's RPC server")
    ap.add_argument("--session-timeout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    return ap


def tune_main(argv=None) -> int:
    """``tvm-nested tune model.onnx|.pt2 --target ... --log DIR --trials N``
    ``[--rpc-tracker host:port --rpc-key K | --rpc host:port]``; returns the exit status."""
    from .cli import _load_model

    args = tune_parser().parse_args(argv)
    if args.rpc_tracker and args.rpc:
        raise SystemExit("error: give --rpc-tracker (with --rpc-key) or --rpc, not both")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise SystemExit("error: --rpc-tracker and --rpc-key go together")
    runner = "local"
    if args.rpc_tracker:
        runner = RPCSettings(tracker_host=args.rpc_tracker[0], tracker_port=args.rpc_tracker[1], key=args.rpc_key,
                             session_timeout=args.session_timeout)
    elif args.rpc:
        runner = RPCSettings(host=args.rpc[0], port=args.rpc[1], session_timeout=args.session_timeout)
    levels = None if args.levels is None else [int(v) for v in args.levels.split(",")]
    try:
        tune(_load_model(args.model), args.target, args.log, max_trials=args.trials, runner=runner, levels=levels,
             seed=args.seed, progress=not args.quiet)
    except tunelog.TuningLogError as err:
        raise SystemExit(f"error: {err}") from err
    return 0


__all__ = ["RPCSettings", "TuningReport", "KernelTuning", "tune", "apply_tuning_log", "tune_main"]
