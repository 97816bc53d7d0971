"""AttachMetadata: the artifact's record of itself compiled in as ``nested_info()`` (a uint8 JSON tensor).

Expected writes ``nested_info`` in TVMScript with the record as a parameter bound to the constant:
the JSON of the record written out below, in the order the pass writes its keys (the bytes are the
artifact's). The pass always adds the function; a module without nested layers says so in it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from ir_checks import bind
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.contract import FORMAT_VERSION, INFO_VERSION
from tvm_nested.relay_passes import AttachMetadata, collect_metadata
from tvm_nested.target import canonical, parse_target

TARGET = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
LAYER = {"name": "linear_0 (y)", "op": "linear", "rows": 8, "cols": 8, "nnz": [48, 32, 16], "dense_bytes": 256}
INFO = json.dumps({"num_levels": 3, "layers": [LAYER]})
STAGES = json.dumps({"num_stages": 2, "functions": ["nested_stage_0", "nested_stage_1"]})
REROUTE = json.dumps({"latency_table_us": [[1.0, 0.5, 0.2]], "reroute_rule": "evidence"})


@I.ir_module
class Before:
    I.module_attrs({"nested.info": INFO, "nested.stages": STAGES, "nested.reroute": REROUTE})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class Expected:
    I.module_attrs({"nested.info": INFO, "nested.stages": STAGES, "nested.reroute": REROUTE})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y

    @R.function
    def nested_info(record: R.Tensor(("n",), "uint8")):
        return record


def _record() -> dict:
    return {
        "info_version": INFO_VERSION,
        "format_version": FORMAT_VERSION,
        "tvm_version": tvm.__version__,
        "target": canonical(TARGET),
        "num_levels": 3,
        "densities": [48 / 64, 32 / 64, 16 / 64],  # non-zeros per level over the dense weights
        "layers": [LAYER],
        "inputs": [
            {"name": "x", "shape": [2, 8], "dtype": "float32"},
            {"name": "level", "shape": [], "dtype": "int32"},
        ],
        "stages": json.loads(STAGES),
        "latency_table_us": [[1.0, 0.5, 0.2]],  # the rerouting record, merged in
        "reroute_rule": "evidence",
    }


def _as_tensor(record: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(record).encode(), dtype="uint8")


def test_metadata_function_added():
    after = AttachMetadata(TARGET)(Before)
    tvm.ir.assert_structural_equal(after, bind(Expected, "nested_info", record=_as_tensor(_record())))
    assert collect_metadata(Before, TARGET) == _record()


def test_record_reads_back_from_the_compiled_module():
    vm = relax.VirtualMachine(tvm.compile(AttachMetadata(TARGET)(Before), "llvm"), tvm.cpu())
    assert json.loads(vm["nested_info"]().numpy().tobytes()) == _record()


@I.ir_module
class NotNested:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


def test_module_without_nested_layers_has_one_level():
    record = collect_metadata(NotNested, TARGET)
    assert (record["num_levels"], record["densities"], record["layers"]) == (1, [1.0], [])
    assert "stages" not in record and "latency_table_us" not in record


# --------------------------------------------------------------------------------- error cases
@I.ir_module
class DynamicBatch:
    @R.function
    def main(x: R.Tensor(("n", 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


def test_dynamic_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"input 'x' has a dynamic shape \[n, 8\].*shape_dict"):
        AttachMetadata(TARGET)(DynamicBatch)
