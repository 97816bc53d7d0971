"""The nested linear kernel: ``out[b, m] = epilogue(sum_{j < prefix(level, m)} values[j] * x[b, col[j]])``.

Params (``tir.signature``): ``x[batch, cols], values, col, row_ptr, level_len, [bias[rows]],
[residual[batch, rows]], level () int32, out[batch, rows]``. A row's stored weights are ordered
sparsest level first, so level ``l`` sums the prefix ``row_ptr[m] .. row_ptr[m] + level_len[l, m]``.

Block structure (what ``schedules/cpu.py`` and ``schedules/cuda.py`` schedule; names are contract):

* ``"x_t"`` (batch > 1): ``x`` transposed, so the batch (the vector dimension) is contiguous;
* ``"row"``: one output row ``m`` with a local accumulator over the batch, and inside it
  ``"update"``: a reduction (``T.init`` zeroes the accumulator) under the data-dependent loop over
  the row's prefix, the batch innermost (a schedule vectorises it there, never around the loop);
  with ``lanes`` U > 1 it keeps U interleaved partial sums (entries ``j * U + u``: independent
  accumulators for batch-1 GEMV, whose single sum is a serial dependency chain) and ``"tail"`` sums
  the last ``len % U`` entries;
* ``"store"``: the epilogue; a row empty at the level stores ``epilogue(0)`` (its reduction never
  ran its init).
"""

from __future__ import annotations

from ..contract import PrimFunc, T
from .spec import LinearSpec
from .tir import clamped, epilogue, kernel_attrs, prefix_len, signature


def linear(spec: LinearSpec) -> PrimFunc:
    """The nested linear kernel of ``spec`` (unscheduled)."""
    if not isinstance(spec, LinearSpec):
        raise ValueError(f"linear expects a LinearSpec, got {type(spec).__name__}")
    p, epi = spec.packed, spec.epilogue
    B, K, M, L, U = spec.batch, p.cols, p.rows, p.num_levels, spec.lanes
    UMAX = -(-p.max_len // U)  # the extent of the lane-interleaved reduction
    stage = B > 1
    ldt = p.len_dtype

    def xat(src, b, k):
        """x[b, k]: ``src`` is the transposed copy when the batch is staged, else x itself."""
        return src[k, b] if stage else src[b, k]

    def entry(row_ptr, m, j):
        return row_ptr[m] + j

    @T.macro
    def plain(src, val, col, row_ptr, level_len, level, acc, m):
        for j in range(prefix_len(level_len, level, L, m)):
            for b in range(B):
                with T.sblock("update"):
                    vb = T.axis.spatial(B, b)
                    vj = T.axis.reduce(p.max_len, j)
                    with T.init():
                        acc[vb] = T.float32(0)
                    acc[vb] = acc[vb] + val[entry(row_ptr, m, vj)] * xat(
                        src, vb, T.Cast("int32", col[entry(row_ptr, m, vj)])
                    )

    @T.macro
    def lanes(src, val, col, row_ptr, level_len, level, accu, acct, m):
        for j in range(prefix_len(level_len, level, L, m) // U):
            for u, b in T.grid(U, B):
                with T.sblock("update"):
                    vu, vb = T.axis.remap("SS", [u, b])
                    vj = T.axis.reduce(UMAX, j)
                    with T.init():
                        accu[vu, vb] = T.float32(0)
                    accu[vu, vb] = accu[vu, vb] + val[entry(row_ptr, m, vj * U + vu)] * xat(
                        src, vb, T.Cast("int32", col[entry(row_ptr, m, vj * U + vu)])
                    )
        for t in range(prefix_len(level_len, level, L, m) % U):
            for b in range(B):
                with T.sblock("tail"):
                    vb = T.axis.spatial(B, b)
                    vt = T.axis.reduce(U, t)
                    with T.init():
                        acct[vb] = T.float32(0)
                    acct[vb] = acct[vb] + val[
                        entry(row_ptr, m, prefix_len(level_len, level, L, m) // U * U + vt)
                    ] * xat(
                        src,
                        vb,
                        T.Cast("int32", col[entry(row_ptr, m, prefix_len(level_len, level, L, m) // U * U + vt)]),
                    )

    def lane_sum(accu, b):
        total = accu[0, b]
        for u in range(1, U):
            total = total + accu[u, b]
        return total

    @T.macro
    def rows(src, val, col, row_ptr, level_len, bias, residual, level, out):
        for m in range(M):
            with T.sblock("row"):
                vm = T.axis.spatial(M, m)
                if U == 1:
                    acc = T.sblock_alloc_buffer((B,), "float32", scope="local")
                    plain(src, val, col, row_ptr, level_len, level, acc, vm)
                    for b in range(B):
                        with T.sblock("store"):
                            vb = T.axis.spatial(B, b)
                            out[vb, vm] = epilogue(
                                epi,
                                T.if_then_else(
                                    level_len[clamped(level, L), vm] > T.Cast(ldt, 0), acc[vb], T.float32(0)
                                ),
                                bias,
                                residual,
                                vm,
                                (vb, vm),
                            )
                else:
                    accu = T.sblock_alloc_buffer((U, B), "float32", scope="local")
                    acct = T.sblock_alloc_buffer((B,), "float32", scope="local")
                    lanes(src, val, col, row_ptr, level_len, level, accu, acct, vm)
                    for b in range(B):
                        with T.sblock("store"):
                            vb = T.axis.spatial(B, b)
                            # reductions that ran no iteration never ran their init
                            out[vb, vm] = epilogue(
                                epi,
                                T.if_then_else(
                                    prefix_len(level_len, level, L, vm) >= U,
                                    lane_sum(accu, vb),
                                    T.float32(0),
                                )
                                + T.if_then_else(
                                    prefix_len(level_len, level, L, vm) % U > 0,
                                    acct[vb],
                                    T.float32(0),
                                ),
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
