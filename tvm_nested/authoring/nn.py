"""PyTorch helpers: nested layers in the canonical form of DESIGN section 2.

A nested weight computes as ``weight * (level_map >= level)``. The level reaches it at run time:
``NestedModel`` takes ``level`` as a 0-d integer tensor argument of ``forward`` and hands it to every
nested layer inside any container before the wrapped module runs. (A level kept in a buffer would
be frozen into a constant by ``torch.export`` and silently kill the knob.)

    model = tvm_nested.nn.nest(dense_model, {"features.0": lm0, "classifier": lm1, "rnn": [0.5, 0.2]})
    y = model(x, level=torch.tensor(2))

What can be nested, and how each computes (every form exports to matmuls / convolutions whose weight
operand is the masked weight, which ``LowerNestedLayers`` turns into nested kernels):

* ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear``: their ``weight``; the name is the layer's.
* ``nn.LSTM`` / ``nn.GRU``: every ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``_reverse`` too,
  ``weight_hr_l{k}`` with ``proj_size``); the recurrence is written out step by step with one masked
  weight per matrix (the input projection of all time steps at once, the recurrent one per step),
  so the compiled module packs each matrix once. Name the layer (all its matrices) or one matrix
  (``"rnn.weight_hh_l0"``).
* ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj``; it
  always runs PyTorch's reference path (``F.multi_head_attention_forward``) with the masked weights.
* A stock ``nn.TransformerEncoderLayer`` holding nested weights loses its inference fast path
  (``torch._transformer_encoder_layer_fwd`` reads the raw weights and would skip the masks), and an
  ``nn.TransformerEncoder`` holding them its NestedTensor packing, so eager PyTorch computes what the
  compiled module computes, in eval and under ``no_grad`` too.

``ConvTranspose*`` and ``Conv3d`` have no nested kernel yet: ``nest`` refuses them by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .levelmap import check_levelmap, levelmap_by_magnitude, levelmap_from_masks

LEVEL_MAP_SUFFIX = "level_map"  # buffer of a nested weight: "level_map" for "weight", else "<param>_level_map"


def level_map_buffer(param: str) -> str:
    return LEVEL_MAP_SUFFIX if param == "weight" else f"{param}_{LEVEL_MAP_SUFFIX}"


class _NestedMixin:
    """Level maps for some of a module's weights (buffers) and the masked weights it computes with."""

    def _init_nested(self, level_maps: Mapping[str, object]) -> None:
        for param, lm in level_maps.items():
            shape = tuple(getattr(self, param).shape)
            lm = check_levelmap(np.asarray(lm), shape, layer=f"{type(self).__name__}.{param}")
            self.register_buffer(level_map_buffer(param), torch.from_numpy(lm))
        self.level = None  # set by NestedModel before every call; a plain attribute, never a buffer

    @property
    def nested_params(self) -> list[str]:
        """The names of the parameters that carry a level map."""
        out = []
        for buf in self._buffers:
            if buf == LEVEL_MAP_SUFFIX:
                out.append("weight")
            elif buf.endswith("_" + LEVEL_MAP_SUFFIX):
                out.append(buf[: -len(LEVEL_MAP_SUFFIX) - 1])
        return out

    def level_map_of(self, param: str) -> torch.Tensor:
        return getattr(self, level_map_buffer(param))

    def _level(self, level=None):
        level = self.level if level is None else level
        if level is None:
            raise RuntimeError(
                f"{type(self).__name__}: no level given; call it through tvm_nested.nn.NestedModel(model)(x, level)"
            )
        return level

    def masked(self, param: str, rows: slice | None = None, level=None) -> torch.Tensor:
        """``param * (its level map >= level)`` (the parameter itself when it has no level map);
        ``rows`` masks a block of rows (the mask of the slice, so the export keeps the canonical form)."""
        w = getattr(self, param)
        if param not in self.nested_params:
            return w if rows is None else w[rows]
        lm = self.level_map_of(param)
        if rows is not None:
            w, lm = w[rows], lm[rows]
        return w * (lm >= self._level(level)).to(w.dtype)

    def masked_weight(self, level=None) -> torch.Tensor:
        return self.masked("weight", level=level)


