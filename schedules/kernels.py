"""TensorIR kernel factories for nested sparse operators (unscheduled compute definitions).

Each factory is pure: a ``NestedCSR`` (for its shapes and index dtypes) and layer sizes in, a
``PrimFunc`` out. The operands of the format come in ``fmt.arrays()`` order (values, col, row_ptr,
level_len); the level is a 0-d int32 buffer, clamped into ``0..L-1`` before any index is formed.

Block structure (what ``schedules/cpu.py`` schedules; the names are part of the contract):

* ``"x_t"`` (linear, batch > 1) / ``"pad"`` (conv with padding): a staging copy of the input into
  a layout where the dense ("vector") dimension is innermost and no bound checks are needed.
* ``"row"``: one output row (linear: output channel ``m``; conv: ``(n, o, tile of TR output rows)``)
  with a local accumulator over the dense dimension. Inside it:
  ``"update"``, a reduction block (``T.init`` zeroes the accumulator) under the data-dependent loop
  ``for j in range(level_len[lvl, r])`` reading entry ``row_ptr[r] + j``, with the dense loop(s)
  innermost; then ``"store"`` (out = acc (+ bias); 0 for a row empty at this level, whose
  reduction never ran its init). Being a proper reduction block lets a schedule vectorise the
  dense loop and ``decompose_reduction`` the init out of the data-dependent loop.

The dense dimension (the batch for linear; output columns ``ow`` of a tile of output rows for conv,
as XNNPACK's sparse kernels do) sits INSIDE the data-dependent loop, so a schedule vectorises it
there. Vectorising a loop that encloses the data-dependent loop is wrong on TVM 0.27 (it compiles
and computes garbage), so the layout never asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..contract import ATTR_NUM_LEVELS, ATTR_OP, NOALIAS, T
from .format import NestedCSR

# attrs every nested kernel carries (schedules and build find kernels by them)
ATTR_KERNEL = "nested.kernel"  # "<op>/v<FORMAT layout version>": which block structure to expect
ATTR_DENSE_EXTENT = "nested.dense_extent"  # extent of the dense (vector) dimension in "update"
KERNEL_VERSION = 1

# Conv: output rows per "row" block are chosen so a block holds at most this many output positions
# (an accumulator that fits the vector registers of every CPU family we target).
_CONV_TILE_POSITIONS = 64


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int_tuple(name: str, value, n: int, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        value = (value,) * n
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {n} ints, got {value!r}") from None
    if len(items) != n:
        raise ValueError(f"{name} must have {n} entries, got {value!r}")
    return tuple(_pos_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(items))


def _check_fmt(fmt) -> NestedCSR:
    if not isinstance(fmt, NestedCSR):
        raise ValueError(f"fmt must be a NestedCSR, got {type(fmt).__name__}")
    return fmt


def _attrs(op: str, fmt: NestedCSR | None, dense_extent: int, num_levels: int | None = None, **extra) -> dict:
    attrs = {
        NOALIAS: True,
        ATTR_OP: op,
        ATTR_NUM_LEVELS: fmt.num_levels if fmt is not None else num_levels,
        ATTR_KERNEL: f"{op}/v{KERNEL_VERSION}",
        ATTR_DENSE_EXTENT: dense_extent,
    }
    attrs.update(extra)
    return attrs


# ---------------------------------------------------------------------------------------- linear
ATTR_CONV = "nested.conv"  # conv: [KH, KW, SH, SW, PT, PL, PB, PR, DH, DW, groups]
ATTR_LAYOUT = "nested.layout"  # conv: "rows" (tiles of output rows) | "flat" (flat padded positions)
ATTR_DENSE_LEVELS = "nested.dense_levels"  # levels that run the dense path (scatter + dense kernel)
ATTR_LANES = "nested.lanes"  # linear: interleaved partial sums per row (1: the plain structure)
ATTR_MAX_LEN = "nested.max_len"  # longest row (level 0): domain of the in-row reduction index


def nested_linear(fmt: NestedCSR, batch: int, has_bias: bool, lanes: int = 1):
    """``out[b, m] = sum_{j in prefix(level, m)} values[j] * x[b, col[j]] (+ bias[m])``.

    Params: ``x[batch, cols] f32, values, col, row_ptr, level_len, bias[rows] f32 (if has_bias),
    level () int32, out[batch, rows] f32``.

    ``lanes`` > 1 splits every row's prefix into ``lanes`` interleaved partial sums (entries
    ``j * lanes + u``) plus a tail block ``"tail"`` for the last ``len % lanes`` entries: independent
    accumulators for batch-1 GEMV, whose single accumulator is a serial dependency chain. The
    structure is recorded in the attr ``nested.lanes``; ``with_lanes`` re-specialises a kernel.
    """
    fmt = _check_fmt(fmt)
    B = _pos_int("batch", batch)
    if not isinstance(has_bias, bool):
        raise ValueError(f"has_bias must be a bool, got {has_bias!r}")
    U = _pos_int("lanes", lanes)
    return _linear_func(
        fmt.rows,
        fmt.cols,
        fmt.num_levels,
        int(fmt.values.shape[0]),
        max(1, int(fmt.level_len[0].max())),
        str(fmt.col.dtype),
        str(fmt.level_len.dtype),
        B,
        has_bias,
        U,
    )


def with_lanes(func, lanes: int):
    """The same nested linear kernel (same params, same attrs) with ``lanes`` partial sums.

    Everything the factory needs is in the signature and the attrs, so a schedule rule can pick
    the structure for its target without the packed weights.
    """
    lanes = _pos_int("lanes", lanes)
    attrs = func.attrs
    if attrs is None or str(attrs.get(ATTR_OP, "")) != "linear":
        raise ValueError("with_lanes expects a nested linear kernel")
    shapes = {p.name: [int(d) for d in p.ty.shape] for p in func.params}
    dtypes = {p.name: str(getattr(p.ty.dtype, "dtype", p.ty.dtype)) for p in func.params}
    B, K = shapes["x"]
    L, M = shapes["level_len"]
    max_len = int(attrs[ATTR_MAX_LEN]) if ATTR_MAX_LEN in attrs else shapes["val"][0]
    return _linear_func(
        M, K, L, shapes["val"][0], max_len, dtypes["col"], dtypes["level_len"], B, "bias" in shapes, lanes
    )


def _linear_func(M, K, L, NNZ, MAXLEN, cdt, ldt, B, has_bias, U):
    stage = B > 1  # batch > 1: transpose x so the batch (the vector dimension) is contiguous
    attrs = _attrs("linear", None, B, num_levels=L, **{ATTR_LANES: U, ATTR_MAX_LEN: MAXLEN})
    UMAX = (MAXLEN + U - 1) // U

    def _lane_sum(acc, vb):
        total = acc[0, vb]
        for u in range(1, U):
            total = total + acc[u, vb]
        return total

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, level, out):
        T.func_attr(attrs)
        if stage:
            xt = T.sblock_alloc_buffer((K, B), "float32")
            for k, b in T.grid(K, B):
                with T.sblock("x_t"):
                    vk, vb = T.axis.remap("SS", [k, b])
                    xt[vk, vb] = x[vb, vk]
        for m in range(M):
            with T.sblock("row"):
                vm = T.axis.spatial(M, m)
                if U == 1:
                    acc = T.sblock_alloc_buffer((B,), "float32", scope="local")
                    for j in range(T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm])):
                        for b in range(B):
                            with T.sblock("update"):
                                vb = T.axis.spatial(B, b)
                                vj = T.axis.reduce(MAXLEN, j)
                                with T.init():
                                    acc[vb] = T.float32(0)
                                if stage:
                                    acc[vb] = (
                                        acc[vb] + val[row_ptr[vm] + vj] * xt[T.Cast("int32", col[row_ptr[vm] + vj]), vb]
                                    )
                                else:
                                    acc[vb] = (
                                        acc[vb] + val[row_ptr[vm] + vj] * x[vb, T.Cast("int32", col[row_ptr[vm] + vj])]
                                    )
                    for b in range(B):
                        with T.sblock("store"):
                            vb = T.axis.spatial(B, b)
                            # an empty row never runs the reduction's init
                            if has_bias:
                                out[vb, vm] = (
                                    T.if_then_else(
                                        level_len[T.max(0, T.min(level[()], L - 1)), vm] > T.Cast(ldt, 0),
                                        acc[vb],
                                        T.float32(0),
                                    )
                                    + bias[vm]
                                )
                            else:
                                out[vb, vm] = T.if_then_else(
                                    level_len[T.max(0, T.min(level[()], L - 1)), vm] > T.Cast(ldt, 0),
                                    acc[vb],
                                    T.float32(0),
                                )
                else:
                    accu = T.sblock_alloc_buffer((U, B), "float32", scope="local")
                    acct = T.sblock_alloc_buffer((B,), "float32", scope="local")
                    for j in range(T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) // U):
                        for u, b in T.grid(U, B):
                            with T.sblock("update"):
                                vu, vb = T.axis.remap("SS", [u, b])
                                vj = T.axis.reduce(UMAX, j)
                                with T.init():
                                    accu[vu, vb] = T.float32(0)
                                if stage:
                                    accu[vu, vb] = (
                                        accu[vu, vb]
                                        + val[row_ptr[vm] + vj * U + vu]
                                        * xt[T.Cast("int32", col[row_ptr[vm] + vj * U + vu]), vb]
                                    )
                                else:
                                    accu[vu, vb] = (
                                        accu[vu, vb]
                                        + val[row_ptr[vm] + vj * U + vu]
                                        * x[vb, T.Cast("int32", col[row_ptr[vm] + vj * U + vu])]
                                    )
                    for t in range(T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) % U):
                        for b in range(B):
                            with T.sblock("tail"):
                                vb = T.axis.spatial(B, b)
                                vt = T.axis.reduce(U, t)
                                with T.init():
                                    acct[vb] = T.float32(0)
                                if stage:
                                    acct[vb] = (
                                        acct[vb]
                                        + val[
                                            row_ptr[vm]
                                            + T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) // U * U
                                            + vt
                                        ]
                                        * xt[
                                            T.Cast(
                                                "int32",
                                                col[
                                                    row_ptr[vm]
                                                    + T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm])
                                                    // U
                                                    * U
                                                    + vt
                                                ],
                                            ),
                                            vb,
                                        ]
                                    )
                                else:
                                    acct[vb] = (
                                        acct[vb]
                                        + val[
                                            row_ptr[vm]
                                            + T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) // U * U
                                            + vt
                                        ]
                                        * x[
                                            vb,
                                            T.Cast(
                                                "int32",
                                                col[
                                                    row_ptr[vm]
                                                    + T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm])
                                                    // U
                                                    * U
                                                    + vt
                                                ],
                                            ),
                                        ]
                                    )
                    for b in range(B):
                        with T.sblock("store"):
                            vb = T.axis.spatial(B, b)
                            # reductions that ran no iteration never ran their init
                            if has_bias:
                                out[vb, vm] = (
                                    T.if_then_else(
                                        T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) >= U,
                                        _lane_sum(accu, vb),
                                        T.float32(0),
                                    )
                                    + T.if_then_else(
                                        T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) % U > 0,
                                        acct[vb],
                                        T.float32(0),
                                    )
                                    + bias[vm]
                                )
                            else:
                                out[vb, vm] = T.if_then_else(
                                    T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) >= U,
                                    _lane_sum(accu, vb),
                                    T.float32(0),
                                ) + T.if_then_else(
                                    T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vm]) % U > 0,
                                    acct[vb],
                                    T.float32(0),
                                )

    if has_bias:

        @T.prim_func(s_tir=True)
        def nested_linear_bias(
            x: T.Buffer((B, K), "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((M + 1,), "int32"),
            level_len: T.Buffer((L, M), ldt),
            bias: T.Buffer((M,), "float32"),
            level: T.Buffer((), "int32"),
            out: T.Buffer((B, M), "float32"),
        ):
            body(x, val, col, row_ptr, level_len, bias, level, out)

        return nested_linear_bias

    @T.prim_func(s_tir=True)
    def nested_linear(
        x: T.Buffer((B, K), "float32"),
        val: T.Buffer((NNZ,), "float32"),
        col: T.Buffer((NNZ,), cdt),
        row_ptr: T.Buffer((M + 1,), "int32"),
        level_len: T.Buffer((L, M), ldt),
        level: T.Buffer((), "int32"),
        out: T.Buffer((B, M), "float32"),
    ):
        body(x, val, col, row_ptr, level_len, None, level, out)

    return nested_linear


# ---------------------------------------------------------------------------------------- conv2d
def _conv_signature(body, x_shape, O, NNZ, cdt, L, ldt, out_hw, has_bias):
    """The PrimFunc around a conv ``body`` macro: one parameter list for every conv layout, bias optional."""
    N, C, H, W = x_shape
    OH, OW = out_hw
    if has_bias:

        @T.prim_func(s_tir=True)
        def nested_conv2d_bias(
            x: T.Buffer((N, C, H, W), "float32"),
            val: T.Buffer((NNZ,), "float32"),
            col: T.Buffer((NNZ,), cdt),
            row_ptr: T.Buffer((O + 1,), "int32"),
            level_len: T.Buffer((L, O), ldt),
            bias: T.Buffer((O,), "float32"),
            level: T.Buffer((), "int32"),
            out: T.Buffer((N, O, OH, OW), "float32"),
        ):
            body(x, val, col, row_ptr, level_len, bias, level, out)

        return nested_conv2d_bias

    @T.prim_func(s_tir=True)
    def nested_conv2d(
        x: T.Buffer((N, C, H, W), "float32"),
        val: T.Buffer((NNZ,), "float32"),
        col: T.Buffer((NNZ,), cdt),
        row_ptr: T.Buffer((O + 1,), "int32"),
        level_len: T.Buffer((L, O), ldt),
        level: T.Buffer((), "int32"),
        out: T.Buffer((N, O, OH, OW), "float32"),
    ):
        body(x, val, col, row_ptr, level_len, None, level, out)

    return nested_conv2d


def conv2d_output_shape(x_shape, out_channels, kernel_size, strides, padding, dilation):
    n, _, h, w = x_shape
    kh, kw = kernel_size
    oh = (h + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    return (n, out_channels, oh, ow)


def _conv_tile_rows(oh: int, ow: int) -> int:
    """Output rows per "row" block: the largest divisor of OH with TR * OW <= 64 (at least 1)."""
    best = 1
    for tr in range(1, oh + 1):
        if oh % tr == 0 and tr * ow <= _CONV_TILE_POSITIONS:
            best = tr
    return best


def _conv_args(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias):
    """The checked arguments of a conv factory; ValueError naming the bad one. A 2-entry padding is
    (top/bottom, left/right)."""
    fmt = _check_fmt(fmt)
    if not isinstance(padding, int) and len(tuple(padding)) == 2:
        padding = tuple(padding) * 2
    if not isinstance(has_bias, bool):
        raise ValueError(f"has_bias must be a bool, got {has_bias!r}")
    return (
        fmt,
        _int_tuple("x_shape", x_shape, 4, 1),
        _int_tuple("kernel_size", kernel_size, 2, 1),
        _int_tuple("strides", strides, 2, 1),
        _int_tuple("dilation", dilation, 2, 1),
        _int_tuple("padding", padding, 4, 0),
        _pos_int("groups", groups),
    )


def nested_conv2d(
    fmt: NestedCSR,
    x_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    has_bias: bool,
):
    """Nested sparse conv2d, NCHW input, OIHW weight (``fmt`` rows = O, cols = C/groups*KH*KW).

    ``padding`` is ``(top, left, bottom, right)``. Params: ``x[N, C, H, W] f32, values, col,
    row_ptr, level_len, bias[O] f32 (if has_bias), level () int32, out[N, O, OH, OW] f32``.
    """
    fmt, (N, C, H, W), (KH, KW), (SH, SW), (DH, DW), (PT, PL, PB, PR), G = _conv_args(
        fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias
    )
    O, L = fmt.rows, fmt.num_levels
    if C % G:
        raise ValueError(f"groups={G} does not divide the input channels C={C}")
    if O % G:
        raise ValueError(f"groups={G} does not divide the output channels O={O} (fmt.rows)")
    CG, OG, KHW = C // G, O // G, KH * KW
    if fmt.cols != CG * KHW:
        raise ValueError(f"fmt.cols={fmt.cols} != C/groups*KH*KW = {CG}*{KH}*{KW} = {CG * KHW}")
    _, _, OH, OW = conv2d_output_shape((N, C, H, W), O, (KH, KW), (SH, SW), (PT, PL, PB, PR), (DH, DW))
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size {OH}x{OW} is empty for input {H}x{W}, kernel {KH}x{KW}, "
            f"strides {(SH, SW)}, padding {(PT, PL, PB, PR)}, dilation {(DH, DW)}"
        )
    # the padded input only needs the rows/cols some output reads
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    WP = (OW - 1) * SW + (KW - 1) * DW + 1
    stage = bool(PT or PL or PB or PR)
    TR = _conv_tile_rows(OH, OW)
    NT = OH // TR
    NNZ = int(fmt.values.shape[0])
    MAXLEN = max(1, int(fmt.level_len[0].max()))  # domain of the in-row reduction index
    cdt, ldt = str(fmt.col.dtype), str(fmt.level_len.dtype)
    attrs = _attrs(
        "conv2d",
        fmt,
        OW,
        **{"nested.tile_rows": TR, ATTR_MAX_LEN: MAXLEN, ATTR_CONV: [KH, KW, SH, SW, PT, PL, PB, PR, DH, DW, G]},
    )

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, level, out):
        T.func_attr(attrs)
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
        for n, o, t in T.grid(N, O, NT):
            with T.sblock("row"):
                vn, vo, vt = T.axis.remap("SSS", [n, o, t])
                acc = T.sblock_alloc_buffer((TR, OW), "float32", scope="local")
                for j in range(T.Cast("int32", level_len[T.max(0, T.min(level[()], L - 1)), vo])):
                    for r, ow in T.grid(TR, OW):
                        with T.sblock("update"):
                            vr, vow = T.axis.remap("SS", [r, ow])
                            vj = T.axis.reduce(MAXLEN, j)
                            with T.init():
                                acc[vr, vow] = T.float32(0)
                            if stage:
                                acc[vr, vow] = (
                                    acc[vr, vow]
                                    + val[row_ptr[vo] + vj]
                                    * xp[
                                        vn,
                                        (vo // OG) * CG + T.Cast("int32", col[row_ptr[vo] + vj]) // KHW,
                                        (vt * TR + vr) * SH + T.Cast("int32", col[row_ptr[vo] + vj]) % KHW // KW * DH,
                                        vow * SW + T.Cast("int32", col[row_ptr[vo] + vj]) % KW * DW,
                                    ]
                                )
                            else:
                                acc[vr, vow] = (
                                    acc[vr, vow]
                                    + val[row_ptr[vo] + vj]
                                    * x[
                                        vn,
                                        (vo // OG) * CG + T.Cast("int32", col[row_ptr[vo] + vj]) // KHW,
                                        (vt * TR + vr) * SH + T.Cast("int32", col[row_ptr[vo] + vj]) % KHW // KW * DH,
                                        vow * SW + T.Cast("int32", col[row_ptr[vo] + vj]) % KW * DW,
                                    ]
                                )
                for r, ow in T.grid(TR, OW):
                    with T.sblock("store"):
                        vr, vow = T.axis.remap("SS", [r, ow])
                        # an empty row never runs the reduction's init
                        if has_bias:
                            out[vn, vo, vt * TR + vr, vow] = (
                                T.if_then_else(
                                    level_len[T.max(0, T.min(level[()], L - 1)), vo] > T.Cast(ldt, 0),
                                    acc[vr, vow],
                                    T.float32(0),
                                )
                                + bias[vo]
                            )
                        else:
                            out[vn, vo, vt * TR + vr, vow] = T.if_then_else(
                                level_len[T.max(0, T.min(level[()], L - 1)), vo] > T.Cast(ldt, 0),
                                acc[vr, vow],
                                T.float32(0),
                            )

    return _conv_signature(body, (N, C, H, W), O, NNZ, cdt, L, ldt, (OH, OW), has_bias)


# ----------------------------------------------------------------------------- conv2d, flat layout
_FLAT_TILE = 64  # output positions per "row" block of the flat layout (a multiple of 8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _dense_mask(dense_levels, L: int) -> int:
    mask = 0
    for lvl in dense_levels or ():
        lvl = _pos_int("dense level", lvl, 0)
        if lvl >= L:
            raise ValueError(f"dense level {lvl} >= num_levels={L}")
        mask |= 1 << lvl
    return mask


def flat_geometry(x_shape, kernel_size, strides, padding, dilation) -> dict:
    """Sizes of the flat layout (see ``nested_conv2d_flat``)."""
    _N, C, _H, _W = x_shape
    KH, KW = kernel_size
    SH, SW = strides
    _PT, _PL, _PB, _PR = padding
    DH, DW = dilation
    _, _, OH, OW = conv2d_output_shape(x_shape, 1, kernel_size, strides, padding, dilation)
    nph = max((kh * DH) % SH for kh in range(KH)) + 1  # phases of the input rows some tap reads
    npw = max((kw * DW) % SW for kw in range(KW)) + 1
    msh, msw = (KH - 1) * DH // SH, (KW - 1) * DW // SW  # largest shift inside a phase plane
    PH2, PW2 = OH + msh, OW + msw  # one phase plane
    P = OH * PW2  # flat output positions (PW2 - OW of every PW2 are dropped at the store)
    NT = _ceil_div(P, _FLAT_TILE)
    TP = _ceil_div(_ceil_div(P, NT), 8) * 8
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


def nested_conv2d_flat(
    fmt: NestedCSR, x_shape, kernel_size, strides, padding, dilation, groups, has_bias, dense_levels=()
):
    """Nested sparse conv2d in the *flat* layout (CPU): same params and numerics as ``nested_conv2d``.

    The input is staged (``"stage"``, plus ``"stage_tail"`` zeroing the slack) into one zero-padded
    plane per input channel and stride phase: ``xs[n, ((c * NPH + ph) * NPW + pw) * PLANE + i * PW2
    + j] = xpad[n, c, i * SH + ph, j * SW + pw]``. Tap ``(kh, kw)`` of output ``(oh, ow)`` then reads
    ``xs[.., base(c, kh, kw) + oh * PW2 + ow]``: a stride-1 access. Output positions are flattened
    as ``q = oh * PW2 + ow`` over full padded rows (the ``PW2 - OW`` extra columns are computed and
    dropped at the store), and a ``"row"`` block is one output channel x a tile of ``TP`` (a multiple
    of 8) consecutive positions, so every vector load of ``"update"`` is contiguous and full width.

    ``dense_levels``: levels that take the dense path instead (``"dense_zero"``/``"dense_scatter"``
    scatter the level's prefix into a zeroed ``[O, cols]`` workspace, then ``"dense_row"`` runs a
    dense direct conv blocked over ``DOB`` output channels x ``DTP`` positions on it); the test is a
    bit mask of the (clamped) level, a constant of the kernel. No weight is stored twice.
    """
    fmt, (N, C, H, W), (KH, KW), (SH, SW), (DH, DW), (PT, PL, PB, PR), G = _conv_args(
        fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias
    )
    if C % G or fmt.rows % G:
        raise ValueError(f"groups={G} does not divide C={C} and O={fmt.rows}")
    if fmt.cols != C // G * KH * KW:
        raise ValueError(f"fmt.cols={fmt.cols} != C/groups*KH*KW = {C // G * KH * KW}")
    return _conv_flat_func(
        fmt.rows,
        fmt.num_levels,
        int(fmt.values.shape[0]),
        max(1, int(fmt.level_len[0].max())),
        str(fmt.col.dtype),
        str(fmt.level_len.dtype),
        (N, C, H, W),
        (KH, KW),
        (SH, SW),
        (PT, PL, PB, PR),
        (DH, DW),
        G,
        has_bias,
        _dense_mask(dense_levels, fmt.num_levels),
    )


def specialize_conv(func, layout: str = "flat", dense_levels=None):
    """The same conv kernel (same params) in ``layout`` with ``dense_levels`` (None: keep them).

    Everything the factory needs is in the signature and the attrs (``nested.conv``, ``max_len``).
    """
    attrs = func.attrs
    if attrs is None or str(attrs.get(ATTR_OP, "")) != "conv2d" or ATTR_CONV not in attrs:
        raise ValueError("specialize_conv expects a nested conv2d kernel with the nested.conv attr")
    if layout != "flat":
        raise ValueError(f"specialize_conv: only the 'flat' layout is re-specialised, got {layout!r}")
    shapes = {p.name: [int(d) for d in p.ty.shape] for p in func.params}
    dtypes = {p.name: str(getattr(p.ty.dtype, "dtype", p.ty.dtype)) for p in func.params}
    KH, KW, SH, SW, PT, PL, PB, PR, DH, DW, G = (int(v) for v in attrs[ATTR_CONV])
    L, O = shapes["level_len"]
    if dense_levels is None:
        mask = int(attrs.get(ATTR_DENSE_LEVELS + "_mask", 0))
    else:
        mask = _dense_mask(dense_levels, L)
    return _conv_flat_func(
        O,
        L,
        shapes["val"][0],
        int(attrs[ATTR_MAX_LEN]),
        dtypes["col"],
        dtypes["level_len"],
        tuple(shapes["x"]),
        (KH, KW),
        (SH, SW),
        (PT, PL, PB, PR),
        (DH, DW),
        G,
        "bias" in shapes,
        mask,
    )


def dense_levels_of(func) -> list[int]:
    """Levels a kernel runs on its dense path (empty: all sparse)."""
    attrs = func.attrs
    mask = int(attrs.get(ATTR_DENSE_LEVELS + "_mask", 0)) if attrs is not None else 0
    return [lvl for lvl in range(64) if mask >> lvl & 1]


def _conv_flat_func(O, L, NNZ, MAXLEN, cdt, ldt, x_shape, ksize, strides, padding, dilation, G, has_bias, dmask):
    N, C, H, W = x_shape
    KH, KW = ksize
    SH, SW = strides
    PT, PL, PB, PR = padding
    DH, DW = dilation
    g = flat_geometry(x_shape, ksize, strides, padding, dilation)
    OH, OW, NPH, NPW, PH2, PW2 = g["OH"], g["OW"], g["NPH"], g["NPW"], g["PH2"], g["PW2"]
    P, NT, TP, PLANE, CHS, SLACK, XS = (g[k] for k in ("P", "NT", "TP", "PLANE", "CHS", "SLACK", "XS"))
    CG, OG, KHW = C // G, O // G, KH * KW
    K = CG * KHW
    DOB = next(d for d in (4, 3, 2, 1) if OG % d == 0)  # dense path: output channels per block
    DTP = 16 if TP % 16 == 0 else 8  # dense path: positions per block
    attrs = _attrs(
        "conv2d",
        None,
        TP,
        num_levels=L,
        **{
            ATTR_MAX_LEN: MAXLEN,
            ATTR_CONV: [KH, KW, SH, SW, PT, PL, PB, PR, DH, DW, G],
            ATTR_LAYOUT: "flat",
            "nested.tile_positions": TP,
            ATTR_DENSE_LEVELS + "_mask": dmask,
        },
    )

    def tap(c):  # offset of stored column c = (ci, kh, kw) inside its group's staged input
        kh = c % KHW // KW * DH
        kw = c % KW * DW
        return c // KHW * CHS + (kh % SH * NPW + kw % SW) * PLANE + kh // SH * PW2 + kw // SW

    def lvl_of(level):
        return T.max(0, T.min(level[()], L - 1))

    @T.macro
    def sparse(xs, val, col, row_ptr, level_len, bias, level, out):
        for n, o, t in T.grid(N, O, NT):
            with T.sblock("row"):
                vn, vo, vt = T.axis.remap("SSS", [n, o, t])
                acc = T.sblock_alloc_buffer((TP,), "float32", scope="local")
                for j in range(T.Cast("int32", level_len[lvl_of(level), vo])):
                    for p in range(TP):
                        with T.sblock("update"):
                            vp = T.axis.spatial(TP, p)
                            vj = T.axis.reduce(MAXLEN, j)
                            with T.init():
                                acc[vp] = T.float32(0)
                            acc[vp] = (
                                acc[vp]
                                + val[row_ptr[vo] + vj]
                                * xs[
                                    vn, vo // OG * CG * CHS + tap(T.Cast("int32", col[row_ptr[vo] + vj])) + vt * TP + vp
                                ]
                            )
                for p in range(TP):
                    with T.sblock("store"):
                        vp = T.axis.spatial(TP, p)
                        if vt * TP + vp < P and (vt * TP + vp) % PW2 < OW:
                            if has_bias:
                                out[vn, vo, (vt * TP + vp) // PW2, (vt * TP + vp) % PW2] = (
                                    T.if_then_else(level_len[lvl_of(level), vo] > T.Cast(ldt, 0), acc[vp], T.float32(0))
                                    + bias[vo]
                                )
                            else:
                                out[vn, vo, (vt * TP + vp) // PW2, (vt * TP + vp) % PW2] = T.if_then_else(
                                    level_len[lvl_of(level), vo] > T.Cast(ldt, 0), acc[vp], T.float32(0)
                                )

    @T.macro
    def dense(xs, val, col, row_ptr, level_len, bias, level, out):
        wd = T.sblock_alloc_buffer((O, K), "float32")
        for o, k in T.grid(O, K):
            with T.sblock("dense_zero"):
                vo, vk = T.axis.remap("SS", [o, k])
                wd[vo, vk] = T.float32(0)
        for o in range(O):
            for j in range(T.Cast("int32", level_len[lvl_of(level), o])):
                with T.sblock("dense_scatter"):
                    vo = T.axis.spatial(O, o)
                    vj = T.axis.opaque(MAXLEN, j)
                    T.reads(val[row_ptr[vo] + vj], col[row_ptr[vo] + vj], row_ptr[vo])
                    T.writes(wd[vo, 0:K])
                    wd[vo, T.Cast("int32", col[row_ptr[vo] + vj])] = val[row_ptr[vo] + vj]
        for n, ob, t, tp in T.grid(N, O // DOB, NT, TP // DTP):
            with T.sblock("dense_row"):
                vn, vob, vt, vtp = T.axis.remap("SSSS", [n, ob, t, tp])
                dacc = T.sblock_alloc_buffer((DOB, DTP), "float32", scope="local")
                for ci, kh, kw, u, p in T.grid(CG, KH, KW, DOB, DTP):
                    with T.sblock("dense_update"):
                        vci, vkh, vkw, vu, vp = T.axis.remap("RRRSS", [ci, kh, kw, u, p])
                        with T.init():
                            dacc[vu, vp] = T.float32(0)
                        dacc[vu, vp] = (
                            dacc[vu, vp]
                            + wd[vob * DOB + vu, vci * KHW + vkh * KW + vkw]
                            * xs[
                                vn,
                                (vob * DOB) // OG * CG * CHS
                                + vci * CHS
                                + ((vkh * DH) % SH * NPW + (vkw * DW) % SW) * PLANE
                                + (vkh * DH) // SH * PW2
                                + (vkw * DW) // SW
                                + vt * TP
                                + vtp * DTP
                                + vp,
                            ]
                        )
                for u, p in T.grid(DOB, DTP):
                    with T.sblock("dense_store"):
                        vu, vp = T.axis.remap("SS", [u, p])
                        if vt * TP + vtp * DTP + vp < P and (vt * TP + vtp * DTP + vp) % PW2 < OW:
                            if has_bias:
                                out[
                                    vn,
                                    vob * DOB + vu,
                                    (vt * TP + vtp * DTP + vp) // PW2,
                                    (vt * TP + vtp * DTP + vp) % PW2,
                                ] = dacc[vu, vp] + bias[vob * DOB + vu]
                            else:
                                out[
                                    vn,
                                    vob * DOB + vu,
                                    (vt * TP + vtp * DTP + vp) // PW2,
                                    (vt * TP + vtp * DTP + vp) % PW2,
                                ] = dacc[vu, vp]

    @T.macro
    def body(x, val, col, row_ptr, level_len, bias, level, out):
        T.func_attr(attrs)
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
            sparse(xs, val, col, row_ptr, level_len, bias, level, out)
        else:
            if (T.shift_right(dmask, lvl_of(level)) & 1) == 0:
                sparse(xs, val, col, row_ptr, level_len, bias, level, out)
            else:
                dense(xs, val, col, row_ptr, level_len, bias, level, out)

    return _conv_signature(body, (N, C, H, W), O, NNZ, cdt, L, ldt, (OH, OW), has_bias)


__all__ = [
    "ATTR_CONV",
    "ATTR_DENSE_EXTENT",
    "ATTR_DENSE_LEVELS",
    "ATTR_KERNEL",
    "ATTR_LANES",
    "ATTR_LAYOUT",
    "ATTR_MAX_LEN",
    "ATTR_NUM_LEVELS",
    "ATTR_OP",
    "conv2d_output_shape",
    "dense_levels_of",
    "flat_geometry",
    "nested_conv2d",
    "nested_conv2d_flat",
    "nested_linear",
    "specialize_conv",
    "with_lanes",
]
