"""Running compiled nested modules: the runtime object, its metadata, the CPU thread pool."""

from .info import InfoView, check_info, example_inputs
from .threads import num_threads, set_num_threads
from .vm import NestedRuntime, flatten, load

__all__ = [
    "InfoView",
    "NestedRuntime",
    "check_info",
    "example_inputs",
    "flatten",
    "load",
    "num_threads",
    "set_num_threads",
]
