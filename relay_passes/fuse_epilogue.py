"""FuseEpilogue: a nested layer and the elementwise ops after it become one kernel.

Run after ``LowerNestedLayers`` (which already fuses a per-channel bias add and folded BatchNorm).
For a ``call_tir`` of a nested kernel whose result has one user, the chain

    y = call_tir(nested_k, [x, ..., level])      # the layer
    z = add(y, r)  or  add(r, y)                 # a residual of y's shape and dtype (optional)
    a = relu(z) | clip(z, lo, hi)                # an activation (optional; relu6 is clip(0, 6))

(each step's result used once, by the next) becomes one binding ``a = call_tir(nested_k', [x, ...,
r, level])`` whose kernel computes ``act(acc + bias + r)`` as it stores each tile
(``schedules/spec.py`` ``Epilogue``): the activations never make a round trip through memory. A
kernel called from several places (a shared weight) is left alone: one kernel, one epilogue.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import INFO_ATTR, dtype_of
from ..schedules.kernel import is_nested_kernel, kernel
from ..schedules.spec import Epilogue, spec_of
from .lower_nested import add_kernel, read_nested_info
from .match import binding_value, is_call

_CALL_TIR = "relax.call_tir"


def _float(bound) -> float | None:
    """A constant clip bound (an IntImm / FloatImm, or a prim_value holding one), else None."""
    if not isinstance(bound, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        bound = getattr(bound, "value", None)
    return float(bound.value) if isinstance(bound, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None


def _use_counts(func: relax.Function) -> Counter:
    counts: Counter = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call):
            for a in expr.args:
                for v in _vars(a):
                    counts[v] += 1
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                if isinstance(f, relax.Var):
                    counts[f] += 1
        elif isinstance(expr, relax.TupleGetItem) and isinstance(expr.tuple_value, relax.Var):
            counts[expr.tuple_value] += 1

    relax.analysis.post_order_visit(func, visit)
    body = func.body.body  # the returned expression of the SeqExpr
    for v in _vars(body):
        counts[v] += 1
    for block in func.body.blocks:  # dataflow outputs escape their block
        for b in block.bindings:
            if isinstance(b.var, relax.Var) and not isinstance(b.var, relax.DataflowVar):
                counts[b.var] += 1
    return counts


def _vars(expr) -> list:
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [f for f in expr.fields if isinstance(f, relax.Var)]
    return []


def _same_type(a, b) -> bool:
    return (
        isinstance(a.ty, relax.TensorType)
        and isinstance(b.ty, relax.TensorType)
        and dtype_of(a) == dtype_of(b)
        and [int(s) for s in a.ty.shape] == [int(s) for s in b.ty.shape]
    )


@dataclasses.dataclass
class _Plan:
    layer: relax.Var  # the call_tir binding
    last: relax.Var  # the binding that gets the fused call
    skipped: list  # the bindings that disappear (the layer and the ops between)
    residual: relax.Expr | None
    activation: str
    clip: tuple[float, float] | None


def _plan(func: relax.Function, mod: tvm.IRModule) -> list[_Plan]:
    var2val = relax.analysis.get_var2val(func)
    uses = _use_counts(func)
    users: dict = {}
    for var, value in var2val.items():
        if isinstance(value, relax.Call):
            for a in value.args:
                for v in _vars(a):
                    users.setdefault(v, []).append(var)
    calls = Counter(var2val[v].args[0] for v in var2val if is_call(var2val[v], _CALL_TIR))
    plans, gone, kept = [], set(), set()
    for var, value in var2val.items():
        if not is_call(value, _CALL_TIR) or calls[value.args[0]] != 1:
            continue
        callee = value.args[0]
        func_k = mod[callee] if isinstance(callee, tvm.ir.GlobalVar) else None
        if not is_nested_kernel(func_k):
            continue
        epi = spec_of(func_k).epilogue
        if epi.residual or epi.activation != "none":
            continue  # fused already
        cur, skipped, residual, act, clip = var, [], None, "none", None
        while uses[cur] == 1 and len(users.get(cur, [])) == 1:
            nxt = users[cur][0]
            op = binding_value(nxt, var2val)
            if residual is None and act == "none" and is_call(op, "relax.add"):
                a, b = op.args
                other = b if a.same_as(cur) else a if b.same_as(cur) else None
                if other is None or other.same_as(cur) or not _same_type(other, cur):
                    break
                residual = other
            elif act == "none" and is_call(op, "relax.nn.relu") and op.args[0].same_as(cur):
                act = "relu"
            elif act == "none" and is_call(op, "relax.clip") and op.args[0].same_as(cur):
                lo, hi = _float(op.args[1]), _float(op.args[2])
                if lo is None or hi is None or lo > hi:
                    break
                act, clip = "clip", (lo, hi)
            else:
                break
            skipped.append(cur)
            cur = nxt
            if act != "none":
                break
        # chains must not overlap: a var one plan removes (skipped) is nobody's result or residual,
        # and two plans never write the same result (two chains meeting at one add: the first fuses)
        res = set(_vars(residual)) if residual is not None else set()
        if skipped and not ({*skipped} & (gone | kept) or cur in gone | kept or res & gone):
            plans.append(_Plan(var, cur, skipped, residual, act, clip))
            gone |= set(skipped)
            kept |= {cur} | res
    return plans


@mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plans: list[_Plan]):
        super().__init__(mod)
        self.by_last = {p.last: p for p in plans}
        self.skipped = {v for p in plans for v in p.skipped}
        self.var2val = {}
        self.replaced = {}  # old kernel GlobalVar -> the fused kernel's GlobalVar

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.var2val[binding.var] = binding.value
        if binding.var in self.skipped:
            return  # its value moves into the fused call
        plan = self.by_last.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        call = self.var2val[plan.layer]
        gv = call.args[0]
        spec = spec_of(self.builder_.get()[gv])
        epi = dataclasses.replace(
            spec.epilogue, residual=plan.residual is not None, activation=plan.activation, clip=plan.clip
        )
        fused = kernel(dataclasses.replace(spec, epilogue=Epilogue(**dataclasses.asdict(epi))))
        # a new GlobalVar (the old one's type is the old signature: a residual adds a parameter),
        # under a fresh name, never merged with another weight's equal kernel
        new_gv = add_kernel(self.builder_, fused, gv.name_hint)
        self.replaced[gv] = new_gv
        args = [self.visit_expr(a) for a in call.args[1].fields]
        if plan.residual is not None:
            args.insert(len(args) - 1, self.visit_expr(plan.residual))  # before the level: the signature's order
        value = relax.call_tir(new_gv, args, out_ty=call.ty)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))


def FuseEpilogue() -> tvm.transform.Pass:
    """Fuse residual adds and activations into the nested kernel before them (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.FuseEpilogue")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        work = [(gv, _plan(func, mod)) for gv, func in mod.functions_items() if isinstance(func, relax.Function)]
        work = [(gv, plans) for gv, plans in work if plans]
        if not work:
            return mod
        renamed = {}
        for gv, plans in work:
            fuser = _Fuser(mod, plans)
            new = fuser.visit_expr(mod[gv])
            funcs = {g: f for g, f in fuser.builder_.get().functions_items() if g not in fuser.replaced}
            funcs[gv] = new
            mod = tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
            renamed.update({old.name_hint: new_gv.name_hint for old, new_gv in fuser.replaced.items()})
        info = read_nested_info(mod)
        if info is not None:  # the layer records name the kernels that now compute them
            for layer in info["layers"]:
                layer["kernel"] = renamed.get(layer["kernel"], layer["kernel"])
            mod = mod.with_attr(INFO_ATTR, json.dumps(info))
        return mod

    return _pass


__all__ = ["FuseEpilogue"]
