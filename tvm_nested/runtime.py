"""Running a compiled nested module: pick the level per call, no reload.

``NestedRuntime`` wraps a Relax VM over one compiled module (local, or a module loaded through an
RPC session). It reads the artifact's own metadata (the ``nested_info`` function compiled into the
module: number of levels, per-level density, inputs), so a loaded module refuses a level outside
``0..L-1`` before any kernel runs.
"""

from __future__ import annotations

import json
import numbers
import os

import numpy as np
import tvm
from tvm import relax
from tvm.rpc.base import RPC_SESS_MASK

from .info import INFO_FUNC, InfoView, check_info


def set_num_threads(n: int) -> None:
    """Threads of TVM's CPU thread pool for this process (tvm_nested sizes the pool to every core)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive integer, got {n!r}")
    # affinity mode 0 = default: only the thread count changes
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))
    if num_threads() != n:
        raise ValueError(
            f"TVM's thread pool in this process holds {num_threads()} thread(s) at most, not {n} (it is sized once, "
            f"from TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}, when TVM first runs parallel "
            f"code); set TVM_NUM_THREADS={n} before starting Python")


def num_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


class NestedRuntime(InfoView):
    """One compiled nested model on one device; ``run(*inputs, level=k)`` for any level."""

    def __init__(self, module, device=None, *, num_threads: int | None = None):
        self.device = tvm.cpu() if device is None else device
        if num_threads is not None:
            set_num_threads(num_threads)
        self._vm = relax.VirtualMachine(module, self.device)
        try:
            raw = self._vm[INFO_FUNC]()
        except Exception as err:  # not built by tvm_nested
            raise ValueError(f"this module was not built by tvm_nested.build (no {INFO_FUNC} function): {err}") from err
        self.info = check_info(json.loads(bytes(raw.numpy()).decode()))
        self._main = self._vm["main"]
        # over RPC a tuple result cannot come back from vm["main"](...): the stateful calls instead
        self._remote = int(self.device.dlpack_device_type()) >= RPC_SESS_MASK

    # -- what the artifact says about itself: InfoView
    @property
    def input_names(self) -> list[str]:
        return [p["name"] for p in self.info["inputs"] if p["name"] != "level"]

    # -- validation: a clear error, never a crash
    def check_level(self, level) -> int:
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Integral):
            if isinstance(level, np.ndarray) and level.ndim == 0 and level.dtype.kind in "iu":
                level = int(level)
            else:
                raise ValueError(f"level must be an integer in 0..{self.num_levels - 1}, got {level!r}")
        if not 0 <= int(level) < self.num_levels:
            raise ValueError(f"level {int(level)} is out of range: this model has levels 0..{self.num_levels - 1}")
        return int(level)

    def _arguments(self, inputs, level: int) -> list:
        params = self.info["inputs"]
        data = [p for p in params if p["name"] != "level"]
        if len(inputs) != len(data):
            names = ", ".join(p["name"] for p in data)
            raise ValueError(f"expected {len(data)} input(s) ({names}), got {len(inputs)}")
        given = iter(inputs)
        args = []
        for p in params:
            if p["name"] == "level":
                args.append(tvm.runtime.tensor(np.array(level, dtype=p["dtype"]), self.device))
                continue
            x = next(given)
            x = x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)
            if tuple(x.shape) != tuple(p["shape"]):
                raise ValueError(f"input {p['name']!r}: expected shape {tuple(p['shape'])}, got {tuple(x.shape)}")
            if x.dtype != np.dtype(p["dtype"]):
                if x.dtype.kind != np.dtype(p["dtype"]).kind:
                    raise ValueError(f"input {p['name']!r}: expected dtype {p['dtype']}, got {x.dtype}")
                x = x.astype(p["dtype"])
            args.append(tvm.runtime.tensor(np.ascontiguousarray(x), self.device))
        return args

    def run(self, *inputs, level) -> list[np.ndarray]:
        """Outputs of the model at ``level`` as a list of NumPy arrays."""
        args = self._arguments(inputs, self.check_level(level))
        if self._remote:
            self._vm.set_input("main", *args)
            self._vm.invoke_stateful("main")
            return _flatten(self._vm.get_outputs("main"))
        return _flatten(self._main(*args))

    def time(self, *inputs, level, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0) -> float:
        """Mean latency of one call at ``level`` in milliseconds, timed on the device."""
        args = self._arguments(inputs, self.check_level(level))
        if self._remote:  # timed on the board; the outputs stay there
            self._vm.set_input("main", *args)
            timer = self._vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat,
                                            min_repeat_ms=min_repeat_ms)
            return float(timer("main").mean * 1e3)
        timer = self._vm.time_evaluator("main", self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return float(timer(*args).mean * 1e3)


    def run_stages(self, *inputs, levels) -> list[np.ndarray]:
        """Outputs of the staged network with stage s at ``levels[s]`` (stages called from the host)."""
        from .reroute import run_stages

        return run_stages(self, inputs, levels)

    def run_deadline(self, *inputs, deadline_ms: float, level=0) -> tuple[list[np.ndarray], np.ndarray]:
        """Run under a deadline, rerouting on the device: ``(outputs, levels per stage)``.

        Stage 0 runs at ``level``; after each stage the module itself switches to a sparser level when
        elapsed + predicted remaining time (its latency table) exceeds ``deadline_ms``
        (``tvm_nested/reroute.py`` states the rule). ValueError when the module has no latency table.
        """
        from .reroute import run_deadline

        return run_deadline(self, inputs, deadline_ms, level)


def _flatten(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(_flatten(item))
    return result


def load(path: str | os.PathLike, device=None, *, num_threads: int | None = None) -> NestedRuntime:
    """Load an exported library (``NestedModule.export_library``) on the local CPU or ``device``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled module at {path!r}")
    return NestedRuntime(tvm.runtime.load_module(path), device, num_threads=num_threads)
