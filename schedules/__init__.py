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
    "FORMAT_VERSION", "NestedCSR", "csr_nbytes",
    "nested_linear", "nested_conv2d", "conv2d_output_shape", "ATTR_OP", "ATTR_NUM_LEVELS",
    "nested_linear_ref", "nested_conv2d_ref", "effective_weight",
    "schedule_cpu", "CPUKnobs", "CPU_KNOBS", "apply_knobs", "default_knobs", "target_family",
    "is_nested_kernel",
]
