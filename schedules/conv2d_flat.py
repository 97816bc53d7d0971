"""The nested conv2d kernel in the *flat* layout (CPU): same params and numerics as ``conv2d.py``.

The input is staged (``"stage"``, plus ``"stage_tail"`` zeroing the slack) into one zero-padded
plane per input channel and stride phase: ``xs[n, ((c * NPH + ph) * NPW + pw) * PLANE + i * PW2 + j]
= xpad[n, c, i * SH + ph, j * SW + pw]``. Tap ``(kh, kw)`` of output ``(oh, ow)`` then reads
``xs[.., base(c, kh, kw) + oh * PW2 + ow]``: a stride-1 access. Output positions are flattened as
``q = oh * PW2 + ow`` over full padded rows (the ``PW2 - OW`` extra columns are computed and dropped
at the store), and a ``"row"`` block is one output channel x a tile of ``TP`` (a multiple of 8)
consecutive positions, so every vector load of ``"update"`` is contiguous and full width.

``spec.dense_levels``: levels that take the dense path instead (``"dense_zero"`` /
``"dense_scatter"`` scatter the level's prefix into a zeroed ``[O, cols]`` workspace, then
``"dense_row"`` runs a dense direct conv blocked over ``DOB`` output channels x ``DTP`` positions on
it); the test is a bit mask of the (clamped) level, a constant of the kernel. No weight is stored
twice.
"""

from __future__ import annotations

from ..contract import PrimFunc, T
from .spec import Conv2dSpec
from .tir import clamped, epilogue, kernel_attrs, prefix_len, signature

_TILE = 64  # output positions per "row" block (a multiple of 8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def flat_geometry(spec: Conv2dSpec) -> dict:
    """Sizes of the flat layout (see the module docstring)."""
    _, C, _, _ = spec.x_shape
    KH, KW = spec.kernel_size
    SH, SW = spec.strides
    DH, DW = spec.dilation
    _, _, OH, OW = spec.out_shape
    nph = max((kh * DH) % SH for kh in range(KH)) + 1  # phases of the input rows some tap reads
    npw = max((kw * DW) % SW for kw in range(KW)) + 1
    msh, msw = (KH - 1) * DH // SH, (KW - 1) * DW // SW  # largest shift inside a phase plane
    PH2, PW2 = OH + msh, OW + msw  # one phase plane
    P = OH * PW2  # flat output positions (PW2 - OW of every PW2 are dropped at the store)
    NT = _cdiv(P, _TILE)
    TP = _cdiv(_cdiv(P, NT), 8) * 8
    plane = PH2 * PW2
    chs = nph * npw * plane  # per input channel
    slack = NT * TP - P + msw  # read past the last plane by the last tile's dropped positions
    return dict(
        OH=OH,
        OW=OW,
        NPH=nph,
        NPW=npw,
        PH2=PH2,
        PW2=PW2,
        P=P,
        NT=NT,
        TP=TP,
        PLANE=plane,
        CHS=chs,
        SLACK=slack,
        XS=C * chs + slack,
    )


