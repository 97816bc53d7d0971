"""TIR pieces every nested kernel uses: the level clamp, the prefix length, the epilogue, the attrs.

They are Python functions that build TIR expressions; the kernels' TVMScript calls them while it is
parsed, so each kernel reads like its math (``prefix_len(level_len, level, L, row)``) and the level
is clamped into ``0..L-1`` the same way everywhere (memory-safe for any level value).
"""

from __future__ import annotations

from ..contract import ATTR_NUM_LEVELS, ATTR_OP, ATTR_SPEC, NOALIAS, T
from .spec import Epilogue, to_json


def clamped(level, num_levels: int):
    """The run-time level clamped into ``0..L-1``: every index formed from it stays in bounds."""
    return T.max(0, T.min(level[()], num_levels - 1))


def prefix_len(level_len, level, num_levels: int, row):
    """Entries of ``row`` kept at the (clamped) level, as an int32."""
    return T.Cast("int32", level_len[clamped(level, num_levels), row])


def epilogue(epi: Epilogue, acc, bias, residual, row, out_index):
    """``act(acc + bias[row] + residual[out_index])`` as ``epi`` says (absent terms left out)."""
    value = acc
    if epi.bias:
        value = value + bias[row]
    if epi.residual:
        value = value + residual[out_index]
    if epi.activation == "relu":
        value = T.max(value, T.float32(0))
    elif epi.activation == "clip":
        lo, hi = epi.clip
        value = T.min(T.max(value, T.float32(lo)), T.float32(hi))
    return value


def kernel_attrs(spec, **extra) -> dict:
    """The attrs every nested kernel carries: schedules and passes find kernels and specs by them."""
    return {NOALIAS: True, ATTR_OP: spec.op, ATTR_NUM_LEVELS: spec.packed.num_levels, ATTR_SPEC: to_json(spec), **extra}


def signature(body, spec, x_shape, out_shape):
    """The PrimFunc around a kernel ``body`` macro, with the parameters every nested kernel has:

    ``x, values, col, row_ptr, level_len, [bias[O]], [residual[out_shape]], level, out[out_shape]``
    (bias and residual as the spec's epilogue says). One list for every op and layout.
    """
    p, e = spec.packed, spec.epilogue
    XS, OS, NNZ, O, L, cdt, ldt = (
        tuple(x_shape),
        tuple(out_shape),
        p.nnz,
        p.rows,
        p.num_levels,
        p.col_dtype,
        p.len_dtype,
    )
    if e.bias and e.residual:

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer(XS, "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((O + 1,), "int32"),
            level_len: T.Buffer((L, O), ldt),
            bias: T.Buffer((O,), "float32"),
            residual: T.Buffer(OS, "float32"),
            level: T.Buffer((), "int32"),
            out: T.Buffer(OS, "float32"),
        ):
            body(x, val, col, row_ptr, level_len, bias, residual, level, out)

    elif e.bias:

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer(XS, "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((O + 1,), "int32"),
            level_len: T.Buffer((L, O), ldt),
            bias: T.Buffer((O,), "float32"),
            level: T.Buffer((), "int32"),
            out: T.Buffer(OS, "float32"),
        ):
            body(x, val, col, row_ptr, level_len, bias, None, level, out)

    elif e.residual:

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer(XS, "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((O + 1,), "int32"),
            level_len: T.Buffer((L, O), ldt),
            residual: T.Buffer(OS, "float32"),
            level: T.Buffer((), "int32"),
            out: T.Buffer(OS, "float32"),
        ):
            body(x, val, col, row_ptr, level_len, None, residual, level, out)

    else:

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer(XS, "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((O + 1,), "int32"),
            level_len: T.Buffer((L, O), ldt),
            level: T.Buffer((), "int32"),
            out: T.Buffer(OS, "float32"),
        ):
            body(x, val, col, row_ptr, level_len, None, None, level, out)

    return func.with_attr("global_symbol", f"nested_{spec.op}")


__all__ = ["clamped", "epilogue", "kernel_attrs", "prefix_len", "signature"]
