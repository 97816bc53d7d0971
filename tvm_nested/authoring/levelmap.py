"""Level maps: the one description of a nested sparse layer (DESIGN section 1).

``LM[i] = k >= 0``: weight i is kept in levels 0..k; ``LM[i] = -1``: pruned at every level.
At level ``l`` the effective weight is ``W * (LM >= l)``. Level 0 is the densest.
Everything here is NumPy only, shared by the PyTorch helper, the ONNX helper and the passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..schedules.format import check_level_values


class NestingError(ValueError):
    """Masks or level maps that do not describe a nested sparse layer."""


def levelmap_from_masks(masks: Sequence[np.ndarray], layer: str = "layer") -> np.ndarray:
    """Turn per-level keep-masks (level 0 densest first) into a level map.

    Refuses masks that are not nested, naming ``layer`` and the first offending level.
    """
    if len(masks) == 0:
        raise NestingError(f"{layer}: no masks given")
    ms = [np.asarray(m).astype(bool) for m in masks]
    for lvl, m in enumerate(ms):
        if m.shape != ms[0].shape:
            raise NestingError(f"{layer}: mask of level {lvl} has shape {m.shape}, level 0 has {ms[0].shape}")
    for lvl in range(1, len(ms)):
        extra = ms[lvl] & ~ms[lvl - 1]
        if extra.any():
            idx = tuple(int(i) for i in np.argwhere(extra)[0])
            raise NestingError(
                f"{layer}: masks are not nested: level {lvl} keeps weight {idx} that level {lvl - 1} prunes "
                f"(every level's non-zeros must be a subset of the level before it)"
            )
    lm = np.full(ms[0].shape, -1, dtype=np.int32)
    for lvl, m in enumerate(ms):
        lm[m] = lvl
    return lm


def masks_from_levelmap(level_map: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Per-level boolean keep-masks, level 0 first."""
    lm = np.asarray(level_map)
    return [lm >= lvl for lvl in range(num_levels)]


def check_levelmap(level_map: np.ndarray, weight_shape: Sequence[int], layer: str = "layer") -> np.ndarray:
    """Validate a level map against its weight; returns it as int32.

    The values are checked in the map's own dtype before the cast (``schedules.format.check_level_values``):
    an int64 map holding 2**32 is refused, naming ``layer``, instead of silently becoming level 0."""
    lm = np.asarray(level_map)
    try:
        check_level_values(lm, layer)
    except ValueError as err:
        raise NestingError(str(err)) from None
    if tuple(lm.shape) != tuple(int(s) for s in weight_shape):
        raise NestingError(
            f"{layer}: level map shape {tuple(lm.shape)} differs from weight shape {tuple(weight_shape)}"
        )
    return lm.astype(np.int32)


def num_levels_of(level_maps: Sequence[np.ndarray]) -> int:
    """L = 1 + the largest value in any level map (at least 1)."""
    top = max((int(np.max(lm)) for lm in level_maps if np.size(lm)), default=0)
    return max(top, 0) + 1


def densities(level_map: np.ndarray, num_levels: int) -> list[float]:
    """Fraction of weights kept at each level."""
    lm = np.asarray(level_map)
    n = max(lm.size, 1)
    return [float((lm >= lvl).sum()) / n for lvl in range(num_levels)]


def levelmap_by_magnitude(weight: np.ndarray, level_densities: Sequence[float]) -> np.ndarray:
    """Level map keeping the largest-magnitude weights: level l keeps ``level_densities[l]`` of them.

    Densities must be non-increasing (level 0 densest). Ties are broken by position, so the result
    is deterministic; nesting holds by construction (one ranking serves every level).
    """
    d = [float(x) for x in level_densities]
    if not d or any(not 0.0 <= x <= 1.0 for x in d):
        raise NestingError(f"densities must be in [0, 1], got {d}")
    if any(b > a for a, b in itertools.pairwise(d)):
        raise NestingError(f"densities must be non-increasing (level 0 densest), got {d}")
    # float32 magnitudes: the weights are float32 anyway. One O(n) selection per level instead of a
    # full sort: a 100M-weight FC layer nests in seconds.
    w = np.abs(np.asarray(weight, dtype=np.float32)).ravel()
    lm = np.full(w.size, -1, dtype=np.int32)
    for lvl, dens in enumerate(d):
        lm[_top_k(w, round(dens * w.size))] = lvl
    return lm.reshape(np.shape(weight))


def _top_k(a: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest entries, ties broken by position (exactly a stable sort's first k).

    Nested in k: the threshold only rises with smaller k and ties are taken lowest position first.
    """
    mask = np.zeros(a.size, dtype=bool)
    if k <= 0:
        return mask
    if k >= a.size:
        mask[:] = True
        return mask
    thr = np.partition(a, a.size - k)[a.size - k]
    mask = a > thr
    mask[np.flatnonzero(a == thr)[: k - int(mask.sum())]] = True
    return mask
