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

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.support import cc as tvm_cc

from ..contract import CROSS_TOOLCHAINS, Constant
from ..schedules import cpu
from ..target import is_cross

FLUSH_BYTES = 16 << 20  # more than any CPU's L2 and most L3 slices: the layer starts cold
REPEATS = 9  # cold single calls per level (the median counts)
NO_WORSE = 1.05  # a chosen candidate is within this of the defaults at every level (timing noise)


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


def measure(spec, fmt, site_args, candidates, target, levels, *, session=None, seed: int = 0, progress=None):
    """``[Candidate]`` for ``candidates`` (knobs) of the lowered kernel ``spec`` / ``fmt``."""
    results = []
    dev = session.cpu() if session is not None else tvm.cpu()
    for i, knobs in enumerate(candidates):
        try:
            func, packed = cpu.cpu_kernel(spec, fmt, knobs)
            lib = tvm.tirx.build(func, target=target)
            mod = _load(lib, target, session, f"tvm_nested_candidate_{os.getpid()}_{i}.so")
            host = _arrays(site_args, packed, seed)
            args = [tvm.runtime.tensor(a, dev) for a in host]
            out = tvm.runtime.empty([int(d) for d in func.params[-1].ty.shape], "float32", dev)
            name = str(func.attrs["global_symbol"])
            timer = mod.time_evaluator(name, dev, number=1, repeat=REPEATS, cache_flush_bytes=FLUSH_BYTES)
            secs = []
            for level in levels:
                lvl = tvm.runtime.tensor(np.array(level, "int32"), dev)
                secs.append(float(np.median(timer(*args, lvl, out).results)))
            results.append(Candidate(knobs, secs))
        except Exception as err:
            results.append(Candidate(knobs, None, f"{type(err).__name__}: {err}"))
        if progress:
            progress(i + 1, len(candidates), results[-1])
    return results


def _load(lib, target, session, name: str):
    """The compiled candidate as a module on the measuring device. On a board each candidate gets
    its own file name: writing over a library the board has loaded crashes its server."""
    if session is None:
        return lib
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
