"""Running compiled nested modules: the runtime object, its metadata, the CPU thread pool."""

from .info import InfoView, check_info, example_inputs
from .library import LibraryError, check_library, host_machine
from .rpc import BoardError, abandon, connect, parse_address
from .stage_timing import decision_cost_us, profile_stages
from .threads import num_threads, set_num_threads
from .vm import DeadlineState, NestedRuntime, flatten, load

__all__ = [
    "BoardError",
    "DeadlineState",
    "InfoView",
    "LibraryError",
    "NestedRuntime",
    "abandon",
    "check_info",
    "check_library",
    "connect",
    "decision_cost_us",
    "example_inputs",
    "flatten",
    "host_machine",
    "load",
    "num_threads",
    "parse_address",
    "profile_stages",
    "set_num_threads",
]
