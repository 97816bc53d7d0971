"""Nested kernel specs (and kernels) from a packed format and layer arguments, as the tests write them."""

from __future__ import annotations

from tvm_nested.schedules import Conv2dSpec, Epilogue, LinearSpec, Packed, kernel


def linear_spec(fmt, batch, has_bias=False, **epilogue) -> LinearSpec:
    return LinearSpec(Packed.of(fmt), batch, Epilogue(bias=has_bias, **epilogue))


def conv2d_spec(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias=False, **epilogue):
    if len(padding) == 2:  # (top/bottom, left/right)
        padding = (padding[0], padding[1], padding[0], padding[1])
    return Conv2dSpec(
        Packed.of(fmt), x_shape, kernel_size, strides, padding, dilation, groups, Epilogue(bias=has_bias, **epilogue)
    )


def nested_linear(fmt, batch, has_bias=False, **epilogue):
    return kernel(linear_spec(fmt, batch, has_bias, **epilogue))


def nested_conv2d(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias=False, **epilogue):
    return kernel(conv2d_spec(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias, **epilogue))
