"""Nested kernels from a packed format and layer arguments, the way the tests write them."""

from __future__ import annotations

from tvm_nested.schedules import Conv2dSpec, Epilogue, LinearSpec, Packed, kernel, spec_of


def linear_spec(fmt, batch, has_bias=False, lanes=1, **epilogue) -> LinearSpec:
    return LinearSpec(Packed.of(fmt), batch, Epilogue(bias=has_bias, **epilogue), lanes)


def conv2d_spec(
    fmt,
    x_shape,
    kernel_size,
    strides,
    padding,
    dilation,
    groups,
    has_bias=False,
    *,
    layout="rows",
    dense_levels=(),
    **epilogue,
) -> Conv2dSpec:
    if len(padding) == 2:  # (top/bottom, left/right)
        padding = (padding[0], padding[1], padding[0], padding[1])
    return Conv2dSpec(
        Packed.of(fmt),
        x_shape,
        kernel_size,
        strides,
        padding,
        dilation,
        groups,
        Epilogue(bias=has_bias, **epilogue),
        layout,
        tuple(dense_levels),
    )


def nested_linear(fmt, batch, has_bias=False, lanes=1, **epilogue):
    return kernel(linear_spec(fmt, batch, has_bias, lanes, **epilogue))


def nested_conv2d(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias=False, **kw):
    return kernel(conv2d_spec(fmt, x_shape, kernel_size, strides, padding, dilation, groups, has_bias, **kw))


def respecialized(func, **changes):
    """The same kernel with some spec fields changed (layout, lanes, dense_levels...)."""
    import dataclasses

    return kernel(dataclasses.replace(spec_of(func), **changes))
