"""Profiling a compiled module: every function main calls, per level, the nested layers named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nested_models import ConvLinear

import tvm_nested
from tvm_nested.authoring import nn as tnn
from tvm_nested.cli import main as cli_main


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = tnn.nest(ConvLinear().eval(), {"conv": (0.5, 0.2), "fc": (0.5, 0.2)}).eval()
    x = torch.randn(1, 3, 6, 6)
    lib = tvm_nested.build(tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)}), "llvm")
    path = lib.export_library(tmp_path_factory.mktemp("profile") / "model.so")
    return lib, x.numpy(), path


def test_profile_names_every_nested_layer_and_adds_up(compiled):
    lib, x, _ = compiled
    rt = lib.runtime()
    p = rt.profile(x, level=1, repeat=3)
    nested = [r for r in p.rows if r.layer is not None]
    assert sorted(r.op for r in nested) == ["conv2d", "linear"]
    assert {r.layer for r in nested} == {layer["name"] for layer in lib.info["layers"]}
    assert all(r.calls == 1 and r.ms > 0 for r in nested)
    assert [r.ms for r in p.rows] == sorted((r.ms for r in p.rows), reverse=True)
    assert p.nested_ms + p.remainder_ms == pytest.approx(sum(r.ms for r in p.rows))
    assert p.total_ms > 0 and "dense remainder" in str(p)
    np.testing.assert_allclose(rt.run(x, level=1)[0], rt.run(x, level=1)[0])  # the instrument is gone


def test_profile_cli_every_level(compiled, capsys):
    _, _, path = compiled
    assert cli_main(["profile", str(path), "--repeat", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| level | total ms | nested kernels ms | remainder ms | remainder share |" in out
    assert out.count("per call; nested kernels") == 2  # both levels
    assert cli_main(["profile", str(path), "--level", "7"]) == 2  # out of range: one line, status 2
