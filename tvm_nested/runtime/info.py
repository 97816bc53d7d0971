"""The metadata a compiled nested module carries about itself.

It is compiled into the module as the Relax function ``nested_info`` returning the JSON as a uint8
tensor, so it travels with the library (export, RPC upload) and cannot get lost beside it.
"""

from __future__ import annotations

import numpy as np

from ..contract import INFO_VERSION, LEVEL

# The record (written by relay_passes/metadata.py): info_version, format_version, tvm_version,
# target, num_levels, densities, layers, inputs; optional keys (absent in modules built without
# them; readers must not require them):
#   "stages": the stage plan of build(..., stages=K) -- num_stages, functions, inputs/outputs per
#             stage (activation names), cuts, macs, and with stages="auto" "auto": the candidates,
#             their measured cost, a decision's cost, the share allowed (see relay_passes/stages.py)
#   "latency_table_us", "reroute_rule", "reroute_aggressiveness", "reroute_overhead_us": the rerouting
#             table, the rule and margin a call uses by default, the overhead reserve
#             compiled into main_deadline (relay_passes/deadline.py)


def check_info(info: dict) -> dict:
    """Refuse metadata this version cannot read."""
    version = info.get("info_version")
    if version != INFO_VERSION:
        raise ValueError(
            f"module metadata version {version} is not supported (this tvm_nested reads {INFO_VERSION}); rebuild it"
        )
    if int(info.get("num_levels", 0)) < 1:
        raise ValueError(f"module metadata has no valid num_levels: {info.get('num_levels')!r}")
    return info


class InfoView:
    """What an artifact says about itself, read from its ``info`` dict (NestedModule, NestedRuntime)."""

    info: dict

    @property
    def num_levels(self) -> int:
        return int(self.info["num_levels"])

    @property
    def densities(self) -> list[float]:
        """Fraction of the nested layers' weights kept at each level."""
        return list(self.info["densities"])

    @property
    def payload_bytes(self) -> int:
        """Bytes of the packed nested weights (values, indices, level offsets)."""
        return sum(layer["payload_bytes"] for layer in self.info["layers"])

    @property
    def csr_bytes(self) -> int:
        """DESIGN section 5 yardstick: plain CSR of the densest level of every nested layer."""
        return sum(layer["csr_bytes"] for layer in self.info["layers"])

    @property
    def dense_bytes(self) -> int:
        return sum(layer["dense_bytes"] for layer in self.info["layers"])

    @property
    def stage_plan(self) -> dict | None:
        """The stage functions of a module built with ``stages=`` (names, carried activations), or None."""
        return self.info.get("stages")

    @property
    def num_stages(self) -> int | None:
        """Stage functions the module runs (``build(..., stages=K)``), or None."""
        stages = self.info.get("stages")
        return None if stages is None else int(stages["num_stages"])

    @property
    def latency_table(self) -> np.ndarray | None:
        """Per-stage, per-level latency (microseconds) compiled into the module, or None."""
        table = self.info.get("latency_table_us")
        return None if table is None else np.asarray(table, dtype=np.float64)


def example_inputs(info: dict, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of the shapes the module expects (standard normal floats, zero integers), level excluded."""
    rng = np.random.default_rng(seed)
    out = []
    for p in info["inputs"]:
        if p["name"] == LEVEL:
            continue
        if np.dtype(p["dtype"]).kind == "f":
            out.append(rng.standard_normal(p["shape"]).astype(p["dtype"]))
        else:
            out.append(np.zeros(p["shape"], p["dtype"]))
    return out
