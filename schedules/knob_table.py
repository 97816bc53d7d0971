"""The tuned CPU knobs of each nested kernel, kept in the tuning log beside MetaSchedule's records.

``tvm_nested.tune`` measures the candidates of ``cpu.knob_space`` for a kernel (real packed
weights, every level) and stores them here with the best; the pipeline's "kernels" phase reads the
table and packs each layer for its knobs (a kernel without an entry gets the target family's
defaults). An entry is keyed by the lowered kernel's spec and its level lengths (``kernel_key``):
the same layer in another model finds it, another layer never does.

File: ``<log>/nested_knobs.json`` = ``{"version", "kernels": {key: {"op", "knobs", "level_seconds",
"measured": [{"knobs", "level_seconds", "error"}]}}}``, read through the log's safe reader (no
link followed) and written whole by the locked writer (``TuningLogWriter.replace_json``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .spec import SPECS, to_json
from .tuning_log import KNOBS_FILE, TuningLogError, TuningLogWriter, read_json

KNOBS_VERSION = 1


def kernel_key(spec, level_len) -> str:
    """The key of a lowered kernel's entry: its spec (geometry, epilogue, packed sizes) and the
    layer's level lengths (its sparsity per row and level)."""
    h = hashlib.sha1(to_json(spec).encode())
    h.update(np.ascontiguousarray(level_len).tobytes())
    return h.hexdigest()[:24]


def load_knobs(log_dir) -> dict[str, dict]:
    """``{key: entry}`` of a tuning log (empty without a table); TuningLogError naming a damaged file."""
    data = read_json(Path(log_dir) / KNOBS_FILE, what="the knob table")
    if data is None:
        return {}
    try:
        if int(data.get("version", 0)) != KNOBS_VERSION:
            raise ValueError(f"version {data.get('version')!r} (this tvm_nested reads {KNOBS_VERSION})")
        table = dict(data["kernels"])
        for entry in table.values():
            knobs_of(entry)  # every entry must name knobs this version knows
        return table
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise TuningLogError(f"{Path(log_dir) / KNOBS_FILE}: not a knob table of this tvm_nested: {err}") from err


def knobs_of(entry: dict):
    """The knobs dataclass of a table entry."""
    _, knobs_cls = SPECS[entry["op"]]
    return knobs_cls(**entry["knobs"])


def save_knobs(log: TuningLogWriter, entries: dict[str, dict]) -> Path:
    """Merge ``entries`` into the table of the log being tuned (rewritten whole, atomically)."""
    table = load_knobs(log.path)
    table.update(entries)
    return log.replace_json(KNOBS_FILE, {"version": KNOBS_VERSION, "kernels": table})


__all__ = ["KNOBS_VERSION", "kernel_key", "knobs_of", "load_knobs", "save_knobs"]
