"""The shared contract: every name two parts of tvm_nested must agree on, spelled once.

The bottom of the import graph (``cli -> verbs -> pipeline/runtime -> relay_passes -> schedules ->
contract``): it imports TVM and the standard library only. Three kinds of names live here:

* the model and artifact contract (DESIGN sections 2, 5, 6): the ``level`` input, the attrs the
  passes, kernels and schedules find each other by, the metadata function, the format versions;
* the facts about the world that several parts use: version pins, cross toolchains;
* the TVM names that moved between releases (0.27: ``tirx``, ``s_tir``, ``tvm.ir.Constant``,
  ``.ty``), so the next upstream rename is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.ir import Constant  # 0.27: relax.Constant became tvm.ir.Constant (payload: .value)
from tvm.relax.backend.cpu_generic import pipeline as _cpu_backend
from tvm.relax.backend.cuda import pipeline as _cuda_backend
from tvm.s_tir import Schedule  # 0.27: tvm.tir.Schedule moved to tvm.s_tir
from tvm.script import tirx as T  # 0.27: tvm.script.tir became tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as TB  # TIR built from Python (loops Python unrolls)
from tvm.sym import detect_linear_equation  # 0.27: tvm.arith became tvm.sym

# ------------------------------------------------------------------------------- the model input
LEVEL = "level"  # the name of the level input (DESIGN section 2)
LEVEL_DTYPE = "int32"  # the level's dtype inside the compiled module (the kernels read int32)
# The most levels a model may have (level map values -1..MAX_LEVELS-1). The packed format keeps a
# row length per level and row, and every level is measured when tuned: a level map holding 2**31
# is a mistake (an uninitialised or mis-cast array), refused naming its layer, not 32 TiB allocated.
MAX_LEVELS = 256

# ----------------------------------------------------------------------- attrs and function names
ATTR_OP = "nested.op"  # PrimFunc attr: "linear" | "conv2d"; marks a nested kernel
ATTR_NUM_LEVELS = "nested.num_levels"  # PrimFunc attr: L
ATTR_SPEC = "nested.spec"  # PrimFunc attr: the kernel's spec (JSON), what its factory was given
INFO_ATTR = "nested.info"  # IRModule attr: JSON record of the lowered nested layers
STAGES_ATTR = "nested.stages"  # IRModule attr: JSON stage plan (build(..., stages=K))
REROUTE_ATTR = "nested.reroute"  # IRModule attr: JSON latency table + rule of main_deadline
INFO_FUNC = "nested_info"  # the compiled function returning the artifact's metadata (uint8 JSON)
DEADLINE_FUNC = "main_deadline"  # the compiled rerouting entry point
STAGE_TIMES_FUNC = "nested_stage_times"  # every stage at one level, the clock read after each
# rerouting rules main_deadline can apply, by their id (the policy argument): the seed paper's plain
# rule, and the rule that acts on the slowdown it observes (relay_passes/deadline.py)
REROUTE_POLICIES = ("paper", "evidence")
STAGE_PREFIX = "nested_stage_"  # stage functions: nested_stage_0 .. nested_stage_{K-1}
NOALIAS = "tirx.noalias"  # 0.27's spelling; "tir.noalias" is silently ignored
IS_SCHEDULED = "tirx.is_scheduled"

# ---------------------------------------------------------------------------------------- versions
FORMAT_VERSION = 1  # the packed nested format (schedules/format.py); in artifacts and tuning logs
INFO_VERSION = 1  # the metadata record compiled into a module (runtime/info.py)
TVM_SERIES = "0.27"  # schedules and traces are compatible within a release series
# apache-tvm-ffi 0.1.15.x segfaults when TVM serialises IR (MetaSchedule, save_json); 0.1.14.x works.
# pyproject.toml pins the same range for the host; the emulated board installs this exact wheel.
TVM_FFI_SERIES = "0.1.14"
TVM_FFI_BOARD_PIN = "0.1.14.post1"

# ------------------------------------------------------------------------------ debugging switches
DUMP_ENV = "TVM_NESTED_DUMP"  # a directory: the pipeline writes the IR after each phase there


# ---------------------------------------------------------------------------- cross toolchains
@dataclass(frozen=True)
class CrossToolchain:
    """What links a shared library for another architecture on a Debian host."""

    cc: str  # the compiler driver
    packages: tuple[str, ...]  # the Debian packages that provide it (gcc alone cannot link a .so)
    libc_file: str  # a start file of the target's libc: present iff the libc dev package is


CROSS_TOOLCHAINS: dict[str, CrossToolchain] = {
    "aarch64": CrossToolchain(
        "aarch64-linux-gnu-gcc",
        ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
        "/usr/aarch64-linux-gnu/lib/crti.o",  # "cannot find crti.o" without libc6-dev-arm64-cross
    ),
}

# ------------------------------------------------------------------------- TVM names that moved
PrimFunc = tvm.tirx.PrimFunc
# TVM's Relax backends by target kind; each module has library_dispatch_passes, legalize_passes,
# dataflow_lower_passes and finalize_passes (the pieces of its default pipeline)
RELAX_BACKENDS = {"llvm": _cpu_backend, "cuda": _cuda_backend}


def const_numpy(c) -> object:
    """The NumPy payload of a Relax constant."""
    return c.value.numpy()


def dtype_of(expr) -> str:
    """dtype string of a Relax tensor expression or a TIR buffer/param (0.27: a PrimType)."""
    ty = expr.ty if hasattr(expr, "ty") else expr
    dt = ty.dtype
    return getattr(dt, "dtype", str(dt))


def static_shape(expr) -> tuple[int, ...]:
    return tuple(int(s) for s in expr.ty.shape)


def as_target(target) -> tvm.target.Target:
    """A ``tvm.target.Target`` from one or from what its constructor takes (dict, kind, tag)."""
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def call_sites(mod: tvm.IRModule) -> dict[str, list]:
    """The argument list of the first ``call_tir`` of every callee in ``mod``'s Relax functions."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites: dict[str, list] = {}

    def visit(expr):
        if isinstance(expr, tvm.relax.Call) and expr.op.same_as(call_tir):
            callee = expr.args[0]
            if isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint not in sites:
                sites[callee.name_hint] = list(expr.args[1].fields)

    for _, func in mod.functions_items():
        if isinstance(func, tvm.relax.Function):
            tvm.relax.analysis.post_order_visit(func, visit)
    return sites


