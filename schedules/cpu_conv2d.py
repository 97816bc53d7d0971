"""The nested conv2d kernel for CPUs (x86 AVX-512 / AVX2, ARM NEON): position tiles outside output
channels, register accumulators, a precomputed input offset per non-zero, the epilogue at the store.

``out[n, o, oh, ow] = epilogue(sum_{j < prefix(level, o)} values[j] * src[n, offsets[j] + q])`` with
``q = oh * PW2 + ow`` a position of the tile. The weights are packed for the plan (``repack``):
each non-zero stores the input offset it reads, so the inner loop is one broadcast, one contiguous
vector load and one FMA per non-zero and register (``cpu_tir.accumulate``).

* ``src``: a 1x1 stride-1 unpadded conv reads ``x`` directly when H*W is whole vectors; every other
  conv stages ``x`` into zero-padded planes per input channel and stride phase (rows of width
  ``PW2``), so every tap is a stride-1 shift inside its plane. A tile is whole output rows of
  ``PW2`` positions; the ``PW2 - OW`` junk columns are computed and dropped at the store.
* tasks: ``(image, tile, chunk of output channels)``, all in one parallel loop; per output channel
  the accumulator (``tile`` lanes, ``tile / vl`` registers) lives across its non-zeros.
* ``cblocks`` > 1 (3x3 and larger): the input channels are split in blocks; output channel o
  becomes sub-rows ``o * CB + b`` (each a nested row: a prefix per level), the block loop sits
  outside the channels of a task, so one block's input slice stays in L1 for all of them.

Params: ``x[N,C,H,W], values, offsets (int32), row_ptr[O*CB+1], level_len[L, O*CB], [bias[O]],
[residual[N,O,OH,OW]], level () int32, out[N,O,OH,OW]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

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
    vec,
)
from .format import NestedCSR
from .spec import Conv2dSpec, CPUConvKnobs, Packed
from .tir import kernel_attrs

PREFETCH_MAX_LEN = 256  # rows with longer prefixes stream well without help (ResNet-50: 512 cost 3 % at 50 %)


@dataclass(frozen=True)
class ConvPlan:
    """Every size the kernel uses: a pure function of the spec's geometry and its knobs."""

    spec: Conv2dSpec
    direct: bool  # x read directly (no staging)
    PW2: int  # width of one staged row (direct: W); positions q = oh * PW2 + ow
    PH2: int  # rows of one staged plane
    NPH: int  # stride phases (rows) some tap reads
    NPW: int  # stride phases (columns)
    NSH: int  # copies per phase plane (kw shifts) with shift_copies, else 1
    PLANE: int  # floats per staged plane (rounded to 16 floats = 64 B)
    CHS: int  # floats per input channel in the source (staged or x)
    XSN: int  # floats of the staged buffer per image (zeroed slack included)
    tiles: tuple  # ((count, lanes, rows, q_step, q_first), ...): main tiles, then the tail
    OCB: int  # output channels per task
    NOC: int  # output-channel chunks
    TASKS: int

    @property
    def knobs(self) -> CPUConvKnobs:
        return self.spec.knobs


