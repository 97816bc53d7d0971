"""TVM's CPU thread pool for this process.

TVM sizes its pool once, the first time it runs parallel code (or is asked how many threads it
has), from ``TVM_NUM_THREADS``, else from its own guess (half the logical cores: 1 on a 2-vCPU
machine). ``config_threadpool`` can then only choose up to that size. Importing tvm_nested changes
nothing; asking for threads before the pool exists sizes it to every core, so any count up to the
core count can be chosen later.
"""

from __future__ import annotations

import numbers
import os

import tvm

_ENV = "TVM_NUM_THREADS"


def set_num_threads(n: int) -> None:
    """Run TVM's CPU kernels on ``n`` threads in this process (ValueError if the pool cannot)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive integer, got {n!r}")
    # only effective before the pool exists; the user asked for threads, so this is their setting
    os.environ.setdefault(_ENV, str(max(int(n), os.cpu_count() or 1)))
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))  # mode 0: only the count changes
    if num_threads() != n:
        raise ValueError(
            f"TVM's thread pool in this process holds {num_threads()} thread(s) at most, not {n}: it "
            f"was sized ({_ENV}={os.environ.get(_ENV, 'unset')}) when TVM first ran parallel code; "
            f"call set_num_threads before running anything, or set {_ENV}={n} before starting Python"
        )


def num_threads() -> int:
    """Threads TVM's CPU pool runs kernels on now (creates the pool if it does not exist yet)."""
    return int(tvm.get_global_func("runtime.NumThreads")())


__all__ = ["num_threads", "set_num_threads"]
