"""The tuned CPU knobs of each nested kernel, kept in the tuning log beside MetaSchedule's records.

``tvm_nested.tune`` measures every candidate of ``cpu.knob_space`` for a kernel (real packed
weights, every level) and stores the best here; the pipeline's "kernels" phase reads the table and
packs each layer for its knobs (a kernel without an entry gets the target family's defaults). An
entry is keyed by the lowered kernel's spec and its level lengths (``kernel_key``): the same layer
in another model finds it, another layer never does.

File: ``<log>/nested_knobs.json`` = ``{"version", "kernels": {key: {"op", "knobs", "seconds",
"candidates"}}}``, rewritten whole through a temporary file (an interrupted write leaves the old one).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .spec import SPECS, to_json

KNOBS_FILE = "nested_knobs.json"
KNOBS_VERSION = 1


def kernel_key(spec, level_len) -> str:
    """The key of a lowered kernel's entry: its spec (geometry, epilogue, packed sizes) and the
    layer's level lengths (its sparsity per row and level)."""
    h = hashlib.sha1(to_json(spec).encode())
    h.update(np.ascontiguousarray(level_len).tobytes())
    return h.hexdigest()[:24]


def load_knobs(log_dir) -> dict[str, dict]:
    """``{key: entry}`` of a tuning log (empty without a table); ValueError naming a damaged file."""
    path = Path(log_dir) / KNOBS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if int(data.get("version", 0)) != KNOBS_VERSION:
            raise ValueError(f"version {data.get('version')!r} (this tvm_nested reads {KNOBS_VERSION})")
        return dict(data["kernels"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a knob table: {err}") from err


def knobs_of(entry: dict):
    """The knobs dataclass of a table entry."""
    _, knobs_cls = SPECS[entry["op"]]
    return knobs_cls(**entry["knobs"])


def save_knobs(log_dir, entries: dict[str, dict]) -> Path:
    """Merge ``entries`` into the log's table (atomically)."""
    path = Path(log_dir) / KNOBS_FILE
    table = load_knobs(log_dir)
    table.update(entries)
    tmp = path.with_name(f".{KNOBS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": KNOBS_VERSION, "kernels": table}, indent=1))
    os.replace(tmp, path)
    return path


__all__ = ["KNOBS_FILE", "kernel_key", "knobs_of", "load_knobs", "save_knobs"]
