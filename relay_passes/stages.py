"""SplitStages: ``main``'s bindings split into K stage functions that each take the level.

Run after ``LowerNestedLayers`` and ``LevelGuard`` (it reads ``nested.info`` to weigh nested layers).
``main`` is left as it is. The pass adds the Relax functions ``nested_stage_0 .. nested_stage_{K-1}``:

    nested_stage_i(*live_in, level) -> (live_out...)          # i < K-1: always a tuple
    nested_stage_{K-1}(*live_in, level) -> main's return value

``live_in`` are the activations the stage reads that earlier stages (or main's inputs) produced;
``live_out`` those that later stages (or main's result) read. Running the stages in order with the
same level computes main; each stage may run at its own level (the basis of rerouting). Stages
reuse main's ``call_tir`` kernels and constant objects, so the compiled module stores each packed
weight once (the VM's constant pool de-duplicates shared constants).

Bindings that depend only on the level and constants (the level guard, an int32 cast of the level,
the zeros of a layer pruned at every level) are not carried between stages: each stage recomputes
the ones it needs; the guard (an impure assert) is dropped (callers of stages check the level).

Cut points are either balanced (``num_stages``: equal shares of the estimated multiply-accumulates,
nested layers weighed by their level-0 non-zeros, dense conv2d / matmul by their dense size; each
cut then slides over the cheap bindings that follow to where the fewest activation bytes are live),
at every narrow point (``num_stages="blocks"``: after each costly binding, slid the same way, kept
where no fewer values are carried across the cuts beside it: the output of every residual block,
the end of every recurrent step, every layer of a plain chain), or given (``cuts``: a list of ints =
"after the i-th nested layer" in ``nested.info`` order, sliding the same way, or of strings =
"exactly after the binding of this Relax variable"). ``merge_stages`` groups the stages of a plan by
their measured cost (``build(..., stages="auto")``: the narrow points, merged where a decision would
cost more than a small share of its stage).

The plan is recorded as the module attr ``nested.stages`` (JSON): ``num_stages``, ``functions``,
``inputs`` / ``outputs`` (per stage, variable names), ``cuts`` (variable after which each cut falls),
``macs`` (estimated per stage). Read it with ``read_stage_plan(mod)``.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import ATTR_OP, LEVEL, STAGE_PREFIX, STAGES_ATTR

BLOCKS = "blocks"  # SplitStages(BLOCKS): a cut at every narrow point (the candidates of stages="auto")


def read_stage_plan(mod: tvm.IRModule) -> dict | None:
    """The ``nested.stages`` record of a staged module, or None."""
    if mod.attrs is None or STAGES_ATTR not in mod.attrs:
        return None
    return json.loads(str(mod.attrs[STAGES_ATTR]))


# ------------------------------------------------------------------------------------- analysis
def _used_vars(expr) -> list[relax.Var]:
    seen, out = set(), []

    def visit(e):
        if isinstance(e, relax.Var) and e not in seen:
            seen.add(e)
            out.append(e)

    relax.analysis.post_order_visit(expr, visit)
    return out


def _numel(ty) -> int:
    if isinstance(ty, relax.TensorType) and ty.shape is not None:
        try:
            return int(math.prod(int(s) for s in ty.shape))
        except TypeError:  # symbolic shape
            return 0
    if isinstance(ty, relax.TupleType):
        return sum(_numel(f) for f in ty.fields)
    return 0


def _nbytes(ty) -> int:
    if isinstance(ty, relax.TensorType):
        dt = getattr(ty.dtype, "dtype", str(ty.dtype))
        try:
            return _numel(ty) * max(1, np.dtype(str(dt)).itemsize)
        except TypeError:
            return _numel(ty) * 4
    if isinstance(ty, relax.TupleType):
        return sum(_nbytes(f) for f in ty.fields)
    return 0


def _dense_macs(value, out_ty) -> int:
    """Multiply-accumulates of a dense conv2d / matmul left in the graph (0 for other ops)."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return 0
    name = value.op.name
    try:
        if name == "relax.nn.conv2d":
            w = [int(s) for s in value.args[1].ty.shape]
            return _numel(out_ty) * w[1] * w[2] * w[3]
        if name == "relax.matmul":
            return _numel(out_ty) * int(value.args[0].ty.shape[-1])
    except (TypeError, AttributeError, IndexError):
        return 0
    return 0


