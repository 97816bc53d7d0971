"""Kernel specs: everything a nested kernel factory is given, as one frozen dataclass.

A spec is data: the packed operands' sizes and dtypes (``Packed``), the layer's geometry, the fused
epilogue (``Epilogue``) and the target form the schedules chose (layout and CPU knobs). A
factory turns it into a PrimFunc (``kernel(spec)``); the spec travels with the function as one JSON
attr (``nested.spec``), so passes and schedules re-specialise a kernel with
``kernel(dataclasses.replace(spec_of(func), ...))`` and never rebuild arguments from positional ints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ..contract import ATTR_SPEC
from .format import NestedCSR

ACTIVATIONS = ("none", "relu", "clip")
LAYOUTS = ("rows", "cpu")  # "rows": the reference form (CUDA schedules it); "cpu": the CPU kernels


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int_tuple(name: str, value, n: int, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * n
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {n} ints, got {value!r}") from None
    if len(items) != n:
        raise ValueError(f"{name} must have {n} entries, got {value!r}")
    return tuple(_pos_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(items))


@dataclass(frozen=True)
class Packed:
    """Sizes and dtypes of a ``NestedCSR``'s operands (values, col, row_ptr, level_len)."""

    rows: int
    cols: int
    num_levels: int
    nnz: int  # entries of values / col (>= 1: an empty format holds one dummy)
    max_len: int  # the longest row at level 0 (>= 1): the extent of the in-row reduction
    col_dtype: str
    len_dtype: str

    @classmethod
    def of(cls, fmt: NestedCSR) -> Packed:
        if not isinstance(fmt, NestedCSR):
            raise ValueError(f"fmt must be a NestedCSR, got {type(fmt).__name__}")
        return cls(
            fmt.rows,
            fmt.cols,
            fmt.num_levels,
            int(fmt.values.shape[0]),
            max(1, int(fmt.level_len[0].max())),
            str(fmt.col.dtype),
            str(fmt.level_len.dtype),
        )


@dataclass(frozen=True)
class Epilogue:
    """What is applied to each output of a nested layer before it is stored:
    ``out = act(acc + bias[o] + residual[...])`` (each term optional)."""

    bias: bool = False
    residual: bool = False  # an extra input of the output's shape (a skip connection)
    activation: str = "none"  # "none" | "relu" | "clip"
    clip: tuple[float, float] | None = None  # (lo, hi) for "clip" (relu6: (0, 6))

    def __post_init__(self):
        if not isinstance(self.bias, bool) or not isinstance(self.residual, bool):
            raise ValueError(f"Epilogue.bias and .residual must be bools, got {self.bias!r}, {self.residual!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Epilogue.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if (self.activation == "clip") != (self.clip is not None):
            raise ValueError("Epilogue.clip (lo, hi) goes with activation='clip', and only with it")
        if self.clip is not None:
            lo, hi = (float(v) for v in self.clip)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"Epilogue.clip must be finite with lo <= hi, got {self.clip!r}")
            object.__setattr__(self, "clip", (lo, hi))


@dataclass(frozen=True)
class CPUConvKnobs:
    """The structure of the CPU conv kernel (``cpu_conv2d.py``); the tuner searches them.

    Four knobs (``direct``, ``pw_align``, ``shift_copies``, ``cblocks``) also change the packed
    operands (the input offset of every non-zero, the sub-rows), so a knob choice is made before
    the weights are packed for the CPU, never by rescheduling a compiled loop nest.
    """

    vl: int = 16  # fp32 lanes of one vector register (16 AVX-512, 8 AVX2, 4 NEON)
    tile: int = 128  # accumulator lanes (output positions) per tile: a multiple of vl (8 registers)
    partial: int = 1  # interleaved partial sums over a row's non-zeros
    oc_chunk: int = 0  # output channels per parallel task; 0: from `threads`
    threads: int = 1  # threads the automatic oc_chunk plans for (the target's cores)
    cblocks: int = 1  # input-channel blocks: each output channel becomes this many sub-rows
    pw_align: int = 1  # staged row width rounded up to a multiple of this (vl: aligned rows)
    direct: str = "auto"  # 1x1 stride-1 convs read x directly: "auto" (H*W % vl == 0) | "always" | "never"
    shift_copies: bool = False  # stage one copy per kw shift so every tap load is row-aligned
    prefetch: int = 0  # software prefetch of the (sub-)row this many rows ahead (0: none)

    def __post_init__(self):
        for name in ("vl", "tile", "partial", "threads", "cblocks", "pw_align"):
            _pos_int(f"CPUConvKnobs.{name}", getattr(self, name))
        _pos_int("CPUConvKnobs.oc_chunk", self.oc_chunk, 0)
        _pos_int("CPUConvKnobs.prefetch", self.prefetch, 0)
        if self.tile % self.vl:
            raise ValueError(f"CPUConvKnobs.tile={self.tile} must be a multiple of vl={self.vl}")
        if self.direct not in ("auto", "always", "never"):
            raise ValueError(f"CPUConvKnobs.direct must be auto|always|never, got {self.direct!r}")


