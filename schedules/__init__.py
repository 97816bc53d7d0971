"""Nested sparse formats, TensorIR kernel factories and per-target schedule rules.

Installed as ``tvm_nested.schedules``. Data (``format``, ``spec``, ``knob_table``), compute
definitions (one module per operator and form: ``linear`` / ``conv2d`` (the reference "rows" form),
``cpu_linear`` / ``cpu_conv2d`` (the CPU kernels); ``kernel`` dispatches on a spec), NumPy
references (``reference``) and rules per target family (``cpu``, ``cpu_dense``, ``cuda``) live in
separate modules; this file only re-exports them.
"""

from .cpu import VECTOR_LANES, default_knobs, knob_space, schedule_cpu, specialize, target_family
from .format import NestedCSR, csr_nbytes
from .kernel import is_nested_kernel, kernel
from .reference import effective_weight, nested_conv2d_ref, nested_linear_ref
from .spec import Conv2dSpec, CPUConvKnobs, CPULinearKnobs, Epilogue, LinearSpec, Packed, spec_of

__all__ = [
    "VECTOR_LANES",
    "CPUConvKnobs",
    "CPULinearKnobs",
    "Conv2dSpec",
    "Epilogue",
    "LinearSpec",
    "NestedCSR",
    "Packed",
    "csr_nbytes",
    "default_knobs",
    "effective_weight",
    "is_nested_kernel",
    "kernel",
    "knob_space",
    "nested_conv2d_ref",
    "nested_linear_ref",
    "schedule_cpu",
    "spec_of",
    "specialize",
    "target_family",
]
