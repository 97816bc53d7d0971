"""Nested pruning: level maps for a whole model from per-level density targets.

One *ranking* per layer serves every level, so nesting holds by construction: level ``l`` keeps the
top ``densities[l]`` of the ranking, level ``l + 1`` a prefix of that. The ranking is by weight
magnitude, in the shapes the fast kernels like:

* ``block=b`` (1, 4, 8): units of ``b`` consecutive output channels x 1 input column of the 2-D view
  (rows = output channels, cols = the rest, as in ``schedules/format.py``), scored by their L2 norm;
  ``block=1`` is plain unstructured magnitude pruning.
* ``balanced=True``: every (block-)row keeps the same number of units at each level.
* ``scope="global"``: one threshold across layers picks how many units each layer keeps; the layer's
  own structure (blocks, balance) then places them.
* ``first_last``: the first and last prunable layers keep at least this density at every level
  (``1.0`` = dense); in the global scope their weights count against the budget.

Masks made elsewhere are converted too: per-level boolean masks (:func:`levelmaps_from_masks`) and
``torch.nn.utils.prune`` masks, one pruned model per level (:func:`levelmaps_from_prune`). Masks that
are not nested are refused, naming the layer and the level (``levelmap.NestingError``).

    maps = nested_levelmaps(weights_of(model), PruningConfig((0.5, 0.25, 0.13, 0.05), scope="global"))
    nested = tvm_nested.nn.nest(model, maps)
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .levelmap import NestingError, check_levelmap, levelmap_from_masks
from .nn import NESTED_TYPES, UNSUPPORTED_TYPES, NestedModel, layer_weights, nest, weight_name

SCOPES = ("layer", "global")


@dataclass(frozen=True)
class PruningConfig:
    """How to turn per-level density targets into level maps (level 0 densest first)."""

    densities: tuple[float, ...] = (0.5, 0.25, 0.13, 0.05)
    scope: str = "layer"  # "layer": every layer hits the targets; "global": one threshold across layers
    block: int = 1  # rows (output channels) per unit; units are block x 1
    balanced: bool = False  # every (block-)row keeps the same count at each level
    first_last: float | None = None  # min density of the first and last layer at every level (1.0: dense)

    def __post_init__(self):
        object.__setattr__(self, "densities", tuple(float(d) for d in self.densities))
        check_densities(self.densities)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if int(self.block) != self.block or self.block < 1:
            raise ValueError(f"block must be a positive integer, got {self.block!r}")
        if self.first_last is not None and not 0.0 <= self.first_last <= 1.0:
            raise ValueError(f"first_last must be None or a density in [0, 1], got {self.first_last!r}")

    @property
    def num_levels(self) -> int:
        return len(self.densities)


def check_densities(densities: Sequence[float], layer: str = "densities") -> list[float]:
    d = [float(x) for x in densities]
    if not d or any(not 0.0 <= x <= 1.0 for x in d):
        raise NestingError(f"{layer}: densities must be in [0, 1], got {d}")
    if any(b > a for a, b in itertools.pairwise(d)):
        raise NestingError(f"{layer}: densities must be non-increasing (level 0 densest), got {d}")
    return d


# --------------------------------------------------------------------------- one layer


def _unit_scores(weight: np.ndarray, block: int, layer: str, previous: np.ndarray | None) -> np.ndarray:
    """L2 norm of every ``block x 1`` unit of the 2-D view; units pruned in ``previous`` score -1."""
    w2 = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
    rows, cols = w2.shape
    if rows % block:
        raise ValueError(f"{layer}: {rows} output channels are not a multiple of block={block}")
    scores = np.sqrt((w2.reshape(rows // block, block, cols) ** 2).sum(axis=1))
    if previous is not None:
        alive = (np.asarray(previous).reshape(rows // block, block, cols) >= 0).any(axis=1)
        scores = np.where(alive, scores, -1.0)
    return scores


def _assign(scores: np.ndarray, counts: Sequence[int], balanced: bool) -> np.ndarray:
    """Level map over units: level l keeps the top ``counts[l]`` units (per row when balanced)."""
    lm = np.full(scores.shape, -1, dtype=np.int32)
    if balanced:
        order = np.argsort(-scores, axis=1, kind="stable")
        for lvl, c in enumerate(counts):
            np.put_along_axis(lm, order[:, :c], lvl, axis=1)
    else:
        order = np.argsort(-scores.ravel(), kind="stable")
        flat = lm.reshape(-1)
        for lvl, c in enumerate(counts):
            flat[order[:c]] = lvl
    return lm


def _expand(lm_units: np.ndarray, block: int, shape: Sequence[int]) -> np.ndarray:
    return np.repeat(lm_units, block, axis=0).reshape(shape)


def _unit_counts(densities: Sequence[float], n_units: int) -> list[int]:
    return [round(d * n_units) for d in densities]


def levelmap_structured(
    weight,
    densities: Sequence[float],
    *,
    block: int = 1,
    balanced: bool = False,
    previous: np.ndarray | None = None,
    layer: str = "layer",
) -> np.ndarray:
    """Level map of one weight: level ``l`` keeps ``densities[l]`` of it, largest units first.

    ``previous`` (a level map of the same shape): units it prunes everywhere rank last, so a
    progressive schedule does not revive them while live ones remain.
    """
    w = _as_numpy(weight)
    d = check_densities(densities, layer)
    scores = _unit_scores(w, block, layer, previous)
    per = scores.shape[1] if balanced else scores.size
    return _expand(_assign(scores, _unit_counts(d, per), balanced), block, w.shape)


# --------------------------------------------------------------------------- a whole model


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with weights that can be nested (Conv1d/2d, Linear, LSTM, GRU, MultiheadAttention; nested
    ones included), in definition order."""
    root = model.module if isinstance(model, NestedModel) else model
    return [(n, m) for n, m in root.named_modules() if layer_weights(m)]


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(weight name, layer, parameter)`` of every weight that can be nested, in definition order: a
    one-weight layer's weight is named like the layer, the others ``layer.param`` (``rnn.weight_hh_l0``)."""
    return [(weight_name(n, m, p), m, p) for n, m in prunable_layers(model) for p in layer_weights(m)]