def _tile_rows(PW2: int, OH: int, tile: int, vl: int) -> int:
    """Rows per tile minimising the work over all tiles: per non-zero and tile pass, lanes/vl
    vector FMAs plus about one vector-equivalent of overhead (broadcast + offset load)."""
    cap = max(tile, round_up(PW2, vl))
    best = None
    for tr in range(1, OH + 1):
        tp = round_up(tr * PW2, vl)
        if tp > cap:
            break
        nt, rest = divmod(OH, tr)
        cost = nt * (tp // vl + 1) + (round_up(rest * PW2, vl) // vl + 1 if rest else 0)
        if best is None or cost <= best[0]:
            best = (cost, tr)
    return best[1]


def plan(spec: Conv2dSpec) -> ConvPlan:
    """The plan of a CPU-layout conv spec (``spec.layout == "cpu"``)."""
    k = spec.knobs
    vl = k.vl
    _, C, H, W = spec.x_shape
    KH, KW = spec.kernel_size
    SH, SW = spec.strides
    DH, DW = spec.dilation
    _, _, OH, OW = spec.out_shape
    P = OH * OW
    pointwise = KH == KW == 1 and SH == SW == 1 and not any(spec.padding)
    direct = pointwise and ((k.direct == "always" and P >= vl) or (k.direct == "auto" and P % vl == 0))
    if direct:
        # flat tiles over the H*W positions; a tail tile (whole vectors) overlaps the one before it,
        # so it ends exactly at P: no read past x's end (overlapping positions are written twice,
        # with the same values)
        TP = min(k.tile, P // vl * vl)
        NT, rem = divmod(P, TP)
        tiles = [(NT, TP, 0, TP, 0)]
        if rem:
            tiles.append((1, round_up(rem, vl), 0, 0, P - round_up(rem, vl)))
        return _finish(spec, direct=True, PW2=W, PH2=H, NPH=1, NPW=1, NSH=1, PLANE=H * W, CHS=H * W, XSN=0, tiles=tiles)
    NPH = max((kh * DH) % SH for kh in range(KH)) + 1
    NPW = max((kw * DW) % SW for kw in range(KW)) + 1
    msh, msw = (KH - 1) * DH // SH, (KW - 1) * DW // SW  # the largest shift inside a phase plane
    NSH = msw + 1 if k.shift_copies else 1
    PW2 = round_up(OW + (0 if k.shift_copies else msw), k.pw_align)
    PH2 = OH + msh
    TR = _tile_rows(PW2, OH, k.tile, vl)
    TP = round_up(TR * PW2, vl)
    NT, TRt = divmod(OH, TR)
    tiles = [(NT, TP, TR, TR * PW2, 0)]
    if TRt:
        tiles.append((1, round_up(TRt * PW2, vl), TRt, 0, NT * TR * PW2))
    PLANE = round_up(PH2 * PW2, 16)
    CHS = NPH * NPW * NSH * PLANE
    # the largest offset a non-zero can hold plus the largest tile read: the staged buffer's end
    max_off = (C - 1) * CHS + (NPH * NPW * NSH - 1) * PLANE + msh * PW2 + (0 if k.shift_copies else msw)
    last_read = max(q_first + (cnt - 1) * q_step + lanes for cnt, lanes, _, q_step, q_first in tiles if cnt)
    XSN = round_up(max(C * CHS, max_off + last_read), 16)
    return _finish(
        spec, direct=False, PW2=PW2, PH2=PH2, NPH=NPH, NPW=NPW, NSH=NSH, PLANE=PLANE, CHS=CHS, XSN=XSN, tiles=tiles
    )


def _finish(spec, tiles, **sizes) -> ConvPlan:
    k, (N, _, _, _), O = spec.knobs, spec.x_shape, spec.out_channels
    tiles = tuple(t for t in tiles if t[0] > 0)
    ntiles = sum(t[0] for t in tiles)
    if k.oc_chunk:
        OCB = min(k.oc_chunk, O)
    else:  # enough tasks for the threads (4 per thread) without splitting channels needlessly
        want = 4 * k.threads if k.threads > 1 else 1
        OCB = cdiv(O, max(1, min(O, cdiv(want, N * ntiles))))
    NOC = cdiv(O, OCB)
    return ConvPlan(spec=spec, tiles=tiles, OCB=OCB, NOC=NOC, TASKS=N * ntiles * NOC, **sizes)


# ------------------------------------------------------------------------------------ packing
def _offsets(p: ConvPlan) -> np.ndarray:
    """int64 ``[O, C/groups*KH*KW]``: the input offset every weight of the 2-D view reads (before
    the image base and the tile start are added)."""
    s = p.spec
    O, G, (_, C, _, _) = s.out_channels, s.groups, s.x_shape
    CG, OG = C // G, O // G
    KH, KW = s.kernel_size
    (SH, SW), (DH, DW) = s.strides, s.dilation
    o = np.arange(O)[:, None, None, None]
    c = np.arange(CG)[None, :, None, None]
    kh = np.arange(KH)[None, None, :, None]
    kw = np.arange(KW)[None, None, None, :]
    cin = (o // OG) * CG + c
    if p.direct:
        off = cin * p.CHS + 0 * kh + 0 * kw
    else:
        ph, a = (kh * DH) % SH, (kh * DH) // SH
        pw, b = (kw * DW) % SW, (kw * DW) // SW
        if p.NSH > 1:  # copy b of phase (ph, pw) is already shifted by b columns
            off = cin * p.CHS + ((ph * p.NPW + pw) * p.NSH + b) * p.PLANE + a * p.PW2
        else:
            off = cin * p.CHS + (ph * p.NPW + pw) * p.PLANE + a * p.PW2 + b
    return np.broadcast_to(off, (O, CG, KH, KW)).reshape(O, -1).astype(np.int64)


def repack(fmt: NestedCSR, spec: Conv2dSpec, knobs: CPUConvKnobs) -> tuple[Conv2dSpec, NestedCSR]:
    """The CPU form of a rows-layout conv and its packed weights: the same non-zeros and levels,
    each indexed by the input offset it reads, output channels split into ``knobs.cblocks`` sub-rows."""
    if spec.layout != "rows":
        raise ValueError(f"repack takes the rows layout (the lowered form), got {spec.layout!r}")
    cpu = dataclasses.replace(
        spec, layout="cpu", knobs=knobs, packed=dataclasses.replace(spec.packed, rows=spec.packed.rows * knobs.cblocks)
    )
    p = plan(cpu)
    w2, lm2 = fmt.unpack(0), fmt.level_map()
    off = _offsets(p)
    CB = knobs.cblocks
    if CB > 1:  # sub-row o*CB + b keeps the columns of input-channel block b
        KHW = spec.kernel_size[0] * spec.kernel_size[1]
        CBS = cdiv(spec.x_shape[1] // spec.groups, CB)
        blk = (np.arange(fmt.cols) // KHW) // CBS
        w2 = np.stack([np.where(blk == b, w2, 0) for b in range(CB)], 1).reshape(fmt.rows * CB, -1)
        lm2 = np.stack([np.where(blk == b, lm2, -1) for b in range(CB)], 1).reshape(fmt.rows * CB, -1)
        off = np.repeat(off, CB, axis=0)
    packed = NestedCSR.pack(w2, lm2, fmt.num_levels, index=off)
    return dataclasses.replace(cpu, packed=Packed.of(packed)), packed


# ------------------------------------------------------------------------------------- kernel
def conv2d_cpu(spec: Conv2dSpec) -> PrimFunc:
    """The CPU conv kernel of ``spec`` (``layout == "cpu"``), complete: it needs no schedule."""
    p = plan(spec)
    pk, epi = spec.packed, spec.epilogue
    N, C, H, W = spec.x_shape
    _, O, OH, OW = spec.out_shape
    with IRBuilder() as ib:
        with TB.prim_func():
            TB.func_name("nested_conv2d")
            TB.func_attr({**kernel_attrs(spec), IS_SCHEDULED: True})
            x = TB.arg("x", TB.buffer((N, C, H, W), F32))
            vals = TB.arg("val", TB.buffer((pk.nnz,), F32))
            idx = TB.arg("offset", TB.buffer((pk.nnz,), pk.col_dtype))
            row_ptr = TB.arg("row_ptr", TB.buffer((pk.rows + 1,), "int32"))
            level_len = TB.arg("level_len", TB.buffer((pk.num_levels, pk.rows), pk.len_dtype))
            bias = TB.arg("bias", TB.buffer((O,), F32)) if epi.bias else None
            res = TB.arg("residual", TB.buffer((N, O, OH, OW), F32)) if epi.residual else None
            level = TB.arg("level", TB.buffer((), "int32"))
            out = TB.arg("out", TB.buffer((N, O, OH, OW), F32))
            xf = flat(x, N * C * H * W)
            outf = flat(out, N * O * OH * OW)
            resf = flat(res, N * O * OH * OW) if res is not None else None
            if p.direct:
                src, src_n = xf, C * H * W
            else:
                src, src_n = TB.alloc_buffer((N * p.XSN,), F32), p.XSN
                _stage(p, xf, src)
            ops = (src, src_n, vals, idx, row_ptr, level_len, bias, resf, level, outf)
            _tasks(p, *ops)
    return ib.get()


def _stage(p: ConvPlan, xf, xs) -> None:
    """``xs[n, (((c*NPH + ph)*NPW + pw)*NSH + s)*PLANE + i*PW2 + j] = xpad[n, c, i*SH + ph,
    (j + s)*SW + pw]``: zero-padded stride-phase planes (one per kw shift s with shift_copies). The
    valid rows and columns of each plane are Python constants, so every copy and zero fill is a
    constant-extent vectorised loop (no per-element select, no clamped gather)."""
    s = p.spec
    N, C, H, W = s.x_shape
    SH, SW = s.strides
    PT, PL, _, _ = s.padding
    PW2, PH2, PLANE = p.PW2, p.PH2, p.PLANE
    zero = TB.float32(0)
    with TB.parallel(0, N * C) as nc:
        n, c = nc // C, nc % C
        xbase = TB.Bind(nc * (H * W))
        for ph in range(p.NPH):
            for pw in range(p.NPW):
                for sh in range(p.NSH):
                    pbase = TB.Bind(n * p.XSN + c * p.CHS + ((ph * p.NPW + pw) * p.NSH + sh) * PLANE)
                    # plane row i reads input row i*SH + ph - PT; column j reads (j + sh)*SW + pw - PL
                    ilo = max(0, cdiv(PT - ph, SH))
                    ihi = min(PH2, max(ilo, (H - 1 + PT - ph) // SH + 1))
                    jlo = min(PW2, max(0, cdiv(PL - pw, SW) - sh))
                    jhi = min(PW2, max(jlo, (W - 1 + PL - pw) // SW + 1 - sh))
                    if ilo > 0:
                        with TB.vectorized(0, ilo * PW2) as q:
                            TB.buffer_store(xs, zero, [pbase + q])
                    with TB.serial(ilo, ihi) as i:
                        rbase = TB.Bind(pbase + i * PW2)
                        if jlo > 0:
                            with TB.vectorized(0, jlo) as j:
                                TB.buffer_store(xs, zero, [rbase + j])
                        if jhi > jlo:
                            xrow = xbase + (i * SH + ph - PT) * W
                            with TB.vectorized(0, jhi - jlo) as j:
                                TB.buffer_store(xs, xf[xrow + (j + jlo + sh) * SW + pw - PL], [rbase + jlo + j])
                        if jhi < PW2:
                            with TB.vectorized(0, PW2 - jhi) as j:
                                TB.buffer_store(xs, zero, [rbase + jhi + j])
                    if ihi < PH2 or PH2 * PW2 < PLANE:  # the rows below and the plane's alignment pad
                        with TB.vectorized(0, PLANE - ihi * PW2) as q:
                            TB.buffer_store(xs, zero, [pbase + ihi * PW2 + q])
    slack = p.XSN - C * p.CHS
    if slack:  # read by the junk lanes of the last tiles: keep it zero (finite, deterministic)
        with TB.parallel(0, N) as n:
            with TB.vectorized(0, slack) as q:
                TB.buffer_store(xs, zero, [n * p.XSN + C * p.CHS + q])


def _tasks(p: ConvPlan, src, src_n, vals, idx, row_ptr, level_len, bias, resf, level, outf) -> None:
    """Tasks = (image, position tile, chunk of output channels), all in one parallel loop."""
    ntt = sum(t[0] for t in p.tiles)
    with TB.parallel(0, p.TASKS) as task:
        n = TB.Bind(task // (ntt * p.NOC))
        t = TB.Bind(task // p.NOC % ntt)
        oc = TB.Bind(task % p.NOC)
        args = (p, src, src_n, vals, idx, row_ptr, level_len, bias, resf, level, outf, n, t, oc)
        if len(p.tiles) == 1:
            _tile(*args, 0, *p.tiles[0])
            return
        with TB.If(t < p.tiles[0][0]):
            with TB.Then():
                _tile(*args, 0, *p.tiles[0])
            with TB.Else():
                _tile(*args, p.tiles[0][0], *p.tiles[1])


def _tile(
    p,
    src,
    src_n,
    vals,
    idx,
    row_ptr,
    level_len,
    bias,
    resf,
    level,
    outf,
    n,
    t,
    oc,
    first,
    cnt,
    lanes,
    rows,
    q_step,
    q_first,
) -> None:
    k, spec = p.knobs, p.spec
    CB, OCB, vl, L = k.cblocks, p.OCB, k.vl, spec.packed.num_levels
    O = spec.out_channels
    q0 = TB.Bind((t - first) * q_step + q_first)  # first staged / flat position of the tile
    base = TB.Bind(n * src_n + q0)
    lvl = clamped_level(level, L)
    acc = Acc(k.partial, lanes, vl)
    part = TB.alloc_buffer((OCB * lanes,), F32, scope="global") if CB > 1 else None
    zero = TB.float32(0)

    def row(o, oi, b):
        r = o * CB + b if CB > 1 else o
        start = TB.Bind(row_ptr[r])
        length = TB.Bind(i32(level_len[lvl, r]))
        if k.prefetch:  # the weights of a later row: only the first tile misses them, cheap for the rest
            ahead = TB.Bind(TB.min(r + k.prefetch, spec.packed.rows - 1))
            prefetch_prefix(vals, idx, row_ptr, level_len, lvl, ahead, PREFETCH_MAX_LEN)
        for u in range(k.partial):
            if u == 0 and CB > 1:  # later channel blocks continue from the partial sum
                vec(
                    lanes, vl, lambda c0, q: acc.set(0, c0, q, TB.if_then_else(b == 0, zero, part[oi * lanes + c0 + q]))
                )
            else:
                vec(lanes, vl, lambda c0, q, u=u: acc.set(u, c0, q, zero))
        accumulate(acc, vals, idx, start, length, src, base)
        if CB > 1:
            with TB.If(b < CB - 1):
                with TB.Then():
                    vec(lanes, vl, lambda c0, q: TB.buffer_store(part, acc.total(c0, q), [oi * lanes + c0 + q]))
                with TB.Else():
                    _store(p, acc, lanes, rows, bias, resf, outf, n, o, q0)
        else:
            _store(p, acc, lanes, rows, bias, resf, outf, n, o, q0)

    def chunk(b):
        with TB.serial(0, OCB) as oi:
            o = TB.Bind(oc * OCB + oi)
            with maybe_if(O % OCB != 0, o < O):
                row(o, oi, b)

    if CB > 1:
        with TB.serial(0, CB) as b:  # blocks outside the channels: a block's input slice stays in L1
            chunk(b)
    else:
        chunk(0)


def _store(p: ConvPlan, acc: Acc, lanes, rows, bias, resf, outf, n, o, q0) -> None:
    """The epilogue at the store, ``out = act(acc + bias + residual)``; junk columns dropped."""
    spec, vl = p.spec, p.knobs.vl
    _, O, OH, OW = spec.out_shape
    obase = TB.Bind((n * O + o) * (OH * OW))

    def value(v, oidx):
        return epilogue_value(spec.epilogue, v, bias, o, resf, oidx)

    if p.direct:  # contiguous positions: full-width vector stores
        vec(
            lanes,
            vl,
            lambda c0, q: TB.buffer_store(outf, value(acc.total(c0, q), obase + q0 + c0 + q), [obase + q0 + c0 + q]),
        )
        return
    # staged: ``rows`` rows of PW2 positions, the first OW of each kept. The register tile goes to a
    # stack buffer first, so the accumulators keep uniform full-vector accesses (they stay in
    # registers) and the row slices at offsets r*PW2 are read from the copy.
    tb = TB.alloc_buffer((lanes,), F32, scope="global")
    vec(lanes, vl, lambda c0, q: TB.buffer_store(tb, acc.total(c0, q), [c0 + q]))
    oh0 = q0 // p.PW2
    if p.PW2 == OW:  # rows are contiguous in out too
        with TB.vectorized(0, rows * OW) as q:
            oidx = obase + oh0 * OW + q
            TB.buffer_store(outf, value(tb[q], oidx), [oidx])
        return
    for r in range(rows):
        with TB.vectorized(0, OW) as w:
            oidx = obase + (oh0 + r) * OW + w
            TB.buffer_store(outf, value(tb[r * p.PW2 + w], oidx), [oidx])


# ------------------------------------------------------------------------------ knobs and space
def default_knobs(spec: Conv2dSpec, vl: int, threads: int) -> CPUConvKnobs:
    """Per-layer defaults from the geometry (rules from the measured sweeps):

    * tile: 8 registers of accumulators (128 lanes AVX-512, 64 AVX2, 32 NEON);
    * prefetch: the next row's weights (in a model they come from memory, not from a hot cache:
      ResNet-50 at 10 % ran 15 % faster; a hot-loop measurement cannot see it, so it is not searched);
    * pw_align: the staged row width rounded up to whole registers when that costs <= 15 % extra
      junk columns and the tiles would otherwise start misaligned (split loads);
    * cblocks (3x3 and larger): split the input channels so one block's slice of the staged input,
      C/CB x (tile + kernel halo rows) floats, stays within about 32 KiB of L1; at most 4.
    """
    k = CPUConvKnobs(vl=vl, tile=8 * vl, threads=threads, prefetch=1)
    probe = dataclasses.replace(spec, layout="cpu", knobs=k, packed=spec.packed)
    p = plan(probe)
    if p.direct:
        return k
    OW = spec.out_shape[3]
    aligned = p.PW2 == OW and (p.tiles[0][2] * p.PW2) % vl == 0
    if not aligned and round_up(p.PW2, vl) <= 1.15 * p.PW2:
        k = dataclasses.replace(k, pw_align=vl)
        p = plan(dataclasses.replace(probe, knobs=k))
    KH, KW = spec.kernel_size
    CG = spec.x_shape[1] // spec.groups
    if KH * KW > 1:
        halo = (KH - 1) * spec.dilation[0] // spec.strides[0] * p.PW2
        ws = CG * (p.tiles[0][1] + halo) * 4
        cb = 1
        while cb < 4 and ws / cb > 32 * 1024 and CG // (2 * cb) >= 16:
            cb *= 2
        k = dataclasses.replace(k, cblocks=cb)
    return k


def knob_space(spec: Conv2dSpec, vl: int, threads: int) -> list[CPUConvKnobs]:
    """The candidates the tuner measures for one layer (the defaults first): tile in {4, 8, 12}
    registers, input-channel blocks {1, 2, 4} (3x3 and larger, C/groups >= 64; {1, 2, 4, 8} for 1x1
    with C/groups >= 128), row alignment,
    shifted copies (with alignment), direct vs staged (1x1 stride 1), output-channel chunks (threads
    > 1)."""
    base = default_knobs(spec, vl, threads)
    KH, KW = spec.kernel_size
    CG = spec.x_shape[1] // spec.groups
    pointwise = KH == KW == 1 and spec.strides == (1, 1) and not any(spec.padding)
    if KH * KW > 1:
        blocks = (1, 2, 4) if CG >= 64 else (1,)
    else:  # 1x1: blocks pay at dense levels when the input slice of a tile overflows L1 (C >= 128)
        blocks = (1, 2, 4, 8) if CG >= 128 else (1,)
    out = [base]
    for regs in (4, 8, 12):
        for cb in blocks:
            for align in (1, vl):
                for shift in (False, True) if KH * KW > 1 and align == vl else (False,):
                    for direct in ("auto", "never") if pointwise else ("auto",):
                        out.append(
                            dataclasses.replace(
                                base, tile=regs * vl, cblocks=cb, pw_align=align, shift_copies=shift, direct=direct
                            )
                        )
    if threads > 1:
        O = spec.out_channels
        out += [dataclasses.replace(base, oc_chunk=max(1, O // d)) for d in (2, 4, 8) if O // d >= 1]
    seen, unique = set(), []
    for k in out:
        if k not in seen:
            seen.add(k)
            unique.append(k)
    return unique


__all__ = ["ConvPlan", "conv2d_cpu", "default_knobs", "knob_space", "plan", "repack"]
