"""Running a compiled nested module: pick the level per call, no reload.

``NestedRuntime`` wraps a Relax VM over one compiled module (local, or a module loaded through an
RPC session). It reads the artifact's own metadata (the ``nested_info`` function compiled into the
module: number of levels, per-level density, inputs), so a loaded module refuses a level outside
``0..L-1`` before any kernel runs.

One runtime may be shared by threads: a VM holds per-call state (its register file, and over RPC
one session's stream), so every call through one runtime (``run``, ``run_stages``,
``run_deadline``, ``time``, ``profile``), from its arguments to its last output read back, holds
the runtime's lock: calls are serialised, never interleaved (unlocked, 4 threads on one VM crashed
the process, and a profile counted the other threads' calls).
For requests in parallel, make one runtime per thread (``load`` the same file again: the process
shares the module's code).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading

import numpy as np
import tvm
from tvm import relax
from tvm.rpc.base import RPC_SESS_MASK

from ..contract import DEADLINE_FUNC, INFO_FUNC, LEVEL, REROUTE_POLICIES, STAGE_TIMES_FUNC
from ..schedules.reroute_rule import STATE_SIZE
from .info import InfoView, check_info
from .library import LibraryError, check_library
from .profile import profile as profile_call
from .threads import set_num_threads

NO_TABLE_HELP = (
    "profile it on the target and rebuild: table = tvm_nested.reroute.profile_stages(lib.runtime() "
    "or a runtime loaded over RPC, x); lib = lib.with_latency_table(table) (or "
    "tvm_nested.build(mod, target, stages=K, latency_table=table), or stages='auto')"
)


class DeadlineState:
    """What ``main_deadline`` carries from one request to the next (the slowdown it last saw, when),
    kept on the device: each call takes it and the runtime keeps the one the call returns. A
    runtime has its own (``NestedRuntime.deadline_state``); make one per stream of requests whose
    load should not inform the other's (``NestedRuntime.new_deadline_state``)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next request starts from the table as profiled."""
        self.tensor = tvm.runtime.tensor(np.zeros(STATE_SIZE, "float64"), self.device)

    @property
    def slowdown(self) -> float:
        """The last request's slowdown estimate against the latency table (1.0 before any request)."""
        value = float(self.tensor.numpy()[0])
        return value if value > 0 else 1.0


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
        # over RPC a tuple result cannot come back from vm["main"](...): the stateful calls instead
        self._remote = int(self.device.dlpack_device_type()) >= RPC_SESS_MASK
        self._lock = threading.RLock()  # one VM, one call at a time (see the module docstring)
        self._level_dtype = next((p["dtype"] for p in self.info["inputs"] if p["name"] == LEVEL), "int32")
        self._deadline_state = None

    # -- what the artifact says about itself: InfoView
    @property
    def input_names(self) -> list[str]:
        return [p["name"] for p in self.info["inputs"] if p["name"] != LEVEL]

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

    def level_tensor(self, level: int):
        """The level argument of the module's functions, on the device."""
        return tvm.runtime.tensor(np.array(self.check_level(level), dtype=self._level_dtype), self.device)

    def arguments(self, inputs, level: int) -> list:
        """``main``'s arguments on the device, checked: the inputs in order and the level. An input
        that is a tensor on this runtime's device already is used as it is (no copy)."""
        params = self.info["inputs"]
        data = [p for p in params if p["name"] != LEVEL]
        if len(inputs) != len(data):
            names = ", ".join(p["name"] for p in data)
            raise ValueError(f"expected {len(data)} input(s) ({names}), got {len(inputs)}")
        given = iter(inputs)
        args = []
        for p in params:
            if p["name"] == LEVEL:
                args.append(self.level_tensor(level))
                continue
            x = next(given)
            if isinstance(x, tvm.runtime.Tensor) and x.device == self.device:  # already on the device: as is
                if tuple(x.shape) != tuple(p["shape"]) or str(x.dtype) != p["dtype"]:
                    raise ValueError(
                        f"input {p['name']!r}: expected {p['dtype']}{list(p['shape'])}, got {x.dtype}{list(x.shape)}"
                    )
                args.append(x)
                continue
            x = x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)
            if tuple(x.shape) != tuple(p["shape"]):
                raise ValueError(f"input {p['name']!r}: expected shape {tuple(p['shape'])}, got {tuple(x.shape)}")
            if x.dtype != np.dtype(p["dtype"]):
                if x.dtype.kind != np.dtype(p["dtype"]).kind:
                    raise ValueError(f"input {p['name']!r}: expected dtype {p['dtype']}, got {x.dtype}")
                x = x.astype(p["dtype"])
            args.append(tvm.runtime.tensor(np.ascontiguousarray(x), self.device))
        return args

    def invoke(self, name: str, args: list):
        """Call the module's function ``name``; over RPC through the VM's stateful interface, whose
        outputs (nested tuples of tensors) can be read from the host where a remote tuple cannot."""
        with self._lock:
            if not self._remote:
                return self._vm[name](*args)
            self._vm.set_input(name, *args)
            self._vm.invoke_stateful(name)
            return self._vm.get_outputs(name)

    def instrument(self, callback) -> None:
        """Call ``callback(func, symbol, before, result, *args)`` around every function the VM
        calls (None removes it); this process only (``runtime/profile.py`` times with it)."""
        if self._remote:
            raise ValueError("instrumenting a module on a board is not supported: profile it on this machine")
        with self._lock:
            self._vm.set_instrument(callback)

    def profile(self, *inputs, level: int, repeat: int = 10):
        """Where the time of one call at ``level`` goes, per function (``runtime/profile.py``).
        Holds the lock throughout: another thread's calls would be instrumented and counted too."""
        with self._lock:
            return profile_call(self, inputs, self.check_level(level), repeat=repeat)

    def run(self, *inputs, level) -> list[np.ndarray]:
        """Outputs of the model at ``level`` as a list of NumPy arrays (thread-safe: see the module docstring)."""
        with self._lock:
            return flatten(self.invoke("main", self.arguments(inputs, level)))

    def time_function(
        self, name: str, args: list, *, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0
    ) -> list[float]:
        """Seconds per call of ``name(*args)``, one mean per repeat, timed on the device."""
        with self._lock:
            if self._remote:  # timed on the board; the outputs stay there
                self._vm.set_input(name, *args)
                timer = self._vm.time_evaluator(
                    "invoke_stateful", self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
                )
                return [float(v) for v in timer(name).results]
            timer = self._vm.time_evaluator(
                name, self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            return [float(v) for v in timer(*args).results]

    def time(self, *inputs, level, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0) -> float:
        """Mean latency of one call at ``level`` in milliseconds, timed on the device."""
        if number < 1 or repeat < 1:
            raise ValueError(f"number and repeat must be >= 1, got {number} and {repeat}")
        with self._lock:
            secs = self.time_function(
                "main", self.arguments(inputs, level), number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
        return float(np.mean(secs)) * 1e3

    # -- stages and rerouting (build(..., stages=K), with_latency_table)
    def stage_inputs(self, inputs, level: int = 0) -> dict:
        """Name -> device tensor of the model inputs, as the stage plan names them."""
        args = self.arguments(inputs, level)
        return {p["name"]: a for p, a in zip(self.info["inputs"], args) if p["name"] != LEVEL}

    def run_stages(self, *inputs, levels) -> list[np.ndarray]:
        """Outputs of the staged network with stage s at ``levels[s]`` (stages called from the host)."""
        plan = self.stage_plan
        if plan is None:
            raise ValueError(
                "this module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))"
            )
        levels = list(levels)
        if len(levels) != plan["num_stages"]:
            raise ValueError(f"levels must give one level per stage ({plan['num_stages']}), got {len(levels)}")
        levels = [self.check_level(lvl) for lvl in levels]
        with self._lock:
            env = self.stage_inputs(inputs, levels[0])
            out = None
            for s, name in enumerate(plan["functions"]):
                out = self.invoke(name, [*[env[n] for n in plan["inputs"][s]], self.level_tensor(levels[s])])
                if s < plan["num_stages"] - 1:  # the last stage returns main's result
                    env.update(zip(plan["outputs"][s], out))
            return flatten(out)

    def stage_times(self, *inputs, level) -> np.ndarray:
        """Microseconds from the start to the end of each stage, every stage at ``level``, timed on
        the device (``nested_stage_times``)."""
        if self.stage_plan is None:
            raise ValueError(
                "this module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))"
            )
        with self._lock:
            return flatten(self.invoke(STAGE_TIMES_FUNC, self.arguments(inputs, level)))[-1]

    @property
    def deadline_state(self) -> DeadlineState:
        """The state ``run_deadline`` uses when given none (created on first use)."""
        with self._lock:
            if self._deadline_state is None:
                self._deadline_state = DeadlineState(self.device)
            return self._deadline_state

    def new_deadline_state(self) -> DeadlineState:
        """A fresh state on this runtime's device, for ``run_deadline(..., state=)``."""
        return DeadlineState(self.device)

    def deadline_policy(self, policy=None, aggressiveness=None) -> tuple[str, float]:
        """The rule and margin a call uses: the given ones, else the module's defaults; checked."""
        if self.info.get("reroute_rule") not in REROUTE_POLICIES:
            raise ValueError(
                f"this module's main_deadline was built by an older tvm_nested (rule "
                f"{self.info.get('reroute_rule')!r}): rebuild it with this version"
            )
        policy = self.info["reroute_rule"] if policy is None else policy
        if aggressiveness is None:
            aggressiveness = self.info["reroute_aggressiveness"]
        if policy not in REROUTE_POLICIES:
            raise ValueError(f"unknown rerouting policy {policy!r}: choose one of {', '.join(REROUTE_POLICIES)}")
        if (
            isinstance(aggressiveness, bool)
            or not isinstance(aggressiveness, numbers.Real)
            or not math.isfinite(aggressiveness)
            or aggressiveness < 0
        ):
            raise ValueError(f"aggressiveness must be a finite number >= 0, got {aggressiveness!r}")
        return policy, float(aggressiveness)

    def deadline_arguments(
        self, inputs, deadline_ms, level, policy=None, aggressiveness=None, state: DeadlineState | None = None
    ) -> list:
        """``main_deadline``'s arguments: ``main``'s, the deadline in microseconds, the policy, its
        aggressiveness and the state (the runtime's own when ``state`` is None)."""
        if self.latency_table is None:
            if self.stage_plan is None:
                raise ValueError(
                    "this module has no stages and no latency table: build it with stages=K, then " + NO_TABLE_HELP
                )
            raise ValueError("this module has no latency table: " + NO_TABLE_HELP)
        if (
            isinstance(deadline_ms, bool)
            or not isinstance(deadline_ms, numbers.Real)
            or not math.isfinite(deadline_ms)
            or deadline_ms < 0
        ):
            raise ValueError(f"deadline_ms must be a finite number >= 0, got {deadline_ms!r}")
        policy, aggressiveness = self.deadline_policy(policy, aggressiveness)
        if state is None:
            state = self.deadline_state
        elif not isinstance(state, DeadlineState):
            raise ValueError(f"state must be a DeadlineState (NestedRuntime.new_deadline_state()), got {state!r}")
        args = self.arguments(inputs, level)
        scalar = lambda v, dt: tvm.runtime.tensor(np.array(v, dt), self.device)
        return [
            *args,
            scalar(float(deadline_ms) * 1e3, "float64"),
            scalar(REROUTE_POLICIES.index(policy), "int32"),
            scalar(aggressiveness, "float64"),
            state.tensor,
        ]

    def run_deadline(
        self,
        *inputs,
        deadline_ms: float,
        level=0,
        policy: str | None = None,
        aggressiveness: float | None = None,
        state: DeadlineState | None = None,
        times: bool = False,
    ):
        """Run under a deadline, rerouting on the device: ``(outputs, levels per stage)``.

        The module chooses each stage's level itself, never denser than ``level``
        (``relay_passes/deadline.py`` states the rules): ``policy`` ``"paper"`` (the seed paper's
        plain rule) or ``"evidence"`` (acts on the slowdown it observes, in this request and the
        earlier ones), with ``aggressiveness`` its margin; None: the module's defaults. ``state``:
        what the rule keeps between requests (default: this runtime's own, on the device).
        ``times=True`` also returns when each stage ended (microseconds from the start, device
        clock). ValueError when the module has no table.
        """
        with self._lock:
            if state is None:
                state = self.deadline_state
            out = self.invoke(
                DEADLINE_FUNC, self.deadline_arguments(inputs, deadline_ms, level, policy, aggressiveness, state)
            )
            state.tensor = out[len(out) - 2]  # stays on the device
            flat = flatten(out)
        outputs, levels, ends = flat[:-3], flat[-3].astype(np.int64), flat[-1]
        return (outputs, levels, ends) if times else (outputs, levels)


def flatten(out) -> list[np.ndarray]:
    """A VM result (a tensor or nested tuples of them) as a flat list of NumPy arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(flatten(item))
    return result


def load(path: str | os.PathLike, device=None, *, num_threads: int | None = None) -> NestedRuntime:
    """Load an exported library (``NestedModule.export_library``) on the local CPU or ``device``.

    The file is checked first (``runtime/library.py``: a whole ELF shared library for this machine,
    built by this TVM series); ``LibraryError`` (a ValueError) says what is wrong with it."""
    path = os.fspath(path)
    check_library(path)
    try:
        module = tvm.runtime.load_module(path)
    except RuntimeError as err:  # TVM's InternalError: what the dynamic loader says (a damaged file it maps)
        raise LibraryError(f"{path!r} cannot be loaded: {str(err).strip().splitlines()[-1]}") from err
    return NestedRuntime(module, device, num_threads=num_threads)


__all__ = ["NO_TABLE_HELP", "DeadlineState", "NestedRuntime", "flatten", "load"]