def _nested_macs(mod, value, out_ty) -> int | None:
    """Multiply-accumulates of a nested kernel call at level 0 (None when it is not one).

    Operands follow every nested kernel's signature (``schedules/tir.py``): ``x, values, col,
    row_ptr, level_len[L, rows], ...``.
    """
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op) or value.op.name != "relax.call_tir":
        return None
    callee = value.args[0]
    func = mod[callee] if isinstance(callee, tvm.ir.GlobalVar) else None
    if func is None or func.attrs is None or ATTR_OP not in func.attrs:
        return None
    operands = list(value.args[1].fields)
    level_len = operands[4] if len(operands) > 4 else None
    if isinstance(level_len, tvm.ir.Constant):
        counts = level_len.value.numpy()
        rows = max(1, counts.shape[-1])
        return int(_numel(out_ty) // rows * int(counts[0].astype(np.int64).sum()))
    return _numel(out_ty)


class _Binding:
    __slots__ = ("index", "macs", "nested", "recompute", "uses", "value", "var")

    def __init__(self, index, var, value):
        self.index, self.var, self.value = index, var, value
        self.uses = _used_vars(value)
        self.recompute = False
        self.macs = 0
        self.nested = None  # position among the nested layers, when it is one


def _analyse(mod: tvm.IRModule, func: relax.Function):
    level = next((p for p in func.params if p.name == LEVEL), None)
    if level is None:
        raise ValueError(
            "SplitStages: main has no 'level' parameter (run it on a module from tvm_nested.from_onnx/from_torch)"
        )
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise ValueError("SplitStages: main's body is not a sequence of bindings")
    bindings = []
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise ValueError(f"SplitStages: {type(b).__name__} bindings are not supported ({b.var.name})")
            bindings.append(_Binding(len(bindings), b.var, b.value))

    # level-or-constant-only bindings are recomputed where needed, never carried
    cheap = {level}
    for b in bindings:
        if all(v in cheap for v in b.uses):
            b.recompute = True
            cheap.add(b.var)

    # liveness from main's result backwards: drops the guard (assert) and anything unused
    needed = set(_used_vars(body.body))
    for b in reversed(bindings):
        if b.var in needed:
            needed.update(b.uses)
    work = [b for b in bindings if b.var in needed and not b.recompute]
    if not work:
        raise ValueError("SplitStages: main computes nothing from its inputs")

    position = 0
    for b in work:
        b.macs = _nested_macs(mod, b.value, b.var.ty)
        if b.macs is not None:
            b.nested, position = position, position + 1
        else:
            b.macs = _dense_macs(b.value, b.var.ty)
    return level, bindings, work, needed


def _carried(work, params, result_uses) -> list[list[relax.Var]]:
    """carried[j] = the values defined at or before work[j] (or main's inputs) that are read after it."""
    pos = {b.var: j for j, b in enumerate(work)}
    last = {}
    for j, b in enumerate(work):
        for v in b.uses:
            last[v] = j
    for v in result_uses:
        last[v] = len(work)
    out = []
    for j in range(len(work)):
        out.append(
            [v for v, lu in last.items() if (d := pos.get(v, -1 if v in params else None)) is not None and d <= j < lu]
        )
    return out


def _width(v) -> int:
    return len(v.ty.fields) if isinstance(v.ty, relax.TupleType) else 1


def _block_cuts(work, counts, slide) -> list[int]:
    """A cut at every narrow point: after each costly binding, slid to the fewest live bytes, kept where
    no fewer values are carried at the candidates beside it (residual block outputs, recurrent step ends,
    every layer of a plain chain)."""
    n = len(work)
    macs = [max(b.macs, 0) for b in work]
    rest = np.cumsum(macs[::-1])[::-1]  # work from j on
    points = sorted({slide(j) for j in range(n - 1) if macs[j] > 0 and rest[j + 1] > 0})
    points = [j for j in points if j < n - 1]
    keep = []
    for i, j in enumerate(points):
        left = counts[points[i - 1]] if i > 0 else counts[j]
        right = counts[points[i + 1]] if i + 1 < len(points) else counts[j]
        if counts[j] <= left and counts[j] <= right:
            keep.append(j)
    return keep


def _choose_cuts(work, live, counts, num_stages, cuts) -> list[int]:
    """Indices j into ``work``: a cut falls after work[j]. Strictly increasing, every stage non-empty."""
    n = len(work)

    def slide(j):  # move over the following cost-free bindings to the narrowest point
        best, k = j, j + 1
        while k < n - 1 and work[k].macs == 0:
            if live[k] < live[best]:
                best = k
            k += 1
        return best

    if cuts is not None:
        out = []
        names = {b.var.name: j for j, b in enumerate(work)}
        nested = {b.nested: j for j, b in enumerate(work) if b.nested is not None}
        for c in cuts:
            if isinstance(c, str):
                if c not in names:
                    raise ValueError(
                        f"SplitStages: no binding named {c!r} in main (known: {', '.join(list(names)[:12])}, ...)"
                    )
                out.append(names[c])
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if int(c) not in nested:
                    raise ValueError(
                        f"SplitStages: cut after nested layer {c}: main has nested layers 0..{len(nested) - 1}"
                    )
                out.append(slide(nested[int(c)]))
            else:
                raise ValueError(
                    f"SplitStages: a cut is a nested-layer index (int) or a variable name (str), got {c!r}"
                )
        if any(b <= a for a, b in itertools.pairwise(out)) or (out and out[-1] >= n - 1):
            raise ValueError(
                f"SplitStages: cuts {list(cuts)} must be in increasing order and leave every stage non-empty"
            )
        return out

    if num_stages == BLOCKS:
        return _block_cuts(work, counts, slide)
    if not isinstance(num_stages, (int, np.integer)) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"SplitStages: num_stages must be a positive integer or {BLOCKS!r}, got {num_stages!r}")
    # cut only after a costly binding (never after the last one): no stage is cheap glue alone
    macs = np.array([max(b.macs, 0) for b in work], dtype=np.float64)
    candidates = [j for j in range(n - 1) if macs[j] > 0 and macs[j + 1 :].sum() > 0]
    if not candidates:  # nothing is weighed: cut by binding count
        candidates, macs = list(range(n - 1)), np.ones(n)
    cum = np.cumsum(macs)
    num_stages = min(int(num_stages), len(candidates) + 1)
    out, start = [], 0
    for k in range(1, num_stages):
        target = cum[-1] * k / num_stages
        room = len(candidates) - (num_stages - 1 - k)  # keep candidates for the remaining cuts
        window = candidates[start:room]
        best = min(range(len(window)), key=lambda i: abs(cum[window[i]] - target))
        out.append(window[best])
        start += best + 1
    out = [slide(j) for j in out]
    return out


