"""The metadata a compiled nested module carries about itself.

It is compiled into the module as the Relax function ``nested_info`` returning the JSON as a uint8
tensor, so it travels with the library (export, RPC upload) and cannot get lost beside it.
"""

from __future__ import annotations

import numpy as np

INFO_FUNC = "nested_info"
INFO_VERSION = 1
# Optional keys (absent or null in modules built without them; readers must not require them):
#   "stages": the stage plan of build(..., stages=K) -- num_stages, functions, inputs/outputs per
#             stage (activation names), cuts, macs (see relay_passes/stages.py)
#   "latency_table_us": [stages][levels] microseconds profiled on the target (tvm_nested/reroute.py)
STAGES_KEY = "stages"
LATENCY_TABLE_KEY = "latency_table_us"


def check_info(info: dict) -> dict:
    """Refuse metadata this version cannot read."""
    version = info.get("info_version")
    if version != INFO_VERSION:
        raise ValueError(f"module metadata version {version} is not supported (this tvm_nested reads {INFO_VERSION}); rebuild it")
    if int(info.get("num_levels", 0)) < 1:
        raise ValueError(f"module metadata has no valid num_levels: {info.get('num_levels')!r}")
    return info


def example_inputs(info: dict, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of the shapes the module expects (standard normal floats, zero integers), level excluded."""
    rng = np.random.default_rng(seed)
    out = []
    for p in info["inputs"]:
        if p["name"] == "level":
            continue
        if np.dtype(p["dtype"]).kind == "f":
            out.append(rng.standard_normal(p["shape"]).astype(p["dtype"]))
        else:
            out.append(np.zeros(p["shape"], p["dtype"]))
    return out