class NestedConv2d(_NestedMixin, nn.Conv2d):
    def __init__(self, *args, level_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested({"weight": np.zeros(self.weight.shape, np.int32) if level_map is None else level_map})

    def forward(self, x):
        return self._conv_forward(x, self.masked_weight(), self.bias)


class NestedConv1d(_NestedMixin, nn.Conv1d):
    def __init__(self, *args, level_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested({"weight": np.zeros(self.weight.shape, np.int32) if level_map is None else level_map})

    def forward(self, x):
        return self._conv_forward(x, self.masked_weight(), self.bias)


class NestedLinear(_NestedMixin, nn.Linear):
    def __init__(self, *args, level_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested({"weight": np.zeros(self.weight.shape, np.int32) if level_map is None else level_map})

    def forward(self, x):
        return F.linear(x, self.masked_weight(), self.bias)


# ------------------------------------------------------------------------------------ recurrent
class _NestedRNN(_NestedMixin):
    """The recurrence of ``nn.LSTM`` / ``nn.GRU`` written out with masked weights (PyTorch's equations).

    Per layer and direction: the input projection of every time step in one ``linear``, then one
    ``linear`` of the hidden state per step, all with the same masked matrices.
    """

    def forward(self, input, hx=None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{type(self).__name__}: PackedSequence input is not supported; pad the batch instead")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        steps = x.shape[0]
        dirs = 2 if self.bidirectional else 1
        is_lstm = self.mode == "LSTM"
        h0, c0 = self._initial_states(hx, batched)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                sfx = f"_l{layer}{'_reverse' if d else ''}"
                w_ih, w_hh = self.masked(f"weight_ih{sfx}"), self.masked(f"weight_hh{sfx}")
                w_hr = self.masked(f"weight_hr{sfx}") if is_lstm and self.proj_size > 0 else None
                b_ih = getattr(self, f"bias_ih{sfx}") if self.bias else None
                b_hh = getattr(self, f"bias_hh{sfx}") if self.bias else None
                xw = F.linear(x, w_ih, b_ih)  # (T, B, gates * H): every step's input projection at once
                # no initial state: the first step's state is zero, W_hh @ 0 is not computed
                h = None if h0 is None else h0[k]
                c = None if c0 is None else c0[k]
                ys = [None] * steps
                for t in reversed(range(steps)) if d else range(steps):
                    hw = F.linear(h, w_hh, b_hh) if h is not None else (0 if b_hh is None else b_hh)
                    if is_lstm:
                        i, f, g, o = _gates(xw[t] + hw, 4, self.hidden_size)
                        c = torch.sigmoid(i) * torch.tanh(g) + (0 if c is None else torch.sigmoid(f) * c)
                        h = torch.sigmoid(o) * torch.tanh(c)
                        if w_hr is not None:
                            h = F.linear(h, w_hr)
                    else:
                        i_r, i_z, i_n = _gates(xw[t], 3, self.hidden_size)
                        h_r, h_z, h_n_ = _gates(hw, 3, self.hidden_size) if torch.is_tensor(hw) else (0, 0, 0)
                        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                        n = torch.tanh(i_n + r * h_n_)
                        h = (1 - z) * n + (0 if h is None else z * h)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out = x.transpose(0, 1) if self.batch_first and batched else x
        h_n = torch.stack(h_n)
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
        if is_lstm:
            c_n = torch.stack(c_n)
            return out, (h_n, c_n if batched else c_n.squeeze(1))
        return out, h_n

    def _initial_states(self, hx, batched):
        """(h0, c0) with a batch dim, or (None, None) when the states start at zero."""
        if hx is None:
            return None, None
        if self.mode == "LSTM":
            h0, c0 = hx
            return (h0, c0) if batched else (h0.unsqueeze(1), c0.unsqueeze(1))
        return (hx if batched else hx.unsqueeze(1)), None


def _gates(t: torch.Tensor, n: int, size: int) -> list[torch.Tensor]:
    """``t.chunk(n, -1)`` as constant slices (an ONNX export of chunk computes its sizes from shapes)."""
    return [t[..., k * size : (k + 1) * size] for k in range(n)]


class NestedLSTM(_NestedRNN, nn.LSTM):
    def __init__(self, *args, level_maps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested(level_maps or {})


class NestedGRU(_NestedRNN, nn.GRU):
    def __init__(self, *args, level_maps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested(level_maps or {})


# ------------------------------------------------------------------------------------ attention
class NestedMultiheadAttention(_NestedMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with masked projections, always on PyTorch's reference path.

    Self-attention (``query is key is value``) projects with the whole masked ``in_proj_weight``;
    otherwise each of q, k, v uses its masked block of rows (the mask of the block, not a block of the
    masked weight, so every projection exports in the canonical form). ``out_proj`` may be a
    ``NestedLinear``.
    """

    def __init__(self, *args, level_maps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nested(level_maps or {})

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" relations through the transpose
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out_w = self.out_proj.masked_weight() if isinstance(self.out_proj, NestedLinear) else self.out_proj.weight
        e = self.embed_dim
        if not self._qkv_same_embed_dim:
            q_w, k_w, v_w = (self.masked(p) for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
            separate = True
        elif query is key and key is value:
            separate = False
        else:
            q_w, k_w, v_w = (self.masked("in_proj_weight", slice(i * e, (i + 1) * e)) for i in range(3))
            separate = True
        attn, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            None if separate else self.masked("in_proj_weight"),
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_w,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=q_w if separate else None,
            k_proj_weight=k_w if separate else None,
            v_proj_weight=v_w if separate else None,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            attn = attn.transpose(1, 0)
        return attn, weights


class NestedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` on its reference path only: its inference fast path
    (``torch._transformer_encoder_layer_fwd``) reads the raw weights and would skip the level maps."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


NESTED_TYPES = (NestedConv1d, NestedConv2d, NestedLinear, NestedLSTM, NestedGRU, NestedMultiheadAttention)
UNSUPPORTED_TYPES = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --------------------------------------------------------------------------- the nested weights
def layer_weights(layer: nn.Module) -> list[str]:
    """The parameters of ``layer`` that can be nested ([] for a layer that cannot be)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return ["weight"]
    if isinstance(layer, (nn.LSTM, nn.GRU)):
        return [n for n in layer._flat_weights_names if n.startswith("weight_")]
    if isinstance(layer, nn.MultiheadAttention):
        if layer._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return []


def weight_name(module_name: str, layer: nn.Module, param: str) -> str:
    """How a nested weight is named: the layer's name for a one-weight layer, else ``layer.param``."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) or not module_name:
        return module_name or param
    return f"{module_name}.{param}"


@dataclass(frozen=True)
class NestedWeight:
    """One nested weight of a model: its name, the module holding it and the parameter's name."""

    name: str
    module: nn.Module
    param: str

    @property
    def weight(self) -> torch.nn.Parameter:
        return getattr(self.module, self.param)

    @property
    def level_map(self) -> torch.Tensor:
        return self.module.level_map_of(self.param)


class NestedModel(nn.Module):
    """Wraps a module holding nested layers; ``forward(*inputs, level)`` carries the level to them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def nested_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, NESTED_TYPES)]

    def nested_weights(self) -> list[NestedWeight]:
        """Every weight with a level map, in definition order (a layer with several: each of them)."""
        return [NestedWeight(weight_name(n, m, p), m, p) for n, m in self.nested_layers() for p in m.nested_params]

    @property
    def num_levels(self) -> int:
        tops = [int(w.level_map.max()) for w in self.nested_weights() if w.level_map.numel()]
        return max(tops, default=0) + 1

    def forward(self, *inputs, level):
        for _, m in self.nested_layers():
            m.level = level
        try:
            return self.module(*inputs)
        finally:
            for _, m in self.nested_layers():
                m.level = None


def masked_state_dict(model: NestedModel, level: int) -> dict[str, torch.Tensor]:
    """The wrapped module's state at ``level``: every nested weight masked, no level maps. It loads
    into the dense model the nested one was made from (an independent reference for the level)."""
    names = {id(m): n for n, m in model.module.named_modules()}
    sd = {k: v for k, v in model.module.state_dict().items() if not k.endswith(LEVEL_MAP_SUFFIX)}
    for w in model.nested_weights():
        prefix = names[id(w.module)]
        key = f"{prefix}.{w.param}" if prefix else w.param
        sd[key] = (w.weight * (w.level_map >= level).to(w.weight.dtype)).detach()
    return sd


# ------------------------------------------------------------------------------------ nesting
def nested_from(layer: nn.Module, level_maps) -> nn.Module:
    """A nested copy of a dense layer (weights copied by value). ``level_maps``: ``{param: level map}``
    (a one-weight layer also takes its level map alone)."""
    if not isinstance(level_maps, Mapping):
        level_maps = {"weight": level_maps}
    if isinstance(layer, UNSUPPORTED_TYPES):
        raise TypeError(
            f"{type(layer).__name__} cannot be nested yet: tvm_nested has no nested kernel for it "
            f"(nestable: Conv1d, Conv2d, Linear, LSTM, GRU, MultiheadAttention)"
        )
    extra = set(level_maps) - set(layer_weights(layer))
    if not layer_weights(layer) or extra:
        raise TypeError(
            f"{type(layer).__name__}: cannot nest {sorted(extra) or 'it'} (nestable: Conv1d, Conv2d, Linear, "
            f"LSTM, GRU, MultiheadAttention weights; this layer's: {layer_weights(layer)})"
        )
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        cls = NestedConv2d if isinstance(layer, nn.Conv2d) else NestedConv1d
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            level_map=level_maps["weight"],
        )
    elif isinstance(layer, nn.Linear):
        new = NestedLinear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, level_map=level_maps["weight"]
        )
    elif isinstance(layer, (nn.LSTM, nn.GRU)):
        kwargs = dict(
            num_layers=layer.num_layers,
            bias=layer.bias,
            batch_first=layer.batch_first,
            dropout=layer.dropout,
            bidirectional=layer.bidirectional,
        )
        if isinstance(layer, nn.LSTM):
            kwargs["proj_size"] = layer.proj_size
        cls = NestedLSTM if isinstance(layer, nn.LSTM) else NestedGRU
        new = cls(layer.input_size, layer.hidden_size, level_maps=_merged(layer, level_maps), **kwargs)
    else:  # nn.MultiheadAttention
        new = NestedMultiheadAttention(
            layer.embed_dim,
            layer.num_heads,
            dropout=layer.dropout,
            bias=layer.in_proj_bias is not None,
            add_bias_kv=layer.bias_k is not None,
            add_zero_attn=layer.add_zero_attn,
            kdim=layer.kdim,
            vdim=layer.vdim,
            batch_first=layer.batch_first,
            level_maps=_merged(layer, level_maps),
        )
        new.out_proj = layer.out_proj  # nested or not, as it is (nest() nests it by its own name)
    new.load_state_dict(_dense_state(layer), strict=False)
    return new.to(next(layer.parameters()).device)


def _merged(layer, level_maps) -> dict:
    """The level maps a layer already has (nesting a nested layer again), updated by ``level_maps``."""
    have = {p: layer.level_map_of(p).numpy() for p in layer.nested_params} if isinstance(layer, _NestedMixin) else {}
    return {**have, **level_maps}


def _dense_state(layer) -> dict:
    return {k: v for k, v in layer.state_dict().items() if not k.endswith(LEVEL_MAP_SUFFIX)}


def _resolve(model: nn.Module, name: str) -> tuple[str, nn.Module, list[str]]:
    """``name`` -> (module name, module, the parameters it names)."""
    try:
        layer = model.get_submodule(name) if name else model
    except AttributeError:
        layer = None
    if layer is not None:
        if isinstance(layer, UNSUPPORTED_TYPES) or not layer_weights(layer):
            nested_from(layer, {})  # raises the TypeError naming the type
        return name, layer, layer_weights(layer)
    parent_name, _, param = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise KeyError(f"{name}: no such submodule or weight") from None
    if param not in layer_weights(parent):
        raise KeyError(
            f"{name}: no such submodule, and {param!r} is not a nestable weight of {type(parent).__name__} "
            f"{parent_name!r} (nestable: {layer_weights(parent)})"
        )
    return parent_name, parent, [param]


def nest(model: nn.Module, level_maps: Mapping[str, object], *, copy: bool = True) -> NestedModel:
    """Nest the named weights of ``model``; returns a ``NestedModel``.

    Keys name a layer (``"features.0"``, ``"rnn"``: every weight of an LSTM / GRU / attention) or one
    weight of a layer with several (``"rnn.weight_hh_l0"``, ``"attn.in_proj_weight"``). Values are a
    level map (array of the weight's shape), a sequence of per-level boolean masks (level 0 densest
    first; refused unless nested), or a sequence of densities (magnitude pruning; level 0 densest
    first); a layer with several weights takes densities (or masks) for all of them at once. Naming
    an attention nests its ``out_proj`` too.
    """
    model = deepcopy(model) if copy else model
    planned: dict[str, dict[str, np.ndarray]] = {}
    for name, spec in level_maps.items():
        targets = [_resolve(model, name)]
        if isinstance(targets[0][1], nn.MultiheadAttention) and targets[0][0] == name:
            targets.append(_resolve(model, f"{name}.out_proj" if name else "out_proj"))
        if sum(len(t[2]) for t in targets) > 1 and isinstance(spec, (torch.Tensor, np.ndarray)) and np.ndim(spec) > 1:
            raise ValueError(
                f"{name}: one level map for several weights; give densities or name each weight "
                f"({', '.join(weight_name(m, layer, p) for m, layer, ps in targets for p in ps)})"
            )
        for mname, layer, params in targets:
            for p in params:
                w = getattr(layer, p)
                planned.setdefault(mname, {})[p] = _to_levelmap(weight_name(mname, layer, p), w, spec)
    for mname, maps in planned.items():
        parent_name, _, attr = mname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nested_from(getattr(parent, attr), maps))
    _reference_paths(model)
    return NestedModel(model)


def _reference_paths(model: nn.Module) -> None:
    """Layers that read their children's weights directly must see the masked ones: an attention whose
    ``out_proj`` is nested computes with it; an encoder layer holding nested weights loses its fast path."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.MultiheadAttention and isinstance(m.out_proj, NestedLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nested_from(m, {}))
    for m in model.modules():
        if not any(isinstance(c, NESTED_TYPES) for c in m.modules()):
            continue
        if type(m) is nn.TransformerEncoderLayer:
            m.__class__ = NestedTransformerEncoderLayer  # same state; forward without the fast path
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # its fast path packs padded batches into NestedTensors


def _to_levelmap(name: str, weight: torch.Tensor, spec) -> np.ndarray:
    w = weight.detach().cpu().numpy()
    if isinstance(spec, (torch.Tensor, np.ndarray)) and np.ndim(spec) == w.ndim:
        return check_levelmap(np.asarray(spec), w.shape, layer=name)
    if isinstance(spec, Sequence) and spec and all(np.ndim(s) == 0 for s in spec):
        return levelmap_by_magnitude(w, [float(s) for s in spec])
    masks = [np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m) for m in spec]
    return levelmap_from_masks(masks, layer=name)
