"""THE pass pipeline, in ordered phases. ``build`` and ``tune`` both lower through here.

Set ``dump_dir`` (or the debugging variable ``TVM_NESTED_DUMP``) to write the IR after each phase.
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax

def phases() -> list[tuple[str, tvm.transform.Pass]]:
    from tvm_nested.relay_passes import FoldBatchNorm, LevelGuard, LowerNestedLayers

    return [
        # 1. Fold casts of constant level maps and other constant subgraphs the frontends leave.
        ("fold-constant", relax.transform.FoldConstant()),
        # 2. Inference BatchNorm folded into the conv before it: its weight is what gets packed.
        ("fold-batchnorm", FoldBatchNorm()),
        # 3. Nested layers -> call_tir of a schedules/ kernel taking the level at run time; weights
        #    packed once. Records "nested.info" (levels, densities, payload) on the module.
        ("lower-nested", LowerNestedLayers()),
        # 4. main refuses a level outside 0..L-1 before any kernel runs.
        ("level-guard", LevelGuard()),
    ]


def lower(mod: tvm.IRModule, dump_dir: str | os.PathLike | None = None) -> tvm.IRModule:
    """Run the graph phases on a Relax module from ``from_onnx`` / ``from_torch``."""
    dump_dir = dump_dir or os.environ.get("TVM_NESTED_DUMP")
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / "00-input.py").write_text(mod.script())
    for i, (name, p) in enumerate(phases(), start=1):
        mod = p(mod)
        if dump_dir:
            (Path(dump_dir) / f"{i:02d}-{name}.py").write_text(mod.script())
    return mod
