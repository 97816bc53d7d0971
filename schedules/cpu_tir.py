"""TIR building blocks of the CPU kernels, written with TVM's IR builder so Python can unroll over
constants (vector registers, partial sums, stride phases) and emit exactly the loops wanted.

Rules these helpers enforce (each measured; see ``bench/results/kernels.md``):

* an accumulator is one "global" buffer of ``vl`` floats per vector register, allocated inside
  the parallel body: TVM emits a stack alloca that LLVM keeps in a register. One buffer of a
  width that is not a power-of-two number of registers (49, 112, 176 lanes) makes LLVM scalarise
  the loop-carried vector (5-25x slower); "local" scope or 1 KiB and more becomes a workspace
  allocation in memory;
* vectorised loops sit only INSIDE the loop over a row's non-zeros (vectorising a loop around the
  data-dependent loop computes garbage on TVM 0.27);
* per non-zero and register: one broadcast, one contiguous load, one FMA.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from ..contract import TB

F32 = "float32"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def i32(e):
    return tirx.Cast("int32", e)  # a no-op cast is simplified away


def clamped_level(level, num_levels: int):
    """The run-time level clamped into ``0..L-1``: every index formed from it stays in bounds."""
    return TB.max(0, TB.min(level[()], num_levels - 1))


def flat(buf, n: int):
    """A flat alias of a parameter buffer (same data)."""
    return TB.decl_buffer((n,), buf.dtype, data=buf.data)


class Acc:
    """U partial sums x (lanes / vl) register chunks, each its own "global" buffer of vl floats."""

    def __init__(self, partial: int, lanes: int, vl: int):
        self.U, self.lanes, self.vl = partial, lanes, vl
        self.bufs = [[TB.alloc_buffer((vl,), F32, scope="global") for _ in range(lanes // vl)] for _ in range(partial)]

    def get(self, u, c0, p):
        return self.bufs[u][c0 // self.vl][p]

    def set(self, u, c0, p, value) -> None:
        TB.buffer_store(self.bufs[u][c0 // self.vl], value, [p])

    def total(self, c0, p):
        s = self.get(0, c0, p)
        for u in range(1, self.U):
            s = s + self.get(u, c0, p)
        return s


def vec(n: int, vl: int, body) -> None:
    """Positions 0..n-1 as ceil(n / vl) vectorised loops of at most vl lanes (Python-unrolled):
    ``body(c0, p)`` handles position ``c0 + p`` (c0 a Python int, p the lane variable)."""
    for c0 in range(0, n, vl):
        with TB.vectorized(0, min(vl, n - c0)) as p:
            body(c0, p)


def accumulate(acc: Acc, vals, idx, start, length, src, base, stride: int = 1) -> None:
    """``acc[u][p] += vals[j] * src[idx[j] * stride + base + p]`` over entries ``start ..
    start + length``. U > 1: entry ``start + jj*U + u`` goes to partial sum u (independent FMA
    chains), the last ``length % U`` entries to partial sum 0."""
    U = acc.U

    def fma(u, e):
        v = TB.Bind(vals[e])
        o = TB.Bind(i32(idx[e]) * stride + base)
        vec(acc.lanes, acc.vl, lambda c0, p: acc.set(u, c0, p, acc.get(u, c0, p) + v * src[o + c0 + p]))

    if U == 1:
        with TB.serial(0, length) as j:
            fma(0, start + j)
        return
    with TB.serial(0, length // U) as jj:
        for u in range(U):  # Python-unrolled: U independent chains
            fma(u, start + jj * U + u)
    with TB.serial(0, length % U) as j:
        fma(0, start + length // U * U + j)


def prefetch(buf, index) -> None:
    """A software prefetch of ``buf[index]`` (read, high locality)."""
    TB.evaluate(TB.call_llvm_intrin("void", "llvm.prefetch.p0", TB.address_of(buf[index]), 0, 3, 1))


def prefetch_prefix(vals, idx, row_ptr, level_len, lvl, row, max_len: int) -> None:
    """Prefetch the level prefix (values and indices) of ``row`` when it is shorter than
    ``max_len`` entries: short prefixes are a few lines each, scattered one row slot apart, which
    the hardware prefetchers do not follow; long ones stream."""
    start = TB.Bind(row_ptr[row])
    n = TB.Bind(i32(level_len[lvl, row]))
    per_line = 512 // bits(idx.dtype)  # indices per 64-byte cache line
    with TB.If(n < max_len):
        with TB.Then():
            with TB.serial(0, (n + 15) // 16) as c:  # one line of values per 16 entries
                prefetch(vals, start + c * 16)
            with TB.serial(0, (n + per_line - 1) // per_line) as c:
                prefetch(idx, start + c * per_line)


def transpose(rows: list, V: int) -> list:
    """Transpose V vectors of V lanes: log2(V) butterfly stages of 2-input shuffles (stage s swaps
    s-lane blocks between rows i and i+s). LLVM maps each to one or two permutes: about 120
    instructions for 16x16 on AVX-512 against about 390 for one 16-input shuffle."""
    r = list(rows)
    s = 1
    while s < V:
        new = list(r)
        for i in range(V):
            if i & s:
                continue
            a, b = r[i], r[i + s]
            new[i] = tirx.Shuffle([a, b], [j if not j & s else V + j - s for j in range(V)])
            new[i + s] = tirx.Shuffle([a, b], [j + s if not j & s else V + j for j in range(V)])
        r = [TB.Bind(e) for e in new]  # bind each stage: the expression stays a DAG, not a tree
        s *= 2
    return r


class maybe_if:
    """``TB.If(cond)`` + ``TB.Then()`` when ``needed``, else nothing (the condition always holds)."""

    def __init__(self, needed: bool, cond):
        self.frames = [TB.If(cond), TB.Then()] if needed else []

    def __enter__(self):
        for f in self.frames:
            f.__enter__()

    def __exit__(self, *exc):
        for f in reversed(self.frames):
            f.__exit__(*exc)
        return False


def epilogue_value(epi, value, bias, o, residual, oidx):
    """``act(value + bias[o] + residual[oidx])`` as ``epi`` says (absent terms left out)."""
    if epi.bias:
        value = value + bias[o]
    if epi.residual:
        value = value + residual[oidx]
    if epi.activation == "relu":
        value = TB.max(value, tirx.const(0.0, F32))
    elif epi.activation == "clip":
        lo, hi = epi.clip
        value = TB.min(TB.max(value, tirx.const(lo, F32)), tirx.const(hi, F32))
    return value


def bits(dtype: str) -> int:
    return tvm.DataType(dtype).bits


__all__ = [
    "F32",
    "Acc",
    "accumulate",
    "bits",
    "cdiv",
    "clamped_level",
    "epilogue_value",
    "flat",
    "i32",
    "maybe_if",
    "prefetch",
    "prefetch_prefix",
    "round_up",
    "transpose",
    "vec",
]
