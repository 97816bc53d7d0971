"""Nest a dense ``torch.export`` program: every conv1d / conv2d / linear with a parameter weight computes
with ``weight * (level_map >= level)``, ``level`` a new last input (``tvm-nested nest model.pt2``).
Weight-bearing ops without a nested form here (``lstm``, ``gru``, ``conv3d``, transposed convolutions)
stay dense with a warning naming them: nest those models in PyTorch (``tvm_nested.nn.nest``).

``torch.export`` is chosen over TorchScript because it is what ``tvm_nested.from_torch`` consumes
(Relax's ``from_exported_program``), it loads without the user's Python classes, and TorchScript is
deprecated upstream. The program is re-exported at the example shapes recorded in it (dynamic
dimensions are not kept).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx
from torch.utils import _pytree

from ..contract import LEVEL
from .pruning import PruningConfig, nested_levelmaps


def nest_exported(ep: torch.export.ExportedProgram, config: PruningConfig) -> torch.export.ExportedProgram:
    """A nested copy of a dense ``torch.export`` program: every ``conv1d`` / ``conv2d`` / ``linear`` whose weight
    is a parameter computes with ``weight * (level_map >= level)``; ``level`` is a new last input."""
    gm = ep.module()
    g = gm.graph
    layer_ops = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    uses = [n for n in g.nodes if n.op == "call_function" and n.target in layer_ops and n.args[1].op == "get_attr"]
    dense = sorted({str(n.target) for n in g.nodes if n.op == "call_function" and _dense_only(n.target)})
    if dense:
        warnings.warn(
            f"nest_exported: {', '.join(dense)} keep dense weights (no nested form for them in an exported "
            "program; nest the PyTorch model with tvm_nested.nn.nest instead)",
            stacklevel=2,
        )
    if not uses:
        raise ValueError("no conv1d/conv2d/linear with a parameter weight found in the exported program")
    weights = {}
    for n in uses:
        weights[n.args[1].target.rpartition(".")[0] or n.args[1].target] = gm.get_parameter(n.args[1].target)
    maps = nested_levelmaps(weights, config)

    for n in list(g.nodes):  # export-time input guards refer to the old signature
        if n.op == "call_module" and n.target == "_guards_fn":
            g.erase_node(n)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    examples = [_example_of(p) for p in placeholders]
    with g.inserting_after(placeholders[-1]):
        level = g.placeholder(LEVEL)
    for n in uses:
        w = n.args[1]
        layer = w.target.rpartition(".")[0] or w.target
        owner = gm.get_submodule(w.target.rpartition(".")[0]) if "." in w.target else gm
        buf = w.target.rpartition(".")[2] + "_level_map"
        owner.register_buffer(buf, torch.from_numpy(maps[layer]))
        with g.inserting_before(n):
            lm = g.get_attr(w.target.rpartition(".")[0] + "." + buf if "." in w.target else buf)
            keep = g.call_function(torch.ops.aten.ge.Tensor, (lm, level))
            mask = g.call_function(
                torch.ops.aten._to_copy.default, (keep,), {"dtype": w.meta.get("val", torch.empty(0)).dtype}
            )
            w_eff = g.call_function(torch.ops.aten.mul.Tensor, (w, mask))
        n.replace_input_with(w, w_eff)
    g._codegen = torch.fx.graph.CodeGen()  # plain positional signature: (*inputs, level)
    g.lint()
    plain = _OutputsAsBefore(torch.fx.GraphModule(gm, g), ep.call_spec.out_spec)  # no input-spec hooks
    return torch.export.export(plain, tuple(examples), {LEVEL: torch.tensor(0, dtype=torch.int64)})


def _dense_only(target) -> bool:
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0] in ("lstm", "gru", "rnn_tanh", "rnn_relu", "conv3d") or name.startswith("conv_transpose")


class _OutputsAsBefore(torch.nn.Module):
    """The rewritten graph returns its flat outputs; give them the original program's structure."""

    def __init__(self, gm, out_spec):
        super().__init__()
        self.gm, self.out_spec = gm, out_spec

    def forward(self, *inputs, level):
        return _pytree.tree_unflatten(list(self.gm(*inputs, level)), self.out_spec)


def _example_of(node) -> torch.Tensor:
    val = node.meta.get("val")
    if val is None:
        raise ValueError(f"input {node.name} has no recorded example shape")
    return torch.zeros([int(s) for s in val.shape], dtype=val.dtype)


__all__ = ["nest_exported"]