@dataclass(frozen=True)
class CPULinearKnobs:
    """The structure of the CPU linear kernel (``cpu_linear.py``); the tuner searches them."""

    vl: int = 16  # fp32 lanes of one vector register
    partial: int = 8  # GEMV: scalar partial sums per row (gathers); batched: vector partial sums
    tb: int = 64  # batched: batch rows per tile (the vector dimension)
    rows_per_task: int = 0  # 0: from `threads`
    threads: int = 1
    store: str = "auto"  # batched: "scatter" | "transpose" (in-register V x V) | "auto"
    prefetch: int = 0  # software prefetch of the row this many rows ahead (0: none)
    prefetch_max_len: int = 256  # ... only for prefixes shorter than this (long ones stream)

    def __post_init__(self):
        for name in ("vl", "partial", "tb", "threads", "prefetch_max_len"):
            _pos_int(f"CPULinearKnobs.{name}", getattr(self, name))
        _pos_int("CPULinearKnobs.rows_per_task", self.rows_per_task, 0)
        _pos_int("CPULinearKnobs.prefetch", self.prefetch, 0)
        if self.store not in ("auto", "scatter", "transpose"):
            raise ValueError(f"CPULinearKnobs.store must be auto|scatter|transpose, got {self.store!r}")


@dataclass(frozen=True)
class LinearSpec:
    """``out[b, m] = epilogue(sum_j values[j] * x[b, col[j]])`` over the prefix of row m at the level.

    ``layout``: "rows" (the reference form; CUDA schedules it) or "cpu" (``cpu_linear.py``, with
    ``knobs``).
    """

    packed: Packed
    batch: int
    epilogue: Epilogue = field(default_factory=Epilogue)
    layout: str = "rows"
    knobs: CPULinearKnobs | None = None

    op = "linear"

    def __post_init__(self):
        _pos_int("batch", self.batch)
        _check_layout(self, CPULinearKnobs)


@dataclass(frozen=True)
class Conv2dSpec:
    """A nested conv2d, NCHW input, OIHW weight viewed ``[O, C/groups*KH*KW]``.

    ``padding`` is ``(top, left, bottom, right)``. ``layout``: "rows" (the reference form, ``col`` =
    stored column; CUDA schedules it) or "cpu" (``cpu_conv2d.py``: the index of every non-zero is
    its input offset and ``packed.rows`` = O x ``knobs.cblocks`` sub-rows).
    """

    packed: Packed
    x_shape: tuple[int, int, int, int]
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    epilogue: Epilogue = field(default_factory=Epilogue)
    layout: str = "rows"
    knobs: CPUConvKnobs | None = None

    op = "conv2d"

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # frozen: normalise once here
        set_("x_shape", _int_tuple("x_shape", self.x_shape, 4, 1))
        set_("kernel_size", _int_tuple("kernel_size", self.kernel_size, 2, 1))
        set_("strides", _int_tuple("strides", self.strides, 2, 1))
        set_("padding", _int_tuple("padding", self.padding, 4, 0))
        set_("dilation", _int_tuple("dilation", self.dilation, 2, 1))
        _pos_int("groups", self.groups)
        _, c, _, _ = self.x_shape
        o, g = self.out_channels, self.groups
        if c % g or o % g:
            raise ValueError(f"groups={g} does not divide C={c} and O={o}")
        kh, kw = self.kernel_size
        if self.packed.cols != c // g * kh * kw:
            raise ValueError(f"fmt.cols={self.packed.cols} != C/groups*KH*KW = {c // g * kh * kw}")
        _check_layout(self, CPUConvKnobs)
        oh, ow = self.out_shape[2:]
        if oh < 1 or ow < 1:
            raise ValueError(f"the output would be empty ({oh}x{ow}): kernel larger than the padded input")

    @property
    def out_channels(self) -> int:
        return self.packed.rows // (self.knobs.cblocks if self.layout == "cpu" else 1)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.x_shape
        kh, kw = self.kernel_size
        pt, pl, pb, pr = self.padding
        (sh, sw), (dh, dw) = self.strides, self.dilation
        return (
            n,
            self.out_channels,
            (h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
            (w + pl + pr - dw * (kw - 1) - 1) // sw + 1,
        )


def _check_layout(spec, knobs_cls) -> None:
    if spec.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {spec.layout!r}")
    if (spec.layout == "cpu") != isinstance(spec.knobs, knobs_cls):
        raise ValueError(f"layout 'cpu' goes with {knobs_cls.__name__} knobs, and only it; got {spec.knobs!r}")


SPECS = {"linear": (LinearSpec, CPULinearKnobs), "conv2d": (Conv2dSpec, CPUConvKnobs)}


def to_json(spec) -> str:
    return json.dumps({"op": spec.op, **dataclasses.asdict(spec)}, sort_keys=True)


def from_json(text: str):
    raw = json.loads(text)
    cls, knobs_cls = SPECS[raw.pop("op")]
    raw["packed"] = Packed(**raw["packed"])
    raw["knobs"] = None if raw["knobs"] is None else knobs_cls(**raw["knobs"])
    epi = raw.pop("epilogue")
    raw["epilogue"] = Epilogue(**{**epi, "clip": None if epi["clip"] is None else tuple(epi["clip"])})
    return cls(**raw)


def spec_of(func):
    """The spec a nested kernel was made from (its ``nested.spec`` attr); None for other functions."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or ATTR_SPEC not in attrs:
        return None
    return from_json(str(attrs[ATTR_SPEC]))


__all__ = [
    "ACTIVATIONS",
    "LAYOUTS",
    "SPECS",
    "CPUConvKnobs",
    "CPULinearKnobs",
    "Conv2dSpec",
    "Epilogue",
    "LinearSpec",
    "Packed",
    "from_json",
    "spec_of",
    "to_json",
]
