"""The nested linear kernel: ``out[b, m] = epilogue(sum_{j < prefix(level, m)} values[j] * x[b, col[j]])``.

Params (``tir.signature``): ``x[batch, cols], values, col, row_ptr, level_len, [bias[rows]],
[residual[batch, rows]], level () int32, out[batch, rows]``. A row's stored weights are ordered
sparsest level first, so level ``l`` sums the prefix ``row_ptr[m] .. row_ptr[m] + level_len[l, m]``.
``linear(spec)`` builds the layout the spec names:

* ``"rows"`` (the reference form; CUDA schedules it; block names are contract):
  ``"x_t"`` (batch > 1) transposes x so the batch is contiguous; ``"row"`` is one output row with a
  local accumulator over the batch, and inside it ``"update"``, a reduction (``T.init`` zeroes the
  accumulator) under the data-dependent loop over the row's prefix, the batch innermost; then
  ``"store"``, the epilogue (a row empty at the level stores ``epilogue(0)``: its reduction never
  ran its init).
* ``"cpu"``: ``cpu_linear.py``.
"""

from __future__ import annotations

from ..contract import PrimFunc, T
from .cpu_linear import linear_cpu
from .spec import LinearSpec
from .tir import clamped, epilogue, kernel_attrs, prefix_len, signature


def linear(spec: LinearSpec) -> PrimFunc:
    """The nested linear kernel of ``spec`` in its layout."""
    if not isinstance(spec, LinearSpec):
        raise ValueError(f"linear expects a LinearSpec, got {type(spec).__name__}")
    if spec.layout == "cpu":
        return linear_cpu(spec)
    p, epi = spec.packed, spec.epilogue
    B, K, M, L = spec.batch, p.cols, p.rows, p.num_levels
    stage = B > 1
    ldt = p.len_dtype

    def xat(src, b, k):
        """x[b, k]: ``src`` is the transposed copy when the batch is staged, else x itself."""
        return src[k, b] if stage else src[b, k]

    @T.macro
    def rows(src, val, col, row_ptr, level_len, bias, residual, level, out):
        for m in range(M):
            with T.sblock("row"):
                vm = T.axis.spatial(M, m)
                acc = T.sblock_alloc_buffer((B,), "float32", scope="local")
                for j in range(prefix_len(level_len, level, L, vm)):
                    for b in range(B):
                        with T.sblock("update"):
                            vb = T.axis.spatial(B, b)
                            vj = T.axis.reduce(p.max_len, j)
                            with T.init():
                                acc[vb] = T.float32(0)
                            acc[vb] = acc[vb] + val[row_ptr[vm] + vj] * xat(
                                src, vb, T.Cast("int32", col[row_ptr[vm] + vj])
                            )
                for b in range(B):
                    with T.sblock("store"):
                        vb = T.axis.spatial(B, b)
                        out[vb, vm] = epilogue(
                            epi,
                            T.if_then_else(level_len[clamped(level, L), vm] > T.Cast(ldt, 0), acc[vb], T.float32(0)),
                            bias,
                            residual,
                            vm,
                            (vb, vm),
                        )

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, residual, level, out):
        T.func_attr(kernel_attrs(spec))
        if stage:
            xt = T.sblock_alloc_buffer((K, B), "float32")
            for k, b in T.grid(K, B):
                with T.sblock("x_t"):
                    vk, vb = T.axis.remap("SS", [k, b])
                    xt[vk, vb] = x[vb, vk]
            rows(xt, val, col, row_ptr, level_len, bias, residual, level, out)
        else:
            rows(x, val, col, row_ptr, level_len, bias, residual, level, out)

    return signature(body, spec, (B, K), (B, M))


__all__ = ["linear"]
