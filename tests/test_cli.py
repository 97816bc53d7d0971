"""The tvm-nested command: compile (ONNX and torch.export), run, demo."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tvm_nested
from tvm_nested import cli
from tvm_nested.authoring import nn as tnn
from tvm_nested.authoring.training import export_onnx


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


def test_compile_missing_file(tmp_path, capsys):
    assert cli.main(["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.so")]) == 2
    assert capsys.readouterr().err.strip() == f"tvm-nested compile: error: no such file {str(tmp_path / 'nope.onnx')!r}"


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
    # onnxruntime on the plain dense model, timed in the same run, and the speedup of every level
    ort_ms = float(re.search(r"onnxruntime on the plain dense model: ([0-9.]+) ms", out).group(1))
    speedups = re.findall(r"\| ([0-9.]+) \| ([0-9.]+)x \|\n", out)
    assert ort_ms > 0 and len(speedups) == 4
    # the printed times carry three significant digits: the ratio of two of them is within ~1 % of the
    # printed speedup (itself rounded to 0.01)
    assert all(abs(ort_ms / float(ms) - float(x)) <= 0.011 * float(x) + 0.005 for ms, x in speedups)


# ----------------------------------------------------------------- outputs never replace inputs
@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    """A dense ONNX model (a Linear layer) for `nest`, and its nested version for `compile`."""
    import onnx

    from tvm_nested.authoring.onnx_nest import nest_onnx

    root = tmp_path_factory.mktemp("cli-onnx")
    dense = root / "dense.onnx"
    torch.onnx.export(nn.Sequential(nn.Linear(8, 4)).eval(), (torch.ones(1, 8),), str(dense), dynamo=False)
    nested = root / "nested.onnx"
    onnx.save(nest_onnx(onnx.load(str(dense)), densities=[0.5, 0.25]), str(nested))
    return {"dense": dense, "nested": nested}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tvm-nested {verb}: error: "), err
    return err[0]


def test_compile_never_replaces_its_input(dense_onnx, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    shutil.copy(dense_onnx["nested"], model)
    before = _sha(model)
    for out in (model, tmp_path / "." / "m.onnx"):
        assert cli.main(["compile", str(model), "-o", str(out), "--force"]) == 2
        assert "is the input" in _one_error_line(capsys, "compile")
    os.link(model, tmp_path / "hard.onnx")
    assert cli.main(["compile", str(model), "-o", str(tmp_path / "hard.onnx"), "--force"]) == 2
    assert "is the input" in _one_error_line(capsys, "compile")
    assert _sha(model) == before


def test_nest_never_replaces_its_input(dense_onnx, tmp_path, capsys):
    model = tmp_path / "dense.onnx"
    shutil.copy(dense_onnx["dense"], model)
    before = _sha(model)
    assert cli.main(["nest", str(model), "--densities", "0.5,0.2", "-o", str(model)]) == 2
    assert "is the input" in _one_error_line(capsys, "nest")
    assert _sha(model) == before
    out = tmp_path / "nested.onnx"
    assert cli.main(["nest", str(model), "--densities", "0.5,0.2", "-o", str(out)]) == 0
    assert cli.main(["nest", str(model), "--densities", "0.5,0.2", "-o", str(out)]) == 2
    assert "exists: pass --force" in _one_error_line(capsys, "nest")
    assert cli.main(["nest", str(model), "--densities", "0.5,0.2", "-o", str(out), "--force"]) == 0
    assert "overwriting" in capsys.readouterr().err
    assert tvm_nested.from_onnx(str(out)) is not None


def test_compile_overwrites_only_with_force_and_says_so(dense_onnx, tmp_path, capsys):
    so = tmp_path / "m.so"
    so.write_bytes(b"an older build")
    assert cli.main(["compile", str(dense_onnx["nested"]), "-o", str(so)]) == 2
    assert "exists: pass --force to overwrite it" in _one_error_line(capsys, "compile")
    assert so.read_bytes() == b"an older build"
    assert cli.main(["compile", str(dense_onnx["nested"]), "-o", str(so), "-f"]) == 0
    assert f"overwriting {so}" in capsys.readouterr().err
    assert tvm_nested.load(so).num_levels == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.so")]  # no temporary left


@pytest.mark.parametrize(
    "where, match",
    [
        ("missing/dir/m.so", "does not exist"),
        ("", "is a directory"),
        ("/proc/m.so", "cannot write into '/proc'"),  # writable by its mode bits, not in fact
    ],
    ids=["missing-dir", "directory", "unwritable"],
)
def test_unwritable_outputs_are_refused_before_compiling(dense_onnx, tmp_path, capsys, where, match):
    out = tmp_path / where if where else tmp_path
    assert cli.main(["compile", str(dense_onnx["nested"]), "-o", str(out)]) == 2
    assert match in _one_error_line(capsys, "compile")


# ------------------------------------------------------------- one line and exit 2 for bad input
@pytest.fixture(scope="module")
def files(tmp_path_factory, dense_onnx, pt2):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.onnx").write_bytes(b"")
    (root / "notes.txt").write_text("x")
    (root / "text.npy").write_text("1 2 3")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object))
    so = root / "m.so"
    assert cli.main(["compile", str(pt2), "-o", str(so)]) == 0
    return {"root": root, "so": so, "nested": dense_onnx["nested"], "pt2": pt2}


BAD = [
    ("nest", ["nest", "{nested}", "--densities", "a,b", "-o", "{root}/x.onnx"], "densities must be"),
    ("nest", ["nest", "{nested}", "--densities", "0.2,0.5", "-o", "{root}/x.onnx"], "non-increasing"),
    ("nest", ["nest", "{root}/nope.onnx", "--densities", "0.5", "-o", "{root}/x.onnx"], "no such file"),
    ("train", ["train", "--config", "{root}/missing.json"], "no such file"),
    ("train", ["train", "--config", "{root}/notes.txt"], "config must be .json or .toml"),
    ("tune", ["tune", "{nested}", "--log", "{root}/log", "--levels", "a"], "levels must be"),
    ("tune", ["tune", "{nested}", "--log", "{root}/log-9", "--levels", "9"], "subset of 0..1, got [9]"),
    ("tune", ["tune", "{nested}", "--log", "{root}/log-rpi", "--target", "rpi4"], "tune it on the board"),
    ("tune", ["tune", "{nested}", "--log", "{root}/log", "--trials", "0"], "positive integer"),
    ("tune", ["tune", "{nested}", "--log", "{root}/log", "--rpc", "nohost"], "expected host:port"),
    ("tune", ["tune", "{nested}"], "required: --log"),
    ("compile", ["compile", "{root}/empty.onnx", "-o", "{root}/x.so"], "is empty"),
    ("compile", ["compile", "{root}/notes.txt", "-o", "{root}/x.so"], "expected an ONNX model"),
    ("compile", ["compile", "{nested}", "-o", "{root}/x.so", "--target", "llvm -mcpu=nosuchcpu"], "not a CPU LLVM"),
    ("compile", ["compile", "{nested}", "-o", "{root}/x.so", "--tuning-log", "{root}/nolog"], "--tuning-log"),
    ("compile", ["compile", "{nested}", "-o", "{root}/x.so", "--input-shapes", "x[1,2]"], "NAME:[d0,d1,...]"),
    ("compile", ["compile", "{nested}"], "required: -o/--output"),
    ("run", ["run", "{so}", "--repeat", "0"], "positive integer"),
    ("run", ["run", "{so}", "--level", "7"], "level 7 is out of range"),
    ("run", ["run", "{so}", "--input", "{root}/text.npy"], "is not a .npy file"),
    ("run", ["run", "{so}", "--input", "{root}/objects.npy"], "not a plain numeric .npy"),
    ("run", ["run", "{root}/notes.txt"], "not a shared library"),
    ("run", ["run", "{so}", "--threads", "-1"], "positive integer"),
    ("deploy", ["deploy", "{so}", "--rpc", "127.0.0.1:notaport"], "expected host:port"),
    ("board serve", ["board", "serve", "--port", "70000"], "1..65535"),
    ("board", ["board", "serve", "--port-end", "9300"], "--port-end goes with --port"),
    ("demo", ["demo", "--densities", "1.5"], "densities must be in"),
]


@pytest.mark.parametrize("verb, argv, match", BAD, ids=[f"{v.split()[0]}-{i}" for i, (v, _, _) in enumerate(BAD)])
def test_bad_input_is_one_line_and_exit_2(files, capsys, verb, argv, match):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors exit from inside the parser
        code = stop.code
    assert code == 2
    line = _one_error_line(capsys, verb)
    assert match in line, line


def test_a_failing_compiler_is_quoted_in_the_one_line(files, capsys):
    """An aarch64 module linked by the host's gcc said only 'Compilation error:'."""
    argv = ["compile", str(files["nested"]), "-o", str(files["root"] / "cc.so"), "--target", "rpi4", "--cc", "gcc"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys, "compile")
    assert re.search(r"error: Compilation error: \S.*error", line), line
    assert not (files["root"] / "cc.so").exists()