# ------------------------------------------------------------------------------------- rewriting
@mutator
class _Substitute(PyExprMutator):
    """Copies an expression with variables replaced through ``vmap``."""

    def __init__(self, mod, vmap):
        super().__init__(mod)
        self.vmap = vmap

    def visit_var_(self, op):
        return self.vmap.get(op, op)

    def visit_dataflow_var_(self, op):
        return self.vmap.get(op, op)


def _emit_stage(bb, name, level, inputs, bindings, result, mod):
    params = [relax.Var(v.name, v.ty) for v in inputs]
    lvl = relax.Var(LEVEL, level.ty)
    vmap = dict(zip(inputs, params))
    vmap[level] = lvl
    sub = _Substitute(mod, vmap)
    with bb.function(name, [*params, lvl], private=False):
        with bb.dataflow():
            for b in bindings:
                vmap[b.var] = bb.emit(sub.visit_expr(b.value), name_hint=b.var.name)
            out = bb.emit_output(sub.visit_expr(result))
        gv = bb.emit_func_output(out)
    return gv


def _split(mod: tvm.IRModule, num_stages, cuts) -> tvm.IRModule:
    func = mod["main"]
    level, bindings, work, _needed = _analyse(mod, func)
    params = set(func.params)
    result_uses = set(_used_vars(func.body.body))
    carried = _carried(work, {p for p in params if not p.same_as(level)}, result_uses)
    live = [sum(_nbytes(v.ty) for v in c) for c in carried]
    counts = [sum(_width(v) for v in c) for c in carried]
    cut_idx = _choose_cuts(work, live, counts, num_stages, cuts)
    bounds = [-1, *cut_idx, len(work) - 1]
    stage_of = {}
    for s in range(len(bounds) - 1):
        for j in range(bounds[s] + 1, bounds[s + 1] + 1):
            stage_of[work[j].var] = s
    by_var = {b.var: b for b in bindings}
    k = len(bounds) - 1

    # what each stage reads from outside and what later stages / the result read from it
    reads = []
    for s in range(k):
        own = [work[j] for j in range(bounds[s] + 1, bounds[s + 1] + 1)]
        ext = []
        for b in own:
            for v in b.uses:
                if (v in params and not v.same_as(level)) or stage_of.get(v, s) < s:
                    ext.append(v)
        if s == k - 1:
            ext += [
                v
                for v in _used_vars(func.body.body)
                if (v in params and not v.same_as(level)) or stage_of.get(v, s) < s
            ]
        reads.append(list(dict.fromkeys(ext)))
    writes = [[] for _ in range(k)]
    for s in range(k):
        for v in reads[s]:
            if v in stage_of:
                writes[stage_of[v]].append(v)
    writes = [list(dict.fromkeys(sorted(w, key=lambda v: by_var[v].index))) for w in writes]

    bb = relax.BlockBuilder(mod)
    names = []
    for s in range(k):
        own = [work[j] for j in range(bounds[s] + 1, bounds[s + 1] + 1)]
        # recomputed level/constant bindings this stage needs, transitively, in original order
        need = set()
        stack = [v for b in own for v in b.uses]
        if s == k - 1:
            stack += _used_vars(func.body.body)
        while stack:
            v = stack.pop()
            b = by_var.get(v)
            if b is not None and b.recompute and v not in need:
                need.add(v)
                stack.extend(b.uses)
        emitted = sorted([by_var[v] for v in need] + own, key=lambda b: b.index)
        result = func.body.body if s == k - 1 else relax.Tuple(writes[s])
        name = f"{STAGE_PREFIX}{s}"
        _emit_stage(bb, name, level, reads[s], emitted, result, mod)
        names.append(name)
    out = bb.get()
    plan = {
        "num_stages": k,
        "functions": names,
        "inputs": [[v.name for v in r] for r in reads],
        "outputs": [[v.name for v in w] for w in writes[:-1]] + [None],
        "cuts": [work[j].var.name for j in cut_idx],
        "macs": [int(sum(work[j].macs for j in range(bounds[s] + 1, bounds[s + 1] + 1))) for s in range(k)],
        "main_inputs": [p.name for p in func.params],
    }
    return out.with_attr(STAGES_ATTR, json.dumps(plan))


