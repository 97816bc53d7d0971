"""The tvm-nested command: compile (ONNX and torch.export), run, demo."""

import json

import pytest
import torch
from torch import nn

from tvm_nested import cli
from tvm_nested.authoring import nn as tnn


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    model = tnn.nest(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)),
        {"0": [0.5, 0.2, 0.1], "3": [0.5, 0.3, 0.05]},
    )
    ep = torch.export.export(model, (torch.randn(1, 3, 8, 8),), {"level": torch.tensor(0, dtype=torch.int32)})
    path = tmp_path_factory.mktemp("cli") / "model.pt2"
    torch.export.save(ep, str(path))
    return path


def test_compile_and_run_pt2(pt2, tmp_path, capsys):
    so = tmp_path / "model.so"
    assert cli.main(["compile", str(pt2), "-o", str(so)]) == 0
    out = capsys.readouterr().out
    assert "3 levels" in out and "| 2 |" in out
    assert cli.main(["run", str(so), "--repeat", "1", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["level"] for r in rows] == [0, 1, 2] and all(r["outputs"] == [[1, 10]] for r in rows)


def test_compile_onnx(tmp_path, capsys):
    import onnx

    from tvm_nested.authoring.zoo import nested

    path = tmp_path / "squeezenet.onnx"
    onnx.save(nested("squeezenet", densities=(0.5, 0.1)), str(path))
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "sq.so")]) == 0
    assert "2 levels" in capsys.readouterr().out


def test_compile_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.so")])


def test_run_bad_level(pt2, tmp_path, capsys):
    so = tmp_path / "m.so"
    cli.main(["compile", str(pt2), "-o", str(so)])
    capsys.readouterr()
    assert cli.main(["run", str(so), "--level", "3"]) == 2
    assert "level 3 is out of range" in capsys.readouterr().err


def test_demo_small_model(capsys):
    """The main job's code path end to end on a small zoo model (README runs it on ResNet-50)."""
    assert cli.main(["demo", "--model", "squeezenet", "--densities", "0.5,0.2,0.1,0.05"]) == 0
    out = capsys.readouterr().out
    assert "every level matches onnxruntime (rel. err <= 1e-4): yes" in out
    assert out.count("| 3 | 5.0% |") == 1