def test_refused_tune_input_leaves_no_log_behind(files, capsys):
    log = files["root"] / "log-levels"
    assert cli.main(["tune", str(files["nested"]), "--log", str(log), "--levels", "0,9"]) == 2
    assert "levels must be a non-empty subset of 0..1, got [0, 9]" in _one_error_line(capsys, "tune")
    assert not log.exists()  # checked before the log is created and locked


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.main.__globals__["CLIError"], match="no such file"):
        cli.main(["--debug", "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.so")])


# ------------------------------------------------------------------------- input shapes, .pt2
def test_the_onnx_that_train_writes_compiles_with_input_shapes(tmp_path, capsys):
    """export_onnx declares a dynamic batch; compile takes its shape the way tvmc does."""
    model = tnn.nest(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), {"1": (0.5, 0.2)}).eval()
    path = tmp_path / "nested.onnx"
    export_onnx(model, torch.zeros(1, 1, 8, 8), path=path)
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "a.so")]) == 2
    assert '--input-shapes "x:[...]"' in _one_error_line(capsys, "compile")
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "a.so"), "--input-shapes", "x:[3,1,8,8]"]) == 0
    rt = tvm_nested.load(tmp_path / "a.so")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype("float32")
    with torch.no_grad():
        np.testing.assert_allclose(
            rt.run(x, level=1)[0], model(torch.from_numpy(x), level=torch.tensor(1)).numpy(), rtol=1e-4, atol=1e-5
        )


