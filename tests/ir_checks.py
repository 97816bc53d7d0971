"""Structural questions about IR the tests ask (instead of searching printed TVMScript)."""

from __future__ import annotations

from collections import Counter

import tvm
import tvm_ffi
from tvm import relax


def _visit(root, node_type, fn) -> None:
    """Call ``fn`` on every ``node_type`` under ``root`` (a TIR statement or expression)."""

    def on_node(node, visitor):
        fn(node)
        return visitor.default_visit(node)

    tvm_ffi.structural_visit(root, [(node_type, on_node)])


def loop_kinds(func: tvm.tirx.PrimFunc) -> Counter:
    """How many loops of each kind (``serial``, ``parallel``, ``vectorized``, ``unrolled``,
    ``thread_binding``) a PrimFunc has."""
    kinds: Counter = Counter()
    _visit(func.body, tvm.tirx.For, lambda n: kinds.update([tvm.tirx.ForKind(int(n.kind)).name.lower()]))
    return kinds


def thread_tags(func: tvm.tirx.PrimFunc) -> set[str]:
    """The GPU thread axes (``blockIdx.x``, ``threadIdx.y``...) a PrimFunc's loops are bound to."""
    tags: set[str] = set()

    def on_for(node):
        if node.thread_binding is not None:
            tags.add(str(node.thread_binding.thread_tag))

    _visit(func.body, tvm.tirx.For, on_for)
    return tags


def block_names(func: tvm.tirx.PrimFunc) -> list[str]:
    names: list[str] = []
    _visit(func.body, tvm.s_tir.SBlock, lambda n: names.append(str(n.name_hint)))
    return names


def relax_ops(func: relax.Function) -> Counter:
    """Op names a Relax function calls (``relax.nn.conv2d``, ``relax.call_tir``...), counted."""
    ops: Counter = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            ops[str(expr.op.name)] += 1

    relax.analysis.post_order_visit(func, visit)
    return ops


def run_pipeline(mod, target="llvm", *, stop_after="graph", start_at=None, **options):
    """``mod`` through a slice of the one pipeline (default: its graph phase), as build runs it, with
    the current context's instruments (the pass tests' well-formed check)."""
    from tvm_nested.pipeline import pipeline
    from tvm_nested.target import parse_target

    target = parse_target(target)
    instruments = list(tvm.transform.PassContext.current().instruments)
    with target, tvm.transform.PassContext(opt_level=3, instruments=instruments):
        return pipeline(target, start_at=start_at, stop_after=stop_after, **options)(mod)


def bind(mod: tvm.IRModule, func: str = "main", **arrays) -> tvm.IRModule:
    """``mod`` with ``func``'s parameters named in ``arrays`` bound to those constants (BindParams):
    a TVMScript Before/Expected names its weights and packed arrays as parameters, so the IR it shows
    reads like the pass's output without listing array contents."""
    return relax.transform.BindParams(func, arrays)(mod)


def _signature(func: tvm.tirx.PrimFunc) -> list[tuple[tuple[int, ...] | None, str]]:
    """(shape, dtype) of each parameter; shape None for a scalar (0.27: a buffer parameter is a Var
    whose type is the buffer's)."""
    return [
        (tuple(int(s) for s in p.ty.shape) if hasattr(p.ty, "shape") else None, str(p.ty.dtype)) for p in func.params
    ]


def with_kernels(mod: tvm.IRModule, **kernels: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """A copy of ``mod`` whose PrimFunc stubs named in ``kernels`` are replaced by those kernels.

    A TVMScript module must define every function its ``call_tir``s name, but a nested kernel's body
    is generated (``schedules.kernel``): the module declares it as a stub with the kernel's signature
    (``T.evaluate(0)`` as its body), and this puts the generated kernel in its place. The stub's
    parameters must match the kernel's (shapes and dtypes), so the signature the test shows is true.
    """
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for name, func in kernels.items():
        gv = out.get_global_var(name)
        stub = out[gv]
        assert _signature(stub) == _signature(func), f"stub {name}: {_signature(stub)} != {_signature(func)}"
        out[gv] = func.with_attr("global_symbol", name)
    return out


def functions_only(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without its module attrs (tests read records such as ``nested.info`` on their own)."""
    return tvm.IRModule(dict(mod.functions_items()))
