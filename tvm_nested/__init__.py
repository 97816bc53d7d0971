"""tvm-nested: nested sparse networks for Apache TVM.

One set of weights holds N nested sparse sub-models; one compiled module runs any of them, the
level chosen at run time.

    mod = tvm_nested.from_onnx("model.onnx")               # or from_torch(module, example_args)
    lib = tvm_nested.build(mod, target="llvm -mtriple=aarch64-linux-gnu")
    lib.export_library("model.so")
    rt = tvm_nested.load("model.so")
    outs = rt.run(x, level=2)
"""

import os as _os

# TVM sizes its CPU thread pool once, from TVM_NUM_THREADS (1 on small machines when unset), the first
# time it runs parallel code; set_num_threads can only choose up to that size afterwards. So the pool
# gets every core before TVM starts it, and set_num_threads / load(num_threads=) pick how many run.
_os.environ.setdefault("TVM_NUM_THREADS", str(_os.cpu_count() or 1))

from .build import NestedModule, build  # noqa: E402
from .frontend import from_onnx, from_torch  # noqa: E402
from .levelmap import NestingError  # noqa: E402
from .runtime import NestedRuntime, load, num_threads, set_num_threads  # noqa: E402
from .target import parse_target  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "NestedModule", "NestedRuntime", "NestingError", "build", "from_onnx", "from_torch", "load",
    "num_threads", "parse_target", "set_num_threads",
]