def test_input_shapes_parse_as_tvmc_writes_them():
    from tvm_nested.cli.common import input_shapes

    assert input_shapes("x:[1,3,224,224]") == {"x": [1, 3, 224, 224]}
    assert input_shapes("data:0:[1, 3] mask:[2],level:[]") == {"data:0": [1, 3], "mask": [2], "level": []}


def test_pt2_from_a_world_writable_directory_needs_trust(pt2, tmp_path, capsys):
    """A .pt2 is unpickled when loaded (a crafted one ran code during compile)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by anyone, no sticky bit
    planted = shared / "model.pt2"
    shutil.copy(pt2, planted)
    assert cli.main(["compile", str(planted), "-o", str(tmp_path / "m.so")]) == 2
    line = _one_error_line(capsys, "compile")
    assert "writable by every user" in line and "can run code" in line and "--trust-pt2" in line
    assert cli.main(["compile", str(planted), "-o", str(tmp_path / "m.so"), "--trust-pt2"]) == 0


def test_pt2_trust_rules(tmp_path):
    """Refused: a file every user may write, one owned by another user, one in a world-writable
    directory without the sticky bit; a file of one's own in a sticky directory (/tmp) is fine."""
    from tvm_nested.frontend import load_exported_program, untrusted_reason

    path = tmp_path / "m.pt2"
    path.write_bytes(b"not loaded: refused first")
    assert untrusted_reason(str(path)) is None
    path.chmod(0o666)
    assert untrusted_reason(str(path)) == "every user may write to it"
    with pytest.raises(ValueError, match=r"every user may write to it; a \.pt2 archive is unpickled"):
        load_exported_program(path)
    path.chmod(0o644)
    tmp_path.chmod(0o1777)
    assert untrusted_reason(str(path)) is None  # sticky: only its owner may replace it
    tmp_path.chmod(0o777)
    assert "writable by every user" in untrusted_reason(str(path))
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        assert untrusted_reason(str(path)) == "it is owned by another user (uid 65534)"


def test_tune_is_callable_as_the_readme_writes_it():
    import inspect

    assert callable(tvm_nested.tune)
    assert list(inspect.signature(tvm_nested.tune).parameters)[:4] == ["mod", "target", "work_dir", "max_trials"]


def test_tune_shows_one_progress_bar_and_keeps_metaschedule_logs_in_the_log(files, tmp_path):
    """MetaSchedule's INFO task tables, XGBoost's DEBUG lines and torch's FutureWarning flooded the
    terminal; the candidates' temporary folders were left behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log = tmp_path / "log"
    env = dict(os.environ, TMPDIR=str(scratch))
    cmd = [sys.executable, "-m", "tvm_nested.cli", "tune", str(files["pt2"]), "--log", str(log), "--trials", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for flood in ("[INFO]", "XGB iter", "[DEBUG]", "FutureWarning", "Traceback"):
        assert flood not in out.stdout + out.stderr, flood
    assert "trial" in out.stderr and "best" in out.stderr  # the bar
    assert "| function | kind |" in out.stdout  # the report
    assert list((log / "logs").glob("tvm.s_tir.meta_schedule.logging.task_*.log"))
    assert not list(scratch.iterdir())  # no tvm_nested_tune_* folder left
