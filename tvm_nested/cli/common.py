"""What every ``tvm-nested`` verb shares: its parser, loading a model file, checking an output path,
parsing addresses, lists and input shapes.

Bad input is a ``CLIError`` (or any exception ``main`` turns into one line): ``tvm-nested <verb>:
error: ...`` on stderr and exit status 2, never a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile

import numpy as np

from ..frontend import from_onnx, from_torch, load_exported_program
from ..runtime import parse_address

EXIT_USAGE = 2  # bad input, as argparse and compilers use it


class CLIError(Exception):
    """Bad input on the command line; the message is printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tvm-nested <verb>: error: ... (see --help)``, exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def densities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"densities must be comma-separated numbers in [0, 1], densest first (e.g. 0.5,0.25,0.1), got {text!r}"
        ) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"densities must be in [0, 1], got {text!r}")
    return values


def levels(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated integers (e.g. 0,2), got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"levels are >= 0, got {text!r}")
    return values


def address(text: str) -> tuple[str, int]:
    """argparse type for ``host:port``."""
    try:
        return parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


_SHAPE = re.compile(r"\s*([^\s,\[\]][^\[\]]*?):\[([^\]]*)\]\s*,?")


def input_shapes(text: str) -> dict[str, list[int]]:
    """tvmc's ``--input-shapes``: ``"x:[1,3,224,224]"``, several separated by spaces or commas
    (``"x:[1,3,224,224] mask:[1,224]"``); every dimension a positive integer."""
    shapes, pos = {}, 0
    while pos < len(text.strip()):
        m = _SHAPE.match(text, pos)
        if m is None:
            raise argparse.ArgumentTypeError(
                f'expected NAME:[d0,d1,...] for each input (e.g. "x:[1,3,224,224]"), got {text!r}'
            )
        name, dims = m.group(1).strip(), m.group(2)
        try:
            shape = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise argparse.ArgumentTypeError(f"input {name!r}: dimensions must be integers, got [{dims}]") from None
        if any(d < 1 for d in shape):
            raise argparse.ArgumentTypeError(f"input {name!r}: every dimension must be >= 1 (static), got {shape}")
        shapes[name] = shape
        pos = m.end()
    if not shapes:
        raise argparse.ArgumentTypeError("--input-shapes is empty")
    return shapes


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--input-shapes`` and ``--trust-pt2``: how a model file is read (compile, tune, deploy)."""
    p.add_argument(
        "--input-shapes",
        type=input_shapes,
        default=None,
        help='static shapes for inputs with dynamic dimensions, as tvmc takes them: "x:[1,3,224,224]" (ONNX)',
    )
    p.add_argument(
        "--trust-pt2",
        action="store_true",
        help="load a .pt2 archive even from a place others can write to (torch.export.load unpickles it: "
        "an archive can run code; use only files you trust)",
    )


def load_model(path: str, *, input_shapes: dict | None = None, trust_pt2: bool = False):
    """ONNX file or a torch.export archive (.pt2) -> Relax module; CLIError on anything else."""
    if not os.path.exists(path):
        raise CLIError(f"no such file {path!r}")
    if not os.path.isfile(path):
        raise CLIError(f"{path!r} is not a file")
    if path.endswith(".onnx"):
        return from_onnx(path, shape_dict=input_shapes)
    if path.endswith(".pt2"):
        if input_shapes:
            raise CLIError("--input-shapes applies to ONNX models; a .pt2 archive has the shapes it was exported with")
        return from_torch(load_exported_program(path, trusted=trust_pt2), None)
    raise CLIError(f"{path!r}: expected an ONNX model (.onnx) or a torch.export archive (.pt2)")


def load_npy(path: str) -> np.ndarray:
    """One ``--input``: a .npy file (no pickles)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise CLIError(f"--input {path!r}: {err.strerror or err}") from None
    if magic != b"\x93NUMPY":
        raise CLIError(f"--input {path!r} is not a .npy file (write one with numpy.save)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise CLIError(f"--input {path!r}: not a plain numeric .npy array ({err})") from None


def check_output(output: str, inputs: list[str], *, force: bool, flag: str = "-o") -> str:
    """Refuse, before any work, an output that would replace an input, overwrite a file without
    ``--force``, or cannot be written (missing or unwritable directory, a directory in the way)."""
    out = os.path.abspath(output)
    for src in inputs:
        same = os.path.realpath(src) == os.path.realpath(out)
        if not same and os.path.exists(src) and os.path.exists(out):
            same = os.path.samefile(src, out)  # a hard link, or another path to it
        if same:
            raise CLIError(f"{flag} {output!r} is the input {src!r}: write the output to another file")
    if os.path.isdir(out):
        raise CLIError(f"{flag} {output!r} is a directory; give a file name")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {output!r}: directory {parent!r} does not exist")
    try:  # a file made and removed says what permission bits do not (root, read-only or pseudo file systems)
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    except OSError as err:
        raise CLIError(f"{flag} {output!r}: cannot write into {parent!r} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
    if os.path.lexists(out) and not force:
        raise CLIError(f"{flag} {output!r} exists: pass --force to overwrite it")
    return out


@contextlib.contextmanager
def replacing(output: str):
    """Yield a temporary path beside ``output`` (same suffix); move it over ``output`` when the
    block succeeds, remove it otherwise: an output is never half-written, and a failed run leaves
    an existing file as it was."""
    directory, name = os.path.split(os.path.abspath(output))
    suffix = "".join(os.path.splitext(name)[1:]) or None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o755 if output.endswith(".so") else 0o644)
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def say_overwrite(output: str) -> None:
    if os.path.lexists(output):
        print(f"overwriting {output} (--force)", file=sys.stderr)


__all__ = [
    "EXIT_USAGE",
    "CLIError",
    "Parser",
    "add_model_arguments",
    "address",
    "check_output",
    "densities",
    "input_shapes",
    "levels",
    "load_model",
    "load_npy",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "replacing",
    "say_overwrite",
]