def fresh_copy(func: PrimFunc) -> PrimFunc:
    """A deep copy: ``Schedule`` rewrites the statements of the function it is given in place, and
    a schedule rule must leave its input intact (callers keep and reuse unscheduled kernels)."""
    return tvm.ir.load_json(tvm.ir.save_json(func))


__all__ = [
    "ATTR_NUM_LEVELS",
    "ATTR_OP",
    "ATTR_SPEC",
    "CROSS_TOOLCHAINS",
    "DEADLINE_FUNC",
    "DUMP_ENV",
    "FORMAT_VERSION",
    "INFO_ATTR",
    "INFO_FUNC",
    "INFO_VERSION",
    "IS_SCHEDULED",
    "LEVEL",
    "LEVEL_DTYPE",
    "MAX_LEVELS",
    "NOALIAS",
    "RELAX_BACKENDS",
    "REROUTE_ATTR",
    "REROUTE_POLICIES",
    "STAGES_ATTR",
    "STAGE_PREFIX",
    "STAGE_TIMES_FUNC",
    "TB",
    "TVM_FFI_BOARD_PIN",
    "TVM_FFI_SERIES",
    "TVM_SERIES",
    "Constant",
    "CrossToolchain",
    "IRBuilder",
    "PrimFunc",
    "Schedule",
    "T",
    "as_target",
    "call_sites",
    "const_numpy",
    "detect_linear_equation",
    "dtype_of",
    "fresh_copy",
    "static_shape",
]