def merge_stages(plan: dict, cost_us, decision_us: float, max_share: float) -> tuple[list[str], list[list[int]]]:
    """Consecutive stages of ``plan`` merged until a decision costs at most ``max_share`` of a stage.

    ``cost_us[s]``: stage s's measured time; ``decision_us``: the measured cost of one decision point
    (clock, rule, the stage call). A group closes once its cost reaches ``decision_us / max_share``;
    a short last group joins the one before. Returns ``(cuts, groups)``: the variable names to cut
    after (``SplitStages(cuts=cuts)`` builds the merged plan) and each group's stages of ``plan``.
    """
    cost = np.asarray(cost_us, dtype=np.float64)
    if cost.shape != (int(plan["num_stages"]),) or not np.all(np.isfinite(cost)) or np.any(cost < 0):
        raise ValueError(f"merge_stages: one finite cost >= 0 per stage ({plan['num_stages']}), got {cost_us!r}")
    if not (np.isfinite(decision_us) and decision_us >= 0 and 0 < max_share <= 1):
        raise ValueError(f"merge_stages: decision_us >= 0 and 0 < max_share <= 1, got {decision_us!r}, {max_share!r}")
    need = decision_us / max_share
    groups, group, total = [], [], 0.0
    for s, c in enumerate(cost):
        group.append(s)
        total += c
        if total >= need:
            groups.append(group)
            group, total = [], 0.0
    if group:
        if groups:
            groups[-1].extend(group)
        else:
            groups.append(group)
    return [plan["cuts"][g[-1]] for g in groups[:-1]], groups


def SplitStages(num_stages: int | str | None = 4, cuts=None, note: dict | None = None) -> tvm.transform.Pass:
    """Add stage functions ``nested_stage_i(*activations, level)`` computing main in K stages.

    Run after ``LowerNestedLayers`` and ``LevelGuard``. ``num_stages``: balanced cuts (fewer when
    main has fewer bindings), or ``"blocks"``: a cut at every narrow point; ``cuts``: explicit cut
    points (see the module docstring). ``note``: recorded in the plan as ``auto`` (how ``build``'s
    ``stages="auto"`` chose the cuts).
    """

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.SplitStages")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = _split(mod, num_stages, cuts)
        if note is None:
            return out
        plan = dict(read_stage_plan(out), auto=note)
        return out.with_attr(STAGES_ATTR, json.dumps(plan))

    return _pass
