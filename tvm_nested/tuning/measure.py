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
import time
import types
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support import cc as tvm_cc

from ..contract import CROSS_TOOLCHAINS
from ..runtime.rpc import BoardError, connect, probe_server, tracker_summary
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
    ``RPCSettings(host="10.0.0.7", port=9090)``. ``session_timeout``: seconds one measurement may
    take, from reaching the board to its last timing; a board that does not answer within it stops
    the tuning with ``BoardError`` naming it (the records measured before are kept).
    """

    tracker_host: str | None = None
    tracker_port: int | None = None
    key: str | None = None
    host: str | None = None
    port: int | None = None
    session_timeout: int = 60

    def __post_init__(self):
        timeout = self.session_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"RPCSettings: session_timeout must be a number of seconds > 0, got {timeout!r}")
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

    @property
    def where(self) -> str:
        if self.uses_tracker:
            return f"tracker {self.tracker_host}:{self.tracker_port} key {self.key!r}"
        return f"board {self.host}:{self.port}"

    def connect(self):
        """An RPC session with the board, within ``session_timeout`` (BoardError naming it otherwise)."""
        if self.uses_tracker:
            return connect(
                tracker=(self.tracker_host, self.tracker_port),
                key=self.key,
                timeout=self.session_timeout,
                session_timeout=self.session_timeout,
            )
        return connect((self.host, self.port), timeout=self.session_timeout, session_timeout=self.session_timeout)

    def check_reachable(self) -> None:
        """Before any work: the board's server answers, or the tracker does and knows the key."""
        if not self.uses_tracker:
            probe_server(self.host, self.port, self.session_timeout)
            return
        summary = tracker_summary(self.tracker_host, self.tracker_port, self.session_timeout)
        queue = summary.get("queue_info", {})
        if self.key not in queue:
            raise BoardError(
                f"{self.where}: the tracker has no server registered with this key (keys: {sorted(queue) or 'none'})"
            )


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


def _export_cross(mod, cc: str, scratch: str) -> str:
    """A shared library the board can load (the RPC runner uploads it). Each candidate has a folder
    of its own in ``scratch`` (MetaSchedule's RemoveBuildArtifact removes it once it is measured)."""
    path = os.path.join(tempfile.mkdtemp(prefix="candidate_", dir=scratch), "tvm_tmp_mod.so")
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


def _rpc_session(rpc_config, *, settings: RPCSettings):
    """MetaSchedule's f_create_session: a bounded connect (TVM's own blocks on a silent board)."""
    return settings.connect()


def _export_local(mod, scratch: str) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="candidate_", dir=scratch), "candidate.so")
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


def make_builder(target: tvm.target.Target, runner, scratch: str) -> InProcessBuilder:
    """The builder for ``runner``'s device: a local .so, or one cross-compiled for the board; the
    candidates go into ``scratch`` (one temporary folder per tuning run, removed by ``tune``)."""
    f_export = functools.partial(_export_local, scratch=scratch)
    if runner != "local" and is_cross(target):
        arch = str(target.attrs.get("mtriple", "")).split("-")[0]
        if arch not in CROSS_TOOLCHAINS:
            raise ValueError(f"no known cross compiler for {target.attrs.get('mtriple')}: cannot export candidates")
        f_export = functools.partial(_export_cross, cc=CROSS_TOOLCHAINS[arch].cc, scratch=scratch)
    return InProcessBuilder(f_export)


@derived_object
class _StalledFuture(ms.runner.PyRunnerFuture):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def done(self) -> bool:
        return True

    def result(self):
        return ms.runner.RunnerResult(None, self.message)


@derived_object
class _BoundedFuture(ms.runner.PyRunnerFuture):
    def __init__(self, owner, inner):
        super().__init__()
        self.owner, self.inner = owner, inner

    def done(self) -> bool:
        return self.owner.stalled is not None or self.inner.done()

    def result(self):
        return self.owner.wait(self.inner)


@derived_object
class BoundedRunner(ms.runner.PyRunner):
    """MetaSchedule's RPCRunner with its time-out honoured.

    RPCRunner hands each measurement to a worker process and then waits for its result without a
    time-out: a board that accepts and never answers kept ``tune`` waiting for ever. Here a result
    not back ``timeout`` seconds after it is awaited stops the measuring: the worker is killed
    (``pool.shutdown``), that candidate and every later one fail at once with a message naming the
    board, and ``tune`` raises ``BoardError`` once MetaSchedule has finished its loop.
    """

    def __init__(self, inner, timeout: float, where: str):
        super().__init__()
        self.inner, self.timeout, self.where = inner, float(timeout), where
        self.stalled: str | None = None

    def run(self, runner_inputs):
        if self.stalled is not None:
            return [_StalledFuture(self.stalled) for _ in runner_inputs]
        return [_BoundedFuture(self, f) for f in self.inner.run(runner_inputs)]

    def wait(self, future):
        deadline = time.monotonic() + self.timeout
        while self.stalled is None and not future.done():
            if time.monotonic() > deadline:
                self.stalled = (
                    f"{self.where} did not answer within {self.timeout:.0f}s (session_timeout): measuring stopped"
                )
                self.inner.pool.shutdown(wait=False)  # kills the worker blocked on the board's socket
                break
            time.sleep(0.02)
        if self.stalled is not None:
            return ms.runner.RunnerResult(None, self.stalled)
        return future.result()


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
    # RPCConfig insists on tracker fields; sessions come from f_create_session (bounded) either way
    rpc_config = ms.runner.RPCConfig(
        tracker_host=runner.tracker_host or runner.host,
        tracker_port=runner.tracker_port or runner.port,
        tracker_key=runner.key or "direct",
        session_timeout_sec=int(max(1, round(runner.session_timeout))),
    )
    inner = ms.runner.RPCRunner(
        rpc_config=rpc_config,
        evaluator_config=config,
        f_create_session=functools.partial(_rpc_session, settings=runner),
        f_alloc_argument=functools.partial(_rpc_alloc, **alloc),
    )
    # connecting, uploading and timing every level: the session's time-out, with room to connect
    return BoundedRunner(inner, 2 * runner.session_timeout + 5, runner.where)


def workload_records(db, task_mod) -> list:
    if not db.has_workload(task_mod):
        return []
    wl = db.commit_workload(task_mod)
    return [r for r in db.get_all_tuning_records() if tvm_ffi.structural_equal(r.workload.mod, wl.mod)]


def best_record(records):
    ok = [r for r in records if r.run_secs]
    return min(ok, key=lambda r: float(np.mean([float(s) for s in r.run_secs])), default=None)


@contextlib.contextmanager
def metaschedule_logging(verbose: bool = False):
    """MetaSchedule's own logging, around one ``tune_tir``.

    ``tune_tir`` writes its logs (task tables, XGBoost's iterations, every candidate) into
    ``work_dir/logs`` (the tuning log's ``logs/``) and echoes them on stdout at its logger's level:
    here ERROR unless ``verbose`` (then INFO), so the terminal keeps one progress bar.

    TVM 0.27's ``tune_tir`` re-configures its logger with ``dictConfig``, listing the handlers already
    on it by name: one it did not create (pytest's log capture, a user's unnamed handler) makes it
    crash ("'NoneType' object has no attribute 'format'"). Those are detached while it tunes and put
    back afterwards."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(logger.name)]
    for handler in foreign:
        logger.removeHandler(handler)
    level = logger.level
    # create_loggers gives its console handler the logger's level, then sets the logger to DEBUG
    # (its file handlers take everything)
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in foreign:
            logger.addHandler(handler)
