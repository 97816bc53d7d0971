"""The nested conv2d kernels: NCHW input, the OIHW weight packed as rows ``[O, C/groups*KH*KW]``.

``out[n, o, oh, ow] = epilogue(sum_{j < prefix(level, o)} values[j] * xpad[n, ci(j), oh*SH + kh(j)*DH,
ow*SW + kw(j)*DW])`` where stored column ``col[j] = (c, kh, kw)`` of group ``o // (O/groups)``.
Params: ``tir.signature``. ``conv2d(spec)`` builds the layout the spec names:

* ``"rows"`` (the reference form; CUDA schedules it): ``"pad"`` stages the zero-padded input when
  there is padding; a ``"row"`` block is one output channel x a tile of ``TR`` output rows, with a
  local ``TR x OW`` accumulator: ``"update"`` under the data-dependent loop over the channel's
  prefix (the positions innermost), then ``"store"`` (the epilogue; an empty channel stores
  ``epilogue(0)``).
* ``"cpu"``: ``cpu_conv2d.py`` (position tiles outside channels, input offsets per non-zero).
"""

from __future__ import annotations

from ..contract import PrimFunc, T
from .cpu_conv2d import conv2d_cpu
from .spec import Conv2dSpec
from .tir import clamped, epilogue, kernel_attrs, prefix_len, signature

_TILE_POSITIONS = 64  # rows layout: output positions per "row" block (fits every CPU's vector registers)


def tile_rows(oh: int, ow: int) -> int:
    """Output rows per "row" block: the largest divisor of OH with TR * OW <= 64 (at least 1)."""
    return max(tr for tr in range(1, oh + 1) if oh % tr == 0 and (tr * ow <= _TILE_POSITIONS or tr == 1))


def conv2d(spec: Conv2dSpec) -> PrimFunc:
    """The nested conv2d kernel of ``spec`` in its layout (unscheduled)."""
    if not isinstance(spec, Conv2dSpec):
        raise ValueError(f"conv2d expects a Conv2dSpec, got {type(spec).__name__}")
    if spec.layout == "cpu":
        return conv2d_cpu(spec)
    return _rows(spec)


def _rows(spec: Conv2dSpec) -> PrimFunc:
    p, epi = spec.packed, spec.epilogue
    N, C, H, W = spec.x_shape
    KH, KW = spec.kernel_size
    SH, SW = spec.strides
    DH, DW = spec.dilation
    PT, PL, PB, PR = spec.padding
    _, O, OH, OW = spec.out_shape
    L, G, ldt = p.num_levels, spec.groups, p.len_dtype
    CG, OG, KHW = C // G, O // G, KH * KW
    HP, WP = (OH - 1) * SH + (KH - 1) * DH + 1, (OW - 1) * SW + (KW - 1) * DW + 1  # rows/cols some output reads
    stage = bool(PT or PL or PB or PR)
    TR = tile_rows(OH, OW)

    def tap(src, n, o, j, r, ow, col, row_ptr):
        """The input element stored weight ``j`` of channel ``o`` meets at output (r, ow)."""
        c = T.Cast("int32", col[row_ptr[o] + j])
        return src[n, o // OG * CG + c // KHW, r * SH + c % KHW // KW * DH, ow * SW + c % KW * DW]

    @T.macro
    def rows(src, val, col, row_ptr, level_len, bias, residual, level, out):
        for n, o, t in T.grid(N, O, OH // TR):
            with T.sblock("row"):
                vn, vo, vt = T.axis.remap("SSS", [n, o, t])
                acc = T.sblock_alloc_buffer((TR, OW), "float32", scope="local")
                for j in range(prefix_len(level_len, level, L, vo)):
                    for r, ow in T.grid(TR, OW):
                        with T.sblock("update"):
                            vr, vow = T.axis.remap("SS", [r, ow])
                            vj = T.axis.reduce(p.max_len, j)
                            with T.init():
                                acc[vr, vow] = T.float32(0)
                            acc[vr, vow] = acc[vr, vow] + val[row_ptr[vo] + vj] * tap(
                                src, vn, vo, vj, vt * TR + vr, vow, col, row_ptr
                            )
                for r, ow in T.grid(TR, OW):
                    with T.sblock("store"):
                        vr, vow = T.axis.remap("SS", [r, ow])
                        # an empty channel never runs the reduction's init
                        out[vn, vo, vt * TR + vr, vow] = epilogue(
                            epi,
                            T.if_then_else(
                                level_len[clamped(level, L), vo] > T.Cast(ldt, 0), acc[vr, vow], T.float32(0)
                            ),
                            bias,
                            residual,
                            vo,
                            (vn, vo, vt * TR + vr, vow),
                        )

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, residual, level, out):
        T.func_attr(kernel_attrs(spec))
        if stage:
            xp = T.sblock_alloc_buffer((N, C, HP, WP), "float32")
            for n, c, h, w in T.grid(N, C, HP, WP):
                with T.sblock("pad"):
                    vn, vc, vh, vw = T.axis.remap("SSSS", [n, c, h, w])
                    xp[vn, vc, vh, vw] = T.if_then_else(
                        PT <= vh and vh < H + PT and PL <= vw and vw < W + PL,
                        x[vn, vc, T.min(T.max(vh - PT, 0), H - 1), T.min(T.max(vw - PL, 0), W - 1)],
                        T.float32(0),
                    )
            rows(xp, val, col, row_ptr, level_len, bias, residual, level, out)
        else:
            rows(x, val, col, row_ptr, level_len, bias, residual, level, out)

    return signature(body, spec, spec.x_shape, spec.out_shape)


__all__ = ["conv2d", "tile_rows"]
