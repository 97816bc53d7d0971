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
    """``mod`` through a slice of the one pipeline (default: its graph phase), as build runs it."""
    from tvm_nested.pipeline import pipeline
    from tvm_nested.target import parse_target

    target = parse_target(target)
    with target, tvm.transform.PassContext(opt_level=3):
        return pipeline(target, start_at=start_at, stop_after=stop_after, **options)(mod)
