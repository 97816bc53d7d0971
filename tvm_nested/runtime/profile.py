"""Where the time of one call goes: every function ``main`` calls, timed on this machine, per level.

The VM calls an instrument before and after each function (``VirtualMachine.set_instrument``); the
wall time between the two is the function's (a few microseconds of the instrument's own cost
included). Functions are named as compiled; a nested kernel also carries its layer's name and op
from the module's metadata, so the table shows the nested layers and the dense remainder (pooling,
elementwise ops left unfused, reshapes) apart, and what share of the call each takes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ProfileRow:
    function: str
    layer: str | None  # the nested layer a kernel computes (None: the dense remainder)
    op: str  # "conv2d" / "linear" for nested kernels, else "dense"
    calls: int  # per call of main
    ms: float  # per call of main, summed over its calls


@dataclass
class Profile:
    level: int
    total_ms: float  # one call of main, not instrumented
    rows: list[ProfileRow] = field(default_factory=list)

    @property
    def nested_ms(self) -> float:
        return sum(r.ms for r in self.rows if r.layer is not None)

    @property
    def remainder_ms(self) -> float:
        """The functions that are not nested kernels (what fusing and scheduling must keep small)."""
        return sum(r.ms for r in self.rows if r.layer is None)

    def __str__(self) -> str:
        lines = [
            f"level {self.level}: {self.total_ms:.3f} ms per call; nested kernels {self.nested_ms:.3f} ms, "
            f"dense remainder {self.remainder_ms:.3f} ms ({self.remainder_ms / max(self.total_ms, 1e-9):.1%})",
            "",
            "| function | layer | op | calls | ms | share |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in self.rows:
            share = r.ms / max(self.total_ms, 1e-9)
            lines.append(f"| {r.function} | {r.layer or '-'} | {r.op} | {r.calls} | {r.ms:.3f} | {share:.1%} |")
        return "\n".join(lines)


def profile(rt, inputs, level: int, *, repeat: int = 10, warmup: int = 2) -> Profile:
    """The profile of ``rt`` (a local ``NestedRuntime``) at ``level``, rows sorted by time."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    args = rt.arguments(inputs, level)
    for _ in range(warmup):
        rt.invoke("main", args)
    t0 = time.perf_counter()
    for _ in range(repeat):
        rt.invoke("main", args)
    total = (time.perf_counter() - t0) / repeat
    spent: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    started = {}

    def instrument(func, symbol, before, ret, *call_args):
        now = time.perf_counter()
        if before:
            started[symbol] = now
        else:
            spent[symbol] += now - started.pop(symbol, now)
            calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run as usual

    rt.instrument(instrument)
    try:
        for _ in range(repeat):
            rt.invoke("main", args)
    finally:
        rt.instrument(None)
    layers = {layer.get("kernel"): layer for layer in rt.info["layers"]}
    rows = []
    for symbol, secs in spent.items():
        layer = layers.get(symbol)
        rows.append(
            ProfileRow(
                symbol,
                layer["name"] if layer else None,
                layer["op"] if layer else "dense",
                calls[symbol] // repeat,
                secs / repeat * 1e3,
            )
        )
    rows.sort(key=lambda r: -r.ms)
    return Profile(int(level), total * 1e3, rows)


def profile_levels(rt, inputs, levels=None, *, repeat: int = 10) -> list[Profile]:
    """``profile`` at every level (or ``levels``)."""
    levels = range(rt.num_levels) if levels is None else levels
    return [profile(rt, inputs, rt.check_level(lvl), repeat=repeat) for lvl in levels]


def summary(profiles: list[Profile]) -> str:
    """One line per level: total, nested kernels, remainder (ms and share)."""
    lines = ["| level | total ms | nested kernels ms | remainder ms | remainder share |", "|---:|---:|---:|---:|---:|"]
    for p in profiles:
        lines.append(
            f"| {p.level} | {p.total_ms:.3f} | {p.nested_ms:.3f} | {p.remainder_ms:.3f} | "
            f"{p.remainder_ms / max(p.total_ms, 1e-9):.1%} |"
        )
    return "\n".join(lines)


__all__ = ["Profile", "ProfileRow", "profile", "profile_levels", "summary"]
