"""Measuring the CPU knob candidates of a nested kernel on the target (this machine or a board).

A candidate is a (packing, kernel) pair (``schedules.cpu.specialize``): it is compiled, given the
layer's real packed weights (and bias), a seeded random input (and residual), and timed at every
level asked for with the device's own ``time_evaluator``; one compiled kernel serves every level,
so ``best`` weighs them alike (geometric mean) and never takes a candidate that is slower than the
defaults at any level. Every timed call follows a flush of the CPU caches
(``FLUSH_BYTES``): inside a model a layer's weights, staging buffer and output are not in cache
when it starts (measured on ResNet-50: the layers ran 1.5-3x slower in the model than in a hot
loop), and knobs chosen on hot caches favour data that will not be there. On a board the candidate
is cross-compiled here, uploaded and timed there (the candidates need no MetaSchedule schedule:
their structure is their packing).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.support import cc as tvm_cc

from ..contract import CROSS_TOOLCHAINS, Constant
from ..runtime import BoardError, abandon
from ..schedules import cpu
from ..target import is_cross

FLUSH_BYTES = 16 << 20  # more than any CPU's L2 and most L3 slices: the layer starts cold
REPEATS = 9  # cold single calls per level (the median counts)
NO_WORSE = 1.05  # a chosen candidate is within this of the defaults at every level (timing noise)
_UPLOADS = itertools.count()  # numbers the candidates' file names on a board: never one name twice


@dataclass
class Candidate:
    knobs: object
    level_seconds: list[float] | None  # None: it did not build or run (error says why)
    error: str | None = None

    @property
    def seconds(self) -> float:
        """Geometric mean over the levels (see ``best``)."""
        return geomean(self.level_seconds) if self.level_seconds else float("inf")


def geomean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def best(measured: list[dict]) -> dict:
    """The measured candidate (``{"knobs", "level_seconds", ...}``, the defaults first) to keep:
    the lowest geometric mean over the levels, so that every level's speed counts alike (a mean in
    seconds lets the densest level decide alone, and a knob that pays there, such as input-channel
    blocks, can cost the sparse levels more), among the candidates no level of which is slower
    than the defaults' by more than ``NO_WORSE``: tuning never slows a level down."""
    ok = [m for m in measured if m["level_seconds"]]
    if not ok:
        raise ValueError("no candidate built and ran")
    if measured[0]["level_seconds"]:
        base = measured[0]["level_seconds"]
        ok = [m for m in ok if all(s <= NO_WORSE * b for s, b in zip(m["level_seconds"], base))]
    return min(ok, key=lambda m: geomean(m["level_seconds"]))


def _arrays(site_args, packed, seed: int) -> list:
    """The kernel's arguments but the level and the output: its packed operands, the call site's
    other constants (bias), seeded random data for the rest (x, residual)."""
    rng = np.random.default_rng(seed)
    sources = [site_args[0], *packed.arrays(), *site_args[5:-1]]
    out = []
    for src in sources:
        if isinstance(src, np.ndarray):
            out.append(src)
        elif isinstance(src, Constant):
            out.append(src.value.numpy())
        else:
            shape = [int(d) for d in src.ty.shape]
            out.append(rng.standard_normal(shape).astype("float32"))
    return out


def measure(spec, fmt, site_args, candidates, target, levels, *, board=None, seed: int = 0):
    """Yield a ``Candidate`` for each of ``candidates`` (knobs) of the lowered kernel ``spec`` / ``fmt``.

    ``board`` (``RPCSettings``): measured there, each candidate in an RPC session of its own, so
    that the board's ``session_timeout`` bounds one measurement (one session for every candidate
    was ended by the board after that many seconds, failing all the later ones). A candidate that
    fails is reported as such; a board that does not answer within the time-out raises
    ``BoardError`` naming it (the candidates yielded before are the caller's to keep).
    """
    for knobs in candidates:
        try:
            func, packed = cpu.cpu_kernel(spec, fmt, knobs)
            lib = tvm.tirx.build(func, target=target)
            host = _arrays(site_args, packed, seed)
        except Exception as err:
            yield Candidate(knobs, None, f"{type(err).__name__}: {err}")
            continue
        if board is None:
            try:
                yield Candidate(knobs, _time(lib, func, host, levels, tvm.cpu()))
            except Exception as err:
                yield Candidate(knobs, None, f"{type(err).__name__}: {err}")
        else:
            yield _measure_on_board(board, knobs, lib, func, host, target, levels)


def _time(mod, func, host, levels, dev) -> list[float]:
    """Seconds of one cold call of ``func`` in ``mod`` per level (the median of ``REPEATS``)."""
    args = [tvm.runtime.tensor(a, dev) for a in host]
    out = tvm.runtime.empty([int(d) for d in func.params[-1].ty.shape], "float32", dev)
    timer = mod.time_evaluator(
        str(func.attrs["global_symbol"]), dev, number=1, repeat=REPEATS, cache_flush_bytes=FLUSH_BYTES
    )
    secs = []
    for level in levels:
        lvl = tvm.runtime.tensor(np.array(level, "int32"), dev)
        secs.append(float(np.median(timer(*args, lvl, out).results)))
    return secs


def _measure_on_board(board, knobs, lib, func, host, target, levels) -> Candidate:
    start = time.monotonic()
    session = board.connect()  # BoardError (the board does not answer) ends the tuning
    try:
        name = f"tvm_nested_candidate_{os.getpid()}_{next(_UPLOADS)}.so"
        return Candidate(knobs, _time(_upload(lib, target, session, name), func, host, levels, session.cpu()))
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        stalled = time.monotonic() - start >= board.session_timeout
        if stalled:  # the remote objects the traceback holds go without waiting for the board each
            abandon(session)
    finally:
        # a TVM RPC server serves one client: the session (and the remote objects holding it) goes
        # now, so that the next candidate's connect finds the board free
        session = None
    if stalled:
        # raised outside the except block: no traceback keeps the session, and so the board, busy
        raise BoardError(
            f"{board.where} did not answer within {board.session_timeout:g}s (session_timeout): measuring stopped"
        )
    return Candidate(knobs, None, error)


def _upload(lib, target, session, name: str):
    """The compiled candidate as a module on the board, under a name used once per process:
    uploading over a library the board has loaded (its loader keeps the first mapping of a path)
    crashed its server (segfault in dlsym) as soon as a second kernel was tuned."""
    with tempfile.TemporaryDirectory(prefix="tvm_nested_knobs_") as tmp:
        path = os.path.join(tmp, name)
        triple = str(target.attrs.get("mtriple", ""))
        if is_cross(target):
            cc = CROSS_TOOLCHAINS[triple.split("-")[0]].cc
            lib.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
        else:
            lib.export_library(path)
        session.upload(path)
        return session.load_module(name)


__all__ = ["NO_WORSE", "Candidate", "best", "geomean", "measure"]
