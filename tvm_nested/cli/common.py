"""What every ``tvm-nested`` verb shares: loading a model file, parsing addresses and lists."""

from __future__ import annotations

import argparse
import os

from ..deploy import parse_address
from ..frontend import from_onnx, from_torch


def load_model(path: str):
    """ONNX file or a torch.export archive (.pt2) -> Relax module."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no such file {path!r}")
    if path.endswith(".onnx"):
        return from_onnx(path)
    if path.endswith(".pt2"):
        import torch  # optional dependency: only the .pt2 route needs it

        return from_torch(torch.export.load(path), None)
    raise SystemExit(f"error: {path!r}: expected an ONNX model (.onnx) or a torch.export archive (.pt2)")


def densities(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"densities must be comma-separated numbers, got {text!r}") from err


def address(text: str) -> tuple[str, int]:
    """argparse type for ``host:port``."""
    try:
        return parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


__all__ = ["address", "densities", "load_model"]
