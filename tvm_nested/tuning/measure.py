"""MetaSchedule plumbing for tuning nested kernels: builder, runner, real arguments, logging.

What ``tuning/tuner.py`` drives. MetaSchedule as shipped cannot tune a nested kernel usefully: its
runner fills every argument with random data (random index arrays read out of bounds or measure a
different sparsity), and its builder re-imports every architecture's tensor intrinsics per batch.
So candidates are built in this process (``InProcessBuilder``) and measured with the kernel's real
packed arrays at each level (``alloc_arguments``), locally or on a board over RPC (``RPCSettings``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import platform
import sys
import tempfile
import types
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support import cc as tvm_cc

from ..contract import CROSS_TOOLCHAINS
from ..target import is_cross

# MetaSchedule's evaluator: one timing (>= MIN_REPEAT_MS) per level per candidate.
MIN_REPEAT_MS = 40
RUN_TIMEOUT_S = 60
# TVM's tensor intrinsics per architecture: MetaSchedule's default CPU rules look them up.
_INTRIN_MODULES = {"x86_64": ("x86",), "aarch64": ("arm_cpu",), "arm": ("arm_cpu",)}


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
        raise ValueError(
            "RPCSettings needs either tracker_host, tracker_port and key (an RPC tracker), or host and "
            f"port (one board's RPC server), not a mix: got {self}"
        )

    @property
    def uses_tracker(self) -> bool:
        return self.tracker_host is not None


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
        package = types.ModuleType(name, "Tensor intrinsics, entered per architecture by tvm_nested.tune")
        package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        package.__package__ = name
        sys.modules[name] = package
    arch = str(target.attrs.get("mtriple", "") or platform.machine()).split("-")[0]
    for sub in _INTRIN_MODULES.get(arch, ()):
        importlib.import_module(f"{name}.{sub}")


def _build_candidate(mod, target):
    """MetaSchedule's default build minus its import of every architecture's tensor intrinsics,
    which a fresh builder worker would pay on every batch (tvm027-cookbook section 4)."""
    rewrite = tvm.s_tir.transform.RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)
    return tvm.tirx.build(rewrite(mod), target=target)


def _export_cross(mod, cc: str) -> str:
    """A shared library the board can load (the RPC runner uploads it)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvm_nested_tune_"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
    return path


def _alloc_arguments(device, args_info, alloc_repeat, *, seed=0):
    """Runner-side arguments of a dense task: normal floats, and integers in {0, 1} (safe as
    indices: a random integer tensor read as an index would read out of bounds on the board)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(alloc_repeat):
        row = []
        for info in args_info:
            dtype, shape = str(info[1]), [int(v) for v in info[2]]
            if dtype.startswith("float"):
                a = rng.standard_normal(shape).astype(dtype)
            elif dtype.startswith(("int", "uint")):
                a = rng.integers(0, 2, shape).astype(dtype)
            else:
                a = np.zeros(shape, dtype)
            t = tvm.runtime.empty(a.shape, str(a.dtype), device)  # local or remote (RPC) device alike
            t.copyfrom(a)
            row.append(t)
        out.append(row)
    return out


def _rpc_alloc(session, device, args_info, alloc_repeat, **kwargs):
    return _alloc_arguments(device, args_info, alloc_repeat, **kwargs)


def _rpc_direct_session(rpc_config, *, host, port, timeout):
    return tvm.rpc.connect(host, port, session_timeout=timeout)


def open_session(settings: RPCSettings):
    """An RPC session with the board ``settings`` names (directly or through its tracker)."""
    if settings.uses_tracker:
        tracker = tvm.rpc.connect_tracker(settings.tracker_host, settings.tracker_port)
        return tracker.request(settings.key, session_timeout=settings.session_timeout)
    return tvm.rpc.connect(settings.host, settings.port, session_timeout=settings.session_timeout)


def _export_local(mod) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="tvm_nested_tune_"), "candidate.so")
    mod.export_library(path)
    return path


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
                path = self.f_export(_build_candidate(item.mod, item.target))
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as err:
                results.append(ms.builder.BuilderResult(None, f"{type(err).__name__}: {err}"))
        return results


def make_builder(target: tvm.target.Target, runner) -> InProcessBuilder:
    """The builder for ``runner``'s device: a local .so, or one cross-compiled for the board."""
    f_export = _export_local
    if runner != "local" and is_cross(target):
        arch = str(target.attrs.get("mtriple", "")).split("-")[0]
        if arch not in CROSS_TOOLCHAINS:
            raise ValueError(f"no known cross compiler for {target.attrs.get('mtriple')}: cannot export candidates")
        f_export = functools.partial(_export_cross, cc=CROSS_TOOLCHAINS[arch].cc)
    return InProcessBuilder(f_export)


def make_runner(runner, *, seed=0):
    """One MetaSchedule runner for ``runner`` ("local" | RPCSettings) serving every dense task."""
    config = ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=MIN_REPEAT_MS)
    alloc = {"seed": seed}
    if runner == "local":
        return ms.runner.LocalRunner(
            timeout_sec=RUN_TIMEOUT_S,
            evaluator_config=config,
            f_alloc_argument=functools.partial(_alloc_arguments, **alloc),
        )
    if not isinstance(runner, RPCSettings):
        raise TypeError(
            f"runner must be 'local' or tvm_nested.tune.RPCSettings, got {type(runner).__name__} "
            "(MetaSchedule runners are not accepted: nested kernels are measured on their real weights)"
        )
    extra = {}
    if runner.uses_tracker:
        rpc_config = ms.runner.RPCConfig(
            tracker_host=runner.tracker_host,
            tracker_port=runner.tracker_port,
            tracker_key=runner.key,
            session_timeout_sec=runner.session_timeout,
        )
    else:
        # RPCConfig insists on tracker fields; the board's address stands in (f_create_session connects directly)
        rpc_config = ms.runner.RPCConfig(
            tracker_host=runner.host,
            tracker_port=runner.port,
            tracker_key="direct",
            session_timeout_sec=runner.session_timeout,
        )
        extra["f_create_session"] = functools.partial(
            _rpc_direct_session, host=runner.host, port=runner.port, timeout=runner.session_timeout
        )
    return ms.runner.RPCRunner(
        rpc_config=rpc_config,
        evaluator_config=config,  # time-out: session_timeout
        f_alloc_argument=functools.partial(_rpc_alloc, **alloc),
        **extra,
    )


def workload_records(db, task_mod) -> list:
    if not db.has_workload(task_mod):
        return []
    wl = db.commit_workload(task_mod)
    return [r for r in db.get_all_tuning_records() if tvm_ffi.structural_equal(r.workload.mod, wl.mod)]


def best_record(records):
    ok = [r for r in records if r.run_secs]
    return min(ok, key=lambda r: float(np.mean([float(s) for s in r.run_secs])), default=None)


@contextlib.contextmanager
def metaschedule_logging():
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