def weights_of(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{weight name: weight as NumPy}`` for the prunable weights (or the ones named)."""
    weights = {n: getattr(m, p) for n, m, p in prunable_weights(model)}
    names = list(weights) if names is None else list(names)
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"not a prunable weight of the model: {missing} (prunable: {list(weights)[:12]})")
    return {n: weights[n].detach().cpu().numpy() for n in names}


def nested_levelmaps(
    weights: Mapping[str, object],
    config: PruningConfig,
    *,
    densities: Sequence[float] | None = None,
    previous: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Level maps for every layer of ``weights`` (ordered: the first and last are "first" and "last").

    ``densities`` overrides ``config.densities`` (a progressive schedule passes its current ones).
    """
    d = check_densities(config.densities if densities is None else densities)
    ws = {n: _as_numpy(w) for n, w in weights.items()}
    names = list(ws)
    prev = dict(previous or {})
    fixed = set()
    if config.first_last is not None and names:
        fixed = {names[0], names[-1]}
    fixed_d = [max(x, config.first_last) for x in d] if fixed else d

    def structured(name, dens):
        if all(x >= 1.0 for x in dens):  # dense at every level: no block constraint needed
            return np.full(ws[name].shape, len(d) - 1, dtype=np.int32)
        return levelmap_structured(
            ws[name], dens, block=config.block, balanced=config.balanced, previous=prev.get(name), layer=name
        )

    out = {}
    for name in fixed:
        out[name] = structured(name, fixed_d)
    free = [n for n in names if n not in fixed]
    if config.scope == "layer":
        for name in free:
            out[name] = structured(name, d)
    elif free:
        out.update(_global(ws, free, d, config, prev, sum(ws[n].size for n in names), out))
    return {n: out[n] for n in names}


def _global(ws, free, d, config, prev, total, fixed_maps) -> dict[str, np.ndarray]:
    """One threshold across ``free`` layers: the top units over all of them, the budget net of fixed layers."""
    b = config.block
    scores = {n: _unit_scores(ws[n], b, n, prev.get(n)) for n in free}
    flat = np.concatenate([scores[n].ravel() for n in free])
    owner = np.concatenate([np.full(scores[n].size, i) for i, n in enumerate(free)])
    order = np.argsort(-flat, kind="stable")
    counts = {n: [] for n in free}
    for lvl, dens in enumerate(d):
        kept_fixed = sum(int((lm >= lvl).sum()) for lm in fixed_maps.values())
        budget = round(dens * total) - kept_fixed
        if budget < 0:
            raise ValueError(
                f"level {lvl}: density {dens} of all weights is below what the first/last layers keep "
                f"alone ({kept_fixed} of {total}); lower first_last or raise the density"
            )
        top = owner[order[: min(budget // b, flat.size)]]
        per_layer = np.bincount(top, minlength=len(free))
        for i, n in enumerate(free):
            counts[n].append(int(per_layer[i]))
    out = {}
    for n in free:
        if config.balanced:  # the layer's global share, spread evenly over its rows
            rows, _cols = scores[n].shape
            per_row = [round(c / rows) for c in counts[n]]
            lm_units = _assign(scores[n], per_row, True)
        else:
            lm_units = _assign(scores[n], counts[n], False)
        out[n] = _expand(lm_units, b, ws[n].shape)
    return out


def prune_model(model: nn.Module, config: PruningConfig, *, layers: Sequence[str] | None = None) -> NestedModel:
    """A nested copy of a dense model: every prunable weight (``prunable_weights``; or the ones named in
    ``layers``) gets a level map. Layers no nested kernel serves yet (Conv3d, ConvTranspose) stay dense,
    with a warning naming them."""
    dense = [n for n, m in model.named_modules() if isinstance(m, UNSUPPORTED_TYPES)]
    if dense and layers is None:
        warnings.warn(
            f"prune_model: {', '.join(dense)} stay dense (no nested kernel for "
            f"{', '.join(sorted({type(model.get_submodule(n)).__name__ for n in dense}))} yet)",
            stacklevel=2,
        )
    return nest(model, nested_levelmaps(weights_of(model, layers), config))


def update_levelmaps_(
    model: NestedModel, config: PruningConfig, densities: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Recompute the level maps of a nested model in place from its current weights.

    Units already pruned everywhere rank last (progressive pruning does not revive them); weights
    pruned everywhere are zeroed. Returns the new maps.
    """
    weights = {w.name: w for w in model.nested_weights()}
    ws = {n: w.weight.detach().cpu().numpy() for n, w in weights.items()}
    prev = {n: w.level_map.cpu().numpy() for n, w in weights.items()}
    maps = nested_levelmaps(ws, config, densities=densities, previous=prev)
    with torch.no_grad():
        for n, w in weights.items():
            w.level_map.copy_(torch.from_numpy(maps[n]))
            w.weight.mul_((w.level_map >= 0).to(w.weight.dtype))
    return maps


# --------------------------------------------------------------------------- masks made elsewhere


def levelmaps_from_masks(masks: Mapping[str, Sequence[object]]) -> dict[str, np.ndarray]:
    """``{layer: [mask level 0, mask level 1, ...]}`` (booleans, densest first) to level maps."""
    return {n: levelmap_from_masks([_as_numpy(m) for m in ms], layer=n) for n, ms in masks.items()}


def prune_masks(module: nn.Module) -> dict[str, np.ndarray]:
    """``{layer: weight_mask}`` of every layer pruned with ``torch.nn.utils.prune``."""
    return {
        n: m.weight_mask.detach().cpu().numpy().astype(bool)
        for n, m in module.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and hasattr(m, "weight_mask") and hasattr(m, "weight_orig")
    }


def levelmaps_from_prune(models: Sequence[nn.Module]) -> dict[str, np.ndarray]:
    """One model per level (densest first), pruned with ``torch.nn.utils.prune``, to level maps.

    A layer pruned in some levels only is dense (all ones) in the others. Refuses masks that are
    not nested, naming the layer and the level.
    """
    if not models:
        raise NestingError("no models given")
    per_level = [prune_masks(m) for m in models]
    names = [n for n, _ in prunable_layers(models[0]) if any(n in pl for pl in per_level)]
    if not names:
        raise NestingError("no layer carries a torch.nn.utils.prune mask (weight_mask)")
    mods = dict(models[0].named_modules())
    shapes = {n: tuple(_effective_orig(mods[n]).shape) for n in names}
    masks = {n: [pl.get(n, np.ones(shapes[n], bool)) for pl in per_level] for n in names}
    return levelmaps_from_masks(masks)


def nest_pruned(models: Sequence[nn.Module]) -> NestedModel:
    """Nested model from per-level ``torch.nn.utils.prune`` models sharing one weight.

    The weight is level 0's ``weight_orig`` (its unpruned weight); the other levels must agree with
    it wherever they keep a weight (one copy of the weights serves every level).
    """
    maps = levelmaps_from_prune(models)
    base = copy_pruned(models[0])
    layers = dict(base.named_modules())
    for lvl, m in enumerate(models[1:], start=1):
        mods = dict(m.named_modules())
        for n in maps:
            w0 = _effective_orig(layers[n]).detach().cpu().numpy()
            wl = _effective_orig(mods[n]).detach().cpu().numpy()
            keep = maps[n] >= lvl
            if not np.allclose(w0[keep], wl[keep]):
                raise NestingError(f"{n}: level {lvl} keeps weights whose values differ from level 0's")
    for n in maps:
        if hasattr(layers[n], "weight_orig"):
            torch.nn.utils.prune.remove(layers[n], "weight")  # weight := weight_orig * mask (level 0)
    # weights that only sparser levels keep are impossible (refused above); zero the pruned ones
    return nest(base, {n: check_levelmap(lm, layers[n].weight.shape, n) for n, lm in maps.items()}, copy=False)


def copy_pruned(module: nn.Module) -> nn.Module:
    """deepcopy of a module pruned by ``torch.nn.utils.prune`` (its computed ``weight`` is no leaf)."""
    import copy

    memo = {}
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and hasattr(m, "weight_orig"):
            memo[id(w)] = w.detach().clone()
    return copy.deepcopy(module, memo)


def _effective_orig(layer: nn.Module) -> torch.Tensor:
    return layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight


# --------------------------------------------------------------------------- what a level costs


def level_stats(model: NestedModel, *example_inputs) -> list[dict]:
    """Per level: fraction of the prunable weights kept and of their multiply-adds done.

    Multiply-adds are counted for every prunable weight (nested or not) over one forward pass of
    ``example_inputs``: uses x non-zero weights, a use being an output position of a conv, a row of a
    linear, a time step x batch row of a recurrent matrix, a query token of an attention projection
    (exact for self-attention).
    """
    weights = prunable_weights(model)
    uses = {}
    modules = {id(m): m for _, m, _ in weights}
    hooks = [
        m.register_forward_hook(lambda mod, i, o: uses.__setitem__(id(mod), _uses_per_weight(mod, i, o)))
        for m in modules.values()
    ]
    try:
        with torch.no_grad():
            model(*example_inputs, level=torch.tensor(0))
    finally:
        for h in hooks:
            h.remove()
    numel = {n: getattr(m, p).numel() for n, m, p in weights}
    dense_w = sum(numel.values())
    dense_f = sum(uses.get(id(m), 0) * numel[n] for n, m, _ in weights)
    out = []
    for lvl in range(model.num_levels):
        kept = {n: _kept(m, p, lvl) for n, m, p in weights}
        out.append(
            {
                "level": lvl,
                "weights": sum(kept.values()) / dense_w,
                "flops": sum(uses.get(id(m), 0) * kept[n] for n, m, _ in weights) / dense_f,
                "layers": {n: kept[n] / numel[n] for n in kept},
            }
        )
    return out


def _uses_per_weight(mod: nn.Module, inputs, out) -> int:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return int(out.shape[0] * np.prod(out.shape[2:]))
    if isinstance(mod, nn.Linear):
        return int(np.prod(out.shape[:-1]))
    x = inputs[0]  # recurrent: (T, B, I) or (T, I); attention: the query
    return int(x.numel() // x.shape[-1])


def _kept(m: nn.Module, param: str, lvl: int) -> int:
    if isinstance(m, NESTED_TYPES) and param in m.nested_params:
        return int((m.level_map_of(param) >= lvl).sum())
    return getattr(m, param).numel()


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
