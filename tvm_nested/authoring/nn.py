"""PyTorch helpers: nested layers in the canonical form of DESIGN section 2.

A nested layer computes with ``weight * (level_map >= level)``. The level reaches it at run time:
``NestedModel`` takes ``level`` as a 0-d integer tensor argument of ``forward`` and hands it to every
nested layer inside any container before the wrapped module runs. (A level kept in a buffer would
be frozen into a constant by ``torch.export`` and silently kill the knob.)

    model = tvm_nested.nn.nest(dense_model, {"features.0": lm0, "classifier": lm1})
    y = model(x, torch.tensor(2))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .levelmap import check_levelmap, levelmap_by_magnitude, levelmap_from_masks


class _NestedMixin:
    """Shared by NestedConv2d and NestedLinear: the level map buffer and the masked weight."""

    def _init_nested(self, level_map) -> None:
        lm = check_levelmap(np.asarray(level_map), tuple(self.weight.shape), layer=type(self).__name__)
        self.register_buffer("level_map", torch.from_numpy(lm))
        self.level = None  # set by NestedModel before every call; a plain attribute, never a buffer

    def masked_weight(self, level=None) -> torch.Tensor:
        level = self.level if level is None else level
        if level is None:
            raise RuntimeError(
                f"{type(self).__name__}: no level given; call it through tvm_nested.nn.NestedModel(model)(x, level)"
            )
        return self.weight * (self.level_map >= level).to(self.weight.dtype)


class NestedConv2d(_NestedMixin, nn.Conv2d):
    def __init__(self, *args, level_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested(np.zeros(self.weight.shape, np.int32) if level_map is None else level_map)

    def forward(self, x):
        return self._conv_forward(x, self.masked_weight(), self.bias)


class NestedLinear(_NestedMixin, nn.Linear):
    def __init__(self, *args, level_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested(np.zeros(self.weight.shape, np.int32) if level_map is None else level_map)

    def forward(self, x):
        return nn.functional.linear(x, self.masked_weight(), self.bias)


NESTED_TYPES = (NestedConv2d, NestedLinear)


def nested_from(layer: nn.Module, level_map) -> nn.Module:
    """A nested copy of a dense ``nn.Conv2d`` / ``nn.Linear`` (weights shared by value, not by reference)."""
    if isinstance(layer, nn.Conv2d):
        new = NestedConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            level_map=level_map,
        )
    elif isinstance(layer, nn.Linear):
        new = NestedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, level_map=level_map)
    else:
        raise TypeError(f"only nn.Conv2d and nn.Linear can be nested, got {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.to(layer.weight.device)


class NestedModel(nn.Module):
    """Wraps a module holding nested layers; ``forward(*inputs, level)`` carries the level to them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def nested_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, NESTED_TYPES)]

    @property
    def num_levels(self) -> int:
        tops = [int(m.level_map.max()) for _, m in self.nested_layers() if m.level_map.numel()]
        return max(tops, default=0) + 1

    def forward(self, *inputs, level):
        for _, m in self.nested_layers():
            m.level = level
        try:
            return self.module(*inputs)
        finally:
            for _, m in self.nested_layers():
                m.level = None


def nest(model: nn.Module, level_maps: Mapping[str, object], *, copy: bool = True) -> NestedModel:
    """Replace the named ``nn.Conv2d`` / ``nn.Linear`` submodules of ``model`` by nested ones.

    ``level_maps[name]`` is a level map (array of the weight's shape), a sequence of per-level boolean
    masks (level 0 densest first; refused unless nested), or a sequence of densities (magnitude
    pruning; level 0 densest first).
    """
    import copy as _copy

    model = _copy.deepcopy(model) if copy else model
    for name, spec in level_maps.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr, None)
        if layer is None:
            raise KeyError(f"{name}: no such submodule")
        setattr(parent, attr, nested_from(layer, _to_levelmap(name, layer.weight, spec)))
    return NestedModel(model)


def _to_levelmap(name: str, weight: torch.Tensor, spec) -> np.ndarray:
    w = weight.detach().cpu().numpy()
    if isinstance(spec, (torch.Tensor, np.ndarray)) and np.ndim(spec) == w.ndim:
        return check_levelmap(np.asarray(spec), w.shape, layer=name)
    if isinstance(spec, Sequence) and spec and all(np.ndim(s) == 0 for s in spec):
        return levelmap_by_magnitude(w, [float(s) for s in spec])
    masks = [np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m) for m in spec]
    return levelmap_from_masks(masks, layer=name)
