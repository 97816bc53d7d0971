"""NumPy references for the nested kernels.

They compute from the DENSE effective weight ``W * (LM >= level)`` (float64 accumulation), an
independent route from the packed arrays the kernels read. Passing a ``NestedCSR`` instead of
``(W, LM)`` is accepted for convenience; it goes through ``fmt.unpack(level)`` and so is not
independent of the format.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .format import NestedCSR


def effective_weight(weight, level_map, level: int) -> np.ndarray:
    """``W * (LM >= level)`` in float64, in W's shape."""
    w = np.asarray(weight, dtype=np.float64)
    lm = np.asarray(level_map)
    if w.shape != lm.shape:
        raise ValueError(f"weight shape {w.shape} differs from level map shape {lm.shape}")
    return w * (lm >= level)


def _dense(fmt_or_pair, level: int) -> np.ndarray:
    if isinstance(fmt_or_pair, NestedCSR):
        return fmt_or_pair.unpack(level).astype(np.float64)
    weight, level_map = fmt_or_pair
    return effective_weight(weight, level_map, level)


def nested_linear_ref(x, fmt_or_pair, level: int, bias=None) -> np.ndarray:
    """``x @ W_eff.T (+ bias)``; ``x[batch, cols]``, ``W[rows, cols]``. Returns float32."""
    w = _dense(fmt_or_pair, level)
    out = np.asarray(x, np.float64) @ w.reshape(w.shape[0], -1).T
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[None, :]
    return out.astype(np.float32)


def nested_conv2d_ref(
    x,
    fmt_or_pair,
    level: int,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias=None,
) -> np.ndarray:
    """Direct conv2d (NCHW, OIHW) of ``x`` with ``W_eff``; ``padding = (top, left, bottom, right)``.

    The weight may be given 4-D (OIHW) or in its 2-D view ``[O, C/groups*KH*KW]``.
    Computed window by window with einsum over the padded input. Returns float32.
    """
    x = np.asarray(x, np.float64)
    n, c, h, w_ = x.shape
    kh, kw = kernel_size
    sh, sw = strides
    dh, dw = dilation
    pt, pl, pb, pr = padding
    wt = _dense(fmt_or_pair, level)
    o = wt.shape[0]
    cg, og = c // groups, o // groups
    wt = wt.reshape(o, cg, kh, kw)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w_ + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    for g in range(groups):
        xg = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                win = xg[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", win, wt[g * og : (g + 1) * og, :, i, j])
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out.astype(np.float32)


def apply_epilogue(out, epilogue, residual=None) -> np.ndarray:
    """``act(out + residual)`` as a kernel's ``Epilogue`` says (its bias is in the references)."""
    out = np.asarray(out, np.float64)
    if epilogue.residual:
        out = out + np.asarray(residual, np.float64)
    if epilogue.activation == "relu":
        out = np.maximum(out, 0)
    elif epilogue.activation == "clip":
        out = np.clip(out, *epilogue.clip)
    return out.astype(np.float32)


__all__ = ["apply_epilogue", "effective_weight", "nested_conv2d_ref", "nested_linear_ref"]