def conv2d_flat(spec: Conv2dSpec) -> PrimFunc:
    """The flat-layout conv kernel of ``spec`` (``spec.layout == "flat"``), unscheduled."""
    p, epi = spec.packed, spec.epilogue
    N, C, H, W = spec.x_shape
    KH, KW = spec.kernel_size
    SH, SW = spec.strides
    PT, PL, _, _ = spec.padding
    DH, DW = spec.dilation
    _, O, _, _ = spec.out_shape
    L, G, ldt = p.num_levels, spec.groups, p.len_dtype
    g = flat_geometry(spec)
    OW, NPH, NPW, PH2, PW2 = g["OW"], g["NPH"], g["NPW"], g["PH2"], g["PW2"]
    P, NT, TP, PLANE, CHS, SLACK, XS = (g[k] for k in ("P", "NT", "TP", "PLANE", "CHS", "SLACK", "XS"))
    CG, OG, KHW = C // G, O // G, KH * KW
    K = CG * KHW
    DOB = next(d for d in (4, 3, 2, 1) if OG % d == 0)  # dense path: output channels per block
    DTP = 16 if TP % 16 == 0 else 8  # dense path: positions per block
    dmask = sum(1 << lvl for lvl in spec.dense_levels)

    def tap(c):
        """Offset of stored column c = (ci, kh, kw) inside its group's staged input."""
        kh = c % KHW // KW * DH
        kw = c % KW * DW
        return c // KHW * CHS + (kh % SH * NPW + kw % SW) * PLANE + kh // SH * PW2 + kw // SW

    def kept(q):
        """Flat position q is a real output (not slack, not a dropped padded column)."""
        return T.And(q < P, q % PW2 < OW)

    def at(n, o, q):
        """The output index of flat position q."""
        return (n, o, q // PW2, q % PW2)

    @T.macro
    def sparse(xs, val, col, row_ptr, level_len, bias, residual, level, out):
        for n, o, t in T.grid(N, O, NT):
            with T.sblock("row"):
                vn, vo, vt = T.axis.remap("SSS", [n, o, t])
                acc = T.sblock_alloc_buffer((TP,), "float32", scope="local")
                for j in range(prefix_len(level_len, level, L, vo)):
                    for q in range(TP):
                        with T.sblock("update"):
                            vq = T.axis.spatial(TP, q)
                            vj = T.axis.reduce(p.max_len, j)
                            with T.init():
                                acc[vq] = T.float32(0)
                            acc[vq] = (
                                acc[vq]
                                + val[row_ptr[vo] + vj]
                                * xs[
                                    vn, vo // OG * CG * CHS + tap(T.Cast("int32", col[row_ptr[vo] + vj])) + vt * TP + vq
                                ]
                            )
                for q in range(TP):
                    with T.sblock("store"):
                        vq = T.axis.spatial(TP, q)
                        if kept(vt * TP + vq):
                            out[at(vn, vo, vt * TP + vq)] = epilogue(
                                epi,
                                T.if_then_else(
                                    level_len[clamped(level, L), vo] > T.Cast(ldt, 0), acc[vq], T.float32(0)
                                ),
                                bias,
                                residual,
                                vo,
                                at(vn, vo, vt * TP + vq),
                            )

    @T.macro
    def dense(xs, val, col, row_ptr, level_len, bias, residual, level, out):
        wd = T.sblock_alloc_buffer((O, K), "float32")
        for o, k in T.grid(O, K):
            with T.sblock("dense_zero"):
                vo, vk = T.axis.remap("SS", [o, k])
                wd[vo, vk] = T.float32(0)
        for o in range(O):
            for j in range(prefix_len(level_len, level, L, o)):
                with T.sblock("dense_scatter"):
                    vo = T.axis.spatial(O, o)
                    vj = T.axis.opaque(p.max_len, j)
                    T.reads(val[row_ptr[vo] + vj], col[row_ptr[vo] + vj], row_ptr[vo])
                    T.writes(wd[vo, 0:K])
                    wd[vo, T.Cast("int32", col[row_ptr[vo] + vj])] = val[row_ptr[vo] + vj]
        for n, ob, t, tp in T.grid(N, O // DOB, NT, TP // DTP):
            with T.sblock("dense_row"):
                vn, vob, vt, vtp = T.axis.remap("SSSS", [n, ob, t, tp])
                dacc = T.sblock_alloc_buffer((DOB, DTP), "float32", scope="local")
                for ci, kh, kw, u, q in T.grid(CG, KH, KW, DOB, DTP):
                    with T.sblock("dense_update"):
                        vci, vkh, vkw, vu, vq = T.axis.remap("RRRSS", [ci, kh, kw, u, q])
                        with T.init():
                            dacc[vu, vq] = T.float32(0)
                        dacc[vu, vq] = (
                            dacc[vu, vq]
                            + wd[vob * DOB + vu, vci * KHW + vkh * KW + vkw]
                            * xs[
                                vn,
                                (vob * DOB) // OG * CG * CHS
                                + vci * CHS
                                + tap(vkh * KW + vkw)
                                + vt * TP
                                + vtp * DTP
                                + vq,
                            ]
                        )
                for u, q in T.grid(DOB, DTP):
                    with T.sblock("dense_store"):
                        vu, vq = T.axis.remap("SS", [u, q])
                        if kept(vt * TP + vtp * DTP + vq):
                            out[at(vn, vob * DOB + vu, vt * TP + vtp * DTP + vq)] = epilogue(
                                epi,
                                dacc[vu, vq],
                                bias,
                                residual,
                                vob * DOB + vu,
                                at(vn, vob * DOB + vu, vt * TP + vtp * DTP + vq),
                            )

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, residual, level, out):
        T.func_attr(kernel_attrs(spec))
        xs = T.sblock_alloc_buffer((N, XS), "float32")
        for n, c, ph, pw, i, jj in T.grid(N, C, NPH, NPW, PH2, PW2):
            with T.sblock("stage"):
                vn, vc, vph, vpw, vi, vjj = T.axis.remap("SSSSSS", [n, c, ph, pw, i, jj])
                xs[vn, ((vc * NPH + vph) * NPW + vpw) * PLANE + vi * PW2 + vjj] = T.if_then_else(
                    PT <= vi * SH + vph and vi * SH + vph < H + PT and PL <= vjj * SW + vpw and vjj * SW + vpw < W + PL,
                    x[vn, vc, T.min(T.max(vi * SH + vph - PT, 0), H - 1), T.min(T.max(vjj * SW + vpw - PL, 0), W - 1)],
                    T.float32(0),
                )
        for n, s in T.grid(N, SLACK):
            with T.sblock("stage_tail"):
                vn, vs = T.axis.remap("SS", [n, s])
                xs[vn, C * CHS + vs] = T.float32(0)
        if dmask == 0:
            sparse(xs, val, col, row_ptr, level_len, bias, residual, level, out)
        else:
            if (T.shift_right(dmask, clamped(level, L)) & 1) == 0:
                sparse(xs, val, col, row_ptr, level_len, bias, residual, level, out)
            else:
                dense(xs, val, col, row_ptr, level_len, bias, residual, level, out)

    return signature(body, spec, spec.x_shape, spec.out_shape)


__all__ = ["conv2d_flat", "flat_geometry"]
