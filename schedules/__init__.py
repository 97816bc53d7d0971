"""Nested sparse formats, TensorIR kernel factories and per-target schedule rules.

Installed as ``tvm_nested.schedules``. Data (``format``, ``spec``), compute definitions (one module
per operator: ``linear``, ``conv2d``, ``conv2d_flat``; ``kernel`` dispatches on a spec), NumPy
references (``reference``) and schedules per target family (``cpu``, ``cpu_dense``, ``cuda``,
``space``) live in separate modules; this file only re-exports them.
"""

from .cpu import CPU_KNOBS, CPUKnobs, apply_knobs, default_knobs, schedule_cpu, target_family
from .format import NestedCSR, csr_nbytes
from .kernel import is_nested_kernel, kernel
from .reference import effective_weight, nested_conv2d_ref, nested_linear_ref
from .spec import Conv2dSpec, Epilogue, LinearSpec, Packed, spec_of

__all__ = [
    "CPU_KNOBS",
    "CPUKnobs",
    "Conv2dSpec",
    "Epilogue",
    "LinearSpec",
    "NestedCSR",
    "Packed",
    "apply_knobs",
    "csr_nbytes",
    "default_knobs",
    "effective_weight",
    "is_nested_kernel",
    "kernel",
    "nested_conv2d_ref",
    "nested_linear_ref",
    "schedule_cpu",
    "spec_of",
    "target_family",
]
