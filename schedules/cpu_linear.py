"""The nested linear kernel for CPUs: ``out[b, m] = epilogue(sum_{j < prefix(level, m)} values[j] *
x[b, col[j]])``, in two forms chosen by the batch:

* ``"gemv"`` (batch 1): U scalar partial sums per row, independent chains that LLVM's SLP
  vectoriser turns into one gather and one vector FMA per U entries; an optional software prefetch
  of a later row's prefix (the prefix of a row is followed by the entries of denser levels, so the
  hardware streamer restarts at every row);
* ``"batch"``: ``x`` transposed (``xt[k, b]``, in-register V x V blocks) so the batch is the
  vector dimension; tasks are (batch tile, chunk of rows); per row U vector partial sums over the
  row's non-zeros (one broadcast, one contiguous load, one FMA per non-zero and register); the
  store transposes back to ``out[b, m]`` through V x V register transposes (or strided stores).

Params: ``x[B, K], values, cols, row_ptr[M+1], level_len[L, M], [bias[M]], [residual[B, M]],
level () int32, out[B, M]``: the rows layout's own operands, no repacking.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvm import tirx

from ..contract import IS_SCHEDULED, TB, IRBuilder, PrimFunc
from .cpu_tir import (
    F32,
    Acc,
    accumulate,
    cdiv,
    clamped_level,
    epilogue_value,
    flat,
    i32,
    maybe_if,
    prefetch_prefix,
    round_up,
    transpose,
    vec,
)
from .spec import CPULinearKnobs, LinearSpec
from .tir import kernel_attrs


@dataclass(frozen=True)
class LinearPlan:
    mode: str  # "gemv" | "batch"
    V: int  # batch: lanes of one vector (min(vl, the batch rounded up to a power of two))
    TB: int  # batch: batch rows per tile
    BP: int  # batch: the staged x^T row length (B rounded up to TB)
    NBT: int  # batch tiles
    RB: int  # rows per task
    NRB: int  # row chunks
    transpose: bool  # batch: stores through V x V register transposes


def plan(spec: LinearSpec) -> LinearPlan:
    k, B, M = spec.knobs, spec.batch, spec.packed.rows
    if B == 1:
        mode, V, TBr, BP, NBT = "gemv", 1, 1, 1, 1
    else:
        mode = "batch"
        V = min(k.vl, 1 << (B - 1).bit_length())
        TBr = min(round_up(k.tb, V), round_up(B, V))
        BP, NBT = round_up(B, TBr), cdiv(B, TBr)
    trans = mode == "batch" and V > 1 and M % V == 0 and k.store in ("auto", "transpose")
    if k.rows_per_task:
        RB = k.rows_per_task
    else:  # enough tasks for the threads (8 per thread)
        want = 8 * k.threads if k.threads > 1 else 1
        RB = max(1, cdiv(M, max(1, cdiv(want, NBT))))
    if trans:
        RB = round_up(RB, V)
    RB = min(RB, round_up(M, V) if trans else M)
    return LinearPlan(mode, V, TBr, BP, NBT, RB, cdiv(M, RB), trans)


def linear_cpu(spec: LinearSpec) -> PrimFunc:
    """The CPU linear kernel of ``spec`` (``layout == "cpu"``), complete: it needs no schedule."""
    p, pk, epi = plan(spec), spec.packed, spec.epilogue
    B, K, M = spec.batch, pk.cols, pk.rows
    with IRBuilder() as ib:
        with TB.prim_func():
            TB.func_name("nested_linear")
            TB.func_attr({**kernel_attrs(spec), IS_SCHEDULED: True})
            x = TB.arg("x", TB.buffer((B, K), F32))
            vals = TB.arg("val", TB.buffer((pk.nnz,), F32))
            cols = TB.arg("col", TB.buffer((pk.nnz,), pk.col_dtype))
            row_ptr = TB.arg("row_ptr", TB.buffer((M + 1,), "int32"))
            level_len = TB.arg("level_len", TB.buffer((pk.num_levels, M), pk.len_dtype))
            bias = TB.arg("bias", TB.buffer((M,), F32)) if epi.bias else None
            res = TB.arg("residual", TB.buffer((B, M), F32)) if epi.residual else None
            level = TB.arg("level", TB.buffer((), "int32"))
            out = TB.arg("out", TB.buffer((B, M), F32))
            xf, outf = flat(x, B * K), flat(out, B * M)
            resf = flat(res, B * M) if res is not None else None
            ops = (vals, cols, row_ptr, level_len, bias, resf, level, outf)
            if p.mode == "gemv":
                _gemv(spec, p, xf, *ops)
            else:
                xt = TB.alloc_buffer((K * p.BP,), F32)
                _transpose_x(spec, p, xf, xt)
                _batch(spec, p, xt, *ops)
    return ib.get()


def _prefetch_row(spec, vals, cols, row_ptr, level_len, level, m) -> None:
    """Prefetch the level prefix of row ``m + prefetch``."""
    k = spec.knobs
    ahead = TB.Bind(TB.min(m + k.prefetch, spec.packed.rows - 1))
    lvl = clamped_level(level, spec.packed.num_levels)
    prefetch_prefix(vals, cols, row_ptr, level_len, lvl, ahead, k.prefetch_max_len)


def _gemv(spec, p, xf, vals, cols, row_ptr, level_len, bias, resf, level, outf) -> None:
    k, M, L, epi = spec.knobs, spec.packed.rows, spec.packed.num_levels, spec.epilogue
    U = k.partial
    zero = TB.float32(0)
    with TB.parallel(0, p.NRB) as rb:
        with TB.serial(0, p.RB) as ri:
            m = TB.Bind(rb * p.RB + ri)
            with maybe_if(M % p.RB != 0, m < M):
                accs = [TB.alloc_buffer((1,), F32, scope="global") for _ in range(U)]
                for a in accs:
                    TB.buffer_store(a, zero, [0])
                s = TB.Bind(row_ptr[m])
                n = TB.Bind(i32(level_len[clamped_level(level, L), m]))
                if k.prefetch:
                    _prefetch_row(spec, vals, cols, row_ptr, level_len, level, m)
                with TB.serial(0, n // U) as jj:
                    for u in range(U):
                        e = s + jj * U + u
                        TB.buffer_store(accs[u], accs[u][0] + vals[e] * xf[i32(cols[e])], [0])
                with TB.serial(0, n % U) as j:
                    e = s + n // U * U + j
                    TB.buffer_store(accs[0], accs[0][0] + vals[e] * xf[i32(cols[e])], [0])
                total = accs[0][0]
                for a in accs[1:]:
                    total = total + a[0]
                TB.buffer_store(outf, epilogue_value(epi, total, bias, m, resf, m), [m])


def _transpose_x(spec, p, xf, xt) -> None:
    """``xt[k, b] = x[b, k]`` (zero for b >= B): the batch becomes the contiguous dimension. Full
    V x V blocks go through an in-register transpose."""
    B, K, BP, V = spec.batch, spec.packed.cols, p.BP, p.V
    zero = TB.float32(0)
    nbb, nkb = B // V, K // V
    if nbb and nkb:
        with TB.parallel(0, nbb * nkb) as blk:
            b0 = TB.Bind(blk // nkb * V)
            k0 = TB.Bind(blk % nkb * V)
            rows = transpose([xf[tirx.Ramp((b0 + i) * K + k0, 1, V)] for i in range(V)], V)
            for q in range(V):
                TB.buffer_store(xt, rows[q], [tirx.Ramp((k0 + q) * BP + b0, 1, V)])
    # leftovers: columns k >= nkb*V of the full batch blocks, and batch rows >= nbb*V (zero-padded)
    if nkb * V < K and nbb:
        with TB.parallel(0, K - nkb * V) as kk:
            with TB.serial(0, nbb * V) as b:
                TB.buffer_store(xt, xf[b * K + nkb * V + kk], [(nkb * V + kk) * BP + b])
    if nbb * V < BP:
        with TB.parallel(0, K) as kk:
            with TB.serial(0, BP - nbb * V) as bb:
                b = nbb * V + bb
                TB.buffer_store(xt, TB.if_then_else(b < B, xf[TB.min(b, B - 1) * K + kk], zero), [kk * BP + b])


def _batch(spec, p, xt, vals, cols, row_ptr, level_len, bias, resf, level, outf) -> None:
    k, M, B, L, epi = spec.knobs, spec.packed.rows, spec.batch, spec.packed.num_levels, spec.epilogue
    V, TBr, BP, RB = p.V, p.TB, p.BP, p.RB
    zero = TB.float32(0)
    with TB.parallel(0, p.NBT * p.NRB) as task:
        bt = TB.Bind(task // p.NRB)
        rb = TB.Bind(task % p.NRB)
        b0 = TB.Bind(bt * TBr)
        acc = Acc(k.partial, TBr, V)
        st = TB.alloc_buffer((V * TBr,), F32, scope="global") if p.transpose else None

        def row(m, i):
            s = TB.Bind(row_ptr[m])
            n = TB.Bind(i32(level_len[clamped_level(level, L), m]))
            if k.prefetch:
                _prefetch_row(spec, vals, cols, row_ptr, level_len, level, m)
            for u in range(k.partial):
                vec(TBr, V, lambda c0, q, u=u: acc.set(u, c0, q, zero))
            accumulate(acc, vals, cols, s, n, xt, b0, stride=BP)
            if p.transpose:  # park the row in the stack tile (row i of the V-row block)
                vec(TBr, V, lambda c0, q: TB.buffer_store(st, acc.total(c0, q), [i * TBr + c0 + q]))
                return
            for c0 in range(0, TBr, V):  # strided scalar stores out[b0 + q, m]
                with TB.serial(0, V) as q:
                    b = b0 + c0 + q
                    with maybe_if(BP != B, b < B):
                        v = epilogue_value(epi, acc.total(c0, q), bias, m, resf, b * M + m)
                        TB.buffer_store(outf, v, [b * M + m])

        if not p.transpose:
            with TB.serial(0, RB) as ri:
                m = TB.Bind(rb * RB + ri)
                with maybe_if(M % RB != 0, m < M):
                    row(m, 0)
            return
        with TB.serial(0, RB // V) as blk:
            m0 = TB.Bind(rb * RB + blk * V)
            with maybe_if(M % RB != 0, m0 < M):
                with TB.serial(0, V) as i:
                    row(m0 + i, i)
                for c0 in range(0, TBr, V):  # out[b0 + c0 + q, m0 : m0 + V] from st[:, c0 + q]
                    vecs = transpose([st[tirx.Ramp(i * TBr + c0, 1, V)] for i in range(V)], V)
                    for q in range(V):
                        b = b0 + c0 + q
                        oidx = tirx.Ramp(b * M + m0, 1, V)
                        v = epilogue_value(epi, vecs[q], bias, tirx.Ramp(m0, 1, V), resf, oidx)
                        with maybe_if(BP != B, b < B):
                            TB.buffer_store(outf, v, [oidx])


# ------------------------------------------------------------------------------ knobs and space
def default_knobs(spec: LinearSpec, vl: int, threads: int) -> CPULinearKnobs:
    """GEMV: 8 scalar partial sums, prefetch 4 rows ahead; narrow batches (<= vl): one register per
    row, 4 partial sums, prefetch; wide batches: tiles of 4 registers, one sum."""
    if spec.batch == 1:
        return CPULinearKnobs(vl=vl, partial=8, prefetch=4, threads=threads)
    if spec.batch <= vl:
        return CPULinearKnobs(vl=vl, partial=4, tb=4 * vl, prefetch=4, threads=threads)
    return CPULinearKnobs(vl=vl, partial=1, tb=4 * vl, threads=threads)


def knob_space(spec: LinearSpec, vl: int, threads: int) -> list[CPULinearKnobs]:
    """The candidates the tuner measures (the defaults first)."""
    base = default_knobs(spec, vl, threads)
    out = [base]
    if spec.batch == 1:
        out += [dataclasses.replace(base, partial=u, prefetch=pf) for u in (4, 8, 16) for pf in (0, 2, 4, 8)]
    else:
        out += [
            dataclasses.replace(base, partial=u, tb=t * vl, store=st)
            for u in (1, 2, 4)
            for t in (2, 4, 8)
            for st in ("auto", "scatter")
        ]
    if threads > 1:
        out += [dataclasses.replace(base, rows_per_task=r) for r in (16, 64, 256) if r < spec.packed.rows]
    seen, unique = set(), []
    for k in out:
        if k not in seen:
            seen.add(k)
            unique.append(k)
    return unique


__all__ = ["LinearPlan", "default_knobs", "knob_space", "linear_cpu", "plan"]
