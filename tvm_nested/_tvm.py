"""The few TVM names that moved between releases, kept in one place (TVM 0.27: tirx, s_tir).

When upstream renames something again, this file is the one edit.
"""

import tvm
from tvm import relax
from tvm.ir import Constant  # 0.27: relax.Constant became tvm.ir.Constant (payload: .value)
from tvm.s_tir import Schedule  # 0.27: tvm.tir.Schedule moved to tvm.s_tir
from tvm.script import tirx as T  # 0.27: tvm.script.tir became tirx

PrimFunc = tvm.tirx.PrimFunc


def const_numpy(c):
    """The NumPy payload of a Relax constant."""
    return c.value.numpy()


def tensor_type(expr):
    """The TensorType of a Relax expression (0.27 renamed struct_info to .ty)."""
    return expr.ty


def dtype_of(expr) -> str:
    """dtype string of a Relax tensor expression (0.27: TensorType.dtype is a PrimType)."""
    dt = expr.ty.dtype
    return getattr(dt, "dtype", str(dt))


def static_shape(expr) -> tuple[int, ...]:
    return tuple(int(s) for s in expr.ty.shape)


__all__ = ["tvm", "relax", "Constant", "Schedule", "T", "PrimFunc", "const_numpy", "tensor_type",
           "dtype_of", "static_shape"]
