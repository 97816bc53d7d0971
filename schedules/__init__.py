"""Nested sparse formats, TensorIR kernel factories and per-target schedule rules.

Installed as ``tvm_nested.schedules``. Data (``format``), compute definitions (``kernels``), NumPy
references (``reference``) and schedules per target family (``cpu``) live in separate modules;
this file only re-exports them.
"""

from .cpu import (
    CPU_KNOBS,
    CPUKnobs,
    apply_knobs,
    default_knobs,
    is_nested_kernel,
    schedule_cpu,
    target_family,
)
from .format import FORMAT_VERSION, NestedCSR, csr_nbytes
from .kernels import ATTR_NUM_LEVELS, ATTR_OP, conv2d_output_shape, nested_conv2d, nested_linear
from .reference import effective_weight, nested_conv2d_ref, nested_linear_ref

__all__ = [
    "ATTR_NUM_LEVELS",
    "ATTR_OP",
    "CPU_KNOBS",
    "FORMAT_VERSION",
    "CPUKnobs",
    "NestedCSR",
    "apply_knobs",
    "conv2d_output_shape",
    "csr_nbytes",
    "default_knobs",
    "effective_weight",
    "is_nested_kernel",
    "nested_conv2d",
    "nested_conv2d_ref",
    "nested_linear",
    "nested_linear_ref",
    "schedule_cpu",
    "target_family",
]
