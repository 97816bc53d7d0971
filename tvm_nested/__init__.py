"""tvm-nested: nested sparse networks for Apache TVM.

One set of weights holds N nested sparse sub-models; one compiled module runs any of them, the
level chosen at run time.

    mod = tvm_nested.from_onnx("model.onnx")               # or from_torch(module, example_args)
    lib = tvm_nested.build(mod, target="llvm -mtriple=aarch64-linux-gnu")
    lib.export_library("model.so")
    rt = tvm_nested.load("model.so")
    outs = rt.run(x, level=2)
"""

from .authoring.levelmap import NestingError
from .build import NestedModule, build
from .frontend import from_onnx, from_torch
from .runtime import NestedRuntime, load, num_threads, set_num_threads
from .target import parse_target
from .tuning import tune

__version__ = "0.1.0"

__all__ = [
    "NestedModule",
    "NestedRuntime",
    "NestingError",
    "build",
    "from_onnx",
    "from_torch",
    "load",
    "num_threads",
    "parse_target",
    "set_num_threads",
    "tune",
]
