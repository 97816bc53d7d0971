"""Pass tests: every pass a test runs checks its input and its output with TVM's well-formed
instrument (scoping, dataflow rules, types), as TVM's own pass tests do; ``ir_checks.run_pipeline``
keeps the instrument for the pipeline slices it runs."""

import pytest
import tvm
from tvm.relax.ir.instrument import WellFormedInstrument


@pytest.fixture(autouse=True)
def _well_formed():
    with tvm.transform.PassContext(instruments=[WellFormedInstrument()]):
        yield
