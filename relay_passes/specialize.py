"""SpecializeKernels: every nested kernel in the form its target runs, before tuning or scheduling.

Run after ``LowerNestedLayers`` (and ``SplitStages``). On CPU targets each lowered (rows layout)
kernel becomes the CPU kernel (``schedules/cpu.py``) for its knobs: the tuning log's choice
(``schedules/knob_table.py``) or the target family's defaults. A conv's weights are packed again
for the knobs (each non-zero's input offset, the sub-rows): the kernel and its constants at every
call site change together, once per kernel, so stage functions keep sharing one copy of the weights;
kernels of one weight (call sites of several shapes) that pack it alike share one constant each.
Other targets keep the lowered kernels. ``tvm_nested.tune`` extracts its tasks after this pass.

Each layer's record in ``nested.info`` follows its kernel: the new name, the payload now packed,
the knobs and whether they came from a tuning log.
"""

from __future__ import annotations

import dataclasses
import json

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import INFO_ATTR, Constant, as_target, call_sites
from ..schedules import cpu, knob_table
from ..schedules.format import NestedCSR
from ..schedules.kernel import kernel
from ..schedules.spec import spec_of
from .lower_nested import read_nested_info

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_OPERANDS = slice(1, 5)  # values, col, row_ptr, level_len follow x in every nested kernel's signature


@dataclasses.dataclass
class _Plan:
    gv: tvm.ir.GlobalVar  # the CPU kernel's
    consts: list  # its packed operands, one constant object each (shared by every call site)
    record: dict  # what the layer record gets


def _plans(mod: tvm.IRModule, target, table: dict) -> dict:
    bb = relax.BlockBuilder(mod)
    plans = {}
    pool = {}  # (dtype, shape, bytes) -> one constant: equal packed arrays are stored once
    sites = call_sites(mod)
    for gv, func in mod.functions_items():
        spec = spec_of(func)
        if spec is None or spec.layout != "rows" or gv.name_hint not in sites:
            continue
        operands = sites[gv.name_hint][_OPERANDS]
        if not all(isinstance(c, Constant) for c in operands):
            continue  # not packed constants (a hand-built module): left as lowered
        fmt = NestedCSR.from_arrays(spec.packed.cols, [c.value.numpy() for c in operands])
        entry = table.get(knob_table.kernel_key(spec, fmt.level_len))
        knobs = knob_table.knobs_of(entry) if entry else cpu.default_knobs(spec, target)
        cpu_spec, packed = cpu.specialize(spec, fmt, knobs)
        new_gv = bb.add_func(kernel(cpu_spec), gv.name_hint)
        bb.update_func(new_gv, bb.get()[new_gv].with_attr("global_symbol", new_gv.name_hint))
        record = {
            "kernel": new_gv.name_hint,
            "payload_bytes": int(packed.nbytes),
            "knobs": dataclasses.asdict(knobs),
            "tuned": entry is not None,
        }
        consts = []
        for a in packed.arrays():
            key = (a.dtype.str, a.shape, a.tobytes())
            if key not in pool:
                pool[key] = relax.const(a)
            consts.append(pool[key])
        plans[gv] = _Plan(new_gv, consts, record)
    return bb.get(), plans


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plans):
        super().__init__(mod)
        self.plans = plans

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_CALL_TIR) or call.args[0] not in self.plans:
            return call
        plan = self.plans[call.args[0]]
        args = list(call.args[1].fields)
        args[_OPERANDS] = plan.consts
        return relax.call_tir(plan.gv, args, out_ty=call.ty)


def SpecializeKernels(target, tuning_log=None) -> tvm.transform.Pass:
    """Specialise the nested kernels for ``target`` (see the module docstring)."""
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.SpecializeKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if target.kind.name != "llvm":
            return mod
        table = knob_table.load_knobs(tuning_log) if tuning_log is not None else {}
        mod, plans = _plans(mod, target, table)
        if not plans:
            return mod
        rewriter = _Rewriter(mod, plans)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        done = rewriter.builder_.get()  # the lowered kernels go (public PrimFuncs: DCE would keep them)
        funcs = {gv: f for gv, f in done.functions_items() if gv not in plans}
        out = tvm.IRModule(funcs, attrs=done.attrs, global_infos=done.global_infos)
        info = read_nested_info(out)
        if info is not None:
            records = {old.name_hint: p.record for old, p in plans.items()}  # CPU kernels may be shared
            for layer in info["layers"]:
                layer.update(records.get(layer["kernel"], {}))
            out = out.with_attr(INFO_ATTR, json.dumps(info))
        return out

    return _pass


__all__ = ["SpecializeKernels"]
