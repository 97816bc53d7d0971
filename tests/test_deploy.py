"""Deploy nested modules to a board over TVM RPC (tvm_nested.deploy), on the emulated aarch64 board.

One board for the session (tests/conftest_board.py): its stock RPC server (``board_server``) and a
tracker with a second server registered (``board_tracker``). A TVM RPC server serves one client at a
time, so every test drops its remote runtime before the next one connects.

The board is emulated (qemu-user, cortex-a72): the timings taken here prove that timing on the board
works, they are not performance numbers. Numerics: every level on the board against the host (x86)
build of the same model, and against PyTorch.
"""

from __future__ import annotations

import gc
import socket
import time

import numpy as np
import pytest
import torch
from nested_models import ConvLinear
from torch import nn

import tvm_nested
from tvm_nested import deploy as dp
from tvm_nested.authoring import nn as tnn
from tvm_nested.cli import main as cli_main
from tvm_nested.deploy.board import BoardError
from tvm_nested.target import is_cross, parse_target

pytestmark = pytest.mark.board

BOARD_TARGET = "rpi4"  # cortex-a72 + NEON: what the emulated board's qemu CPU is
DENSITIES = (0.5, 0.2, 0.1)


@pytest.fixture(scope="module")
def nested(tmp_path_factory, aarch64_cc):
    """A nested conv+linear model: Relax module, board build (.so too), host build, torch outputs."""
    torch.manual_seed(0)
    model = tnn.nest(ConvLinear().eval(), {"conv": DENSITIES, "fc": DENSITIES}).eval()
    x = torch.randn(1, 3, 6, 6)
    level = {"level": torch.tensor(0)}
    mod = tvm_nested.from_torch(model, (x,), level)
    root = tmp_path_factory.mktemp("deploy")
    pt2 = root / "convlinear.pt2"
    torch.export.save(torch.export.export(model, (x,), level), str(pt2))
    board_lib = tvm_nested.build(mod, BOARD_TARGET)
    so = board_lib.export_library(root / "convlinear_rpi4.so")
    host = tvm_nested.build(mod, "llvm").runtime()
    with torch.no_grad():
        ref = [model(x, level=torch.tensor(lvl)).numpy() for lvl in range(len(DENSITIES))]
    return {
        "mod": mod,
        "x": x.numpy(),
        "lib": board_lib,
        "so": str(so),
        "host": host,
        "torch": ref,
        "pt2": str(pt2),
        "root": root,
    }


# ----------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    "target",
    [
        "rpi4",
        "rpi5",
        "jetson-orin-cpu",
        "raspberry-pi/4b-aarch64",
        "llvm -mtriple=aarch64-linux-gnu -mattr=+neon -mcpu=cortex-a72",
    ],
)
def test_board_targets_use_the_arm_neon_schedules(target):
    from tvm_nested.schedules.cpu import target_family

    tgt = parse_target(target)
    assert is_cross(tgt) and str(tgt.attrs["mtriple"]).startswith("aarch64")
    assert target_family(tgt) == "arm-neon"


def test_preset_cpus():
    assert {p: str(parse_target(p).attrs["mcpu"]) for p in ("rpi4", "rpi5", "jetson-orin-cpu")} == {
        "rpi4": "cortex-a72",
        "rpi5": "cortex-a76",
        "jetson-orin-cpu": "cortex-a78ae",
    }


def test_export_without_cross_libc_names_both_packages(nested, monkeypatch):
    import dataclasses

    from tvm_nested import contract

    real = contract.CROSS_TOOLCHAINS["aarch64"]
    monkeypatch.setitem(
        contract.CROSS_TOOLCHAINS, "aarch64", dataclasses.replace(real, libc_file="/nonexistent/crti.o")
    )
    with pytest.raises(RuntimeError, match="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        nested["lib"].export_library(nested["root"] / "never.so")


# ------------------------------------------------------------------------------- on the board
@pytest.mark.parametrize("via", ["direct", "tracker"])
def test_every_level_on_the_board_matches_the_host_build(via, nested, request):
    if via == "direct":
        rt = dp.deploy(nested["lib"], request.getfixturevalue("board_server").address)
    else:
        trk = request.getfixturevalue("board_tracker")
        rt = dp.deploy(nested["lib"], tracker=trk.address, key=trk.key)
    assert isinstance(rt, tvm_nested.NestedRuntime)
    assert rt.device.dlpack_device_type() >= 128  # a remote (RPC) device, not this machine's CPU
    assert rt.num_levels == len(DENSITIES) and rt.info["target"] == nested["lib"].info["target"]
    for lvl in range(rt.num_levels):
        (out,) = rt.run(nested["x"], level=lvl)
        (host,) = nested["host"].run(nested["x"], level=lvl)
        np.testing.assert_allclose(out, host, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out, nested["torch"][lvl], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        rt.run(nested["x"], level=len(DENSITIES))
    rows = dp.time_levels(rt, nested["x"], number=2, repeat=1)
    assert [r["level"] for r in rows] == [0, 1, 2] and all(r["ms"] > 0 for r in rows)
    del rt  # the board's server is free for the next client once the session is collected
    gc.collect()


def test_board_is_aarch64_and_reported_as_emulated(board_server):
    session = dp.connect(board_server.address)
    assert dp.board_triple(session).startswith("aarch64")
    assert dp.is_emulated(session)
    del session
    gc.collect()


def test_host_build_is_refused_by_the_board(nested, board_server):
    host_lib = tvm_nested.build(nested["mod"], "llvm")
    with pytest.warns(UserWarning, match="not for a board"), pytest.raises(ValueError, match="board is aarch64"):
        dp.deploy(host_lib, board_server.address)
    gc.collect()


def test_auto_stages_measured_on_the_board(nested, board_server):
    """stages="auto" times the candidate stages and a decision ON the board (measure_on), then compiles
    the chosen cuts with the board's table; the module reroutes there (emulated: no QoS claim)."""
    lib = tvm_nested.build(
        nested["mod"], BOARD_TARGET, stages="auto", measure_on=lambda cand: dp.deploy(cand, board_server.address)
    )
    gc.collect()
    note, K = lib.stage_plan["auto"], lib.num_stages
    assert note["candidates"] == 2 and len(note["candidate_cost_us"]) == 2 and note["decision_us"] >= 0
    assert lib.latency_table.shape == (K, len(DENSITIES)) and (lib.latency_table > 0).all()
    rt = dp.deploy(lib, board_server.address)
    x, last = nested["x"], len(DENSITIES) - 1
    outs, levels = rt.run_deadline(x, deadline_ms=0.0, level=0, policy="evidence")
    assert levels.tolist() == [last] * K
    np.testing.assert_allclose(outs[0], nested["torch"][last], rtol=1e-4, atol=1e-5)
    outs, levels = rt.run_deadline(x, deadline_ms=1e9, level=1)
    assert levels.tolist() == [1] * K
    np.testing.assert_allclose(outs[0], nested["torch"][1], rtol=1e-4, atol=1e-5)
    del rt
    gc.collect()


def test_rerouting_on_the_board(nested, board_server):
    """Stages profiled ON the board, the table compiled in, both rules decided on the board, the evidence
    rule's state kept on the board between requests; a short stream of requests of every policy under a
    deadline the board can only sometimes meet: every level vector valid, every output the staged
    network's at those levels (timings emulated: functional, not QoS numbers)."""
    from tvm_nested.reroute import profile_stages

    staged = tvm_nested.build(nested["mod"], BOARD_TARGET, stages=2)
    rt = dp.deploy(staged, board_server.address)
    table = profile_stages(rt, nested["x"], repeat=1)  # timed by the board's clock
    assert table.shape == (2, len(DENSITIES)) and (table > 0).all()
    del rt
    gc.collect()
    rt = dp.deploy(staged.with_latency_table(table), board_server.address)
    x, last = nested["x"], len(DENSITIES) - 1
    outs, levels = rt.run_deadline(x, deadline_ms=0.0, level=0, policy="paper")  # stage 0 as asked, then sparsest
    assert levels.tolist() == [0, last]
    np.testing.assert_allclose(outs[0], rt.run_stages(x, levels=[0, last])[0], rtol=1e-5, atol=1e-6)
    assert rt.run_deadline(x, deadline_ms=0.0, level=0)[1].tolist() == [last, last]  # evidence: stage 0 too
    outs, levels = rt.run_deadline(x, deadline_ms=1e9, level=1)  # never switches
    assert levels.tolist() == [1, 1]
    np.testing.assert_allclose(outs[0], nested["host"].run(x, level=1)[0], rtol=1e-4, atol=1e-5)
    deadline_ms = float(table[:, 0].sum()) / 1e3  # the densest request as profiled: met or not, by load
    for policy in ("paper", "evidence"):
        state = rt.new_deadline_state()
        for _ in range(3):
            outs, levels, ends = rt.run_deadline(x, deadline_ms=deadline_ms, policy=policy, state=state, times=True)
            assert set(levels.tolist()) <= set(range(len(DENSITIES))) and ends.shape == (2,)
            np.testing.assert_allclose(outs[0], rt.run_stages(x, levels=levels)[0], rtol=1e-5, atol=1e-6)
        slowdown, ended = state.tensor.numpy()  # the state came back from the board, still there
        assert slowdown > 0 and ended > 0
    del rt
    gc.collect()


# --------------------------------------------------------------------------------------- CLI
def test_cli_deploy_compiles_uploads_and_times_every_level(nested, board_server, capsys):
    host, port = board_server.address
    assert (
        cli_main(
            [
                "deploy",
                nested["pt2"],
                "--rpc",
                f"{host}:{port}",
                "--target",
                BOARD_TARGET,
                "--number",
                "2",
                "--repeat",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "EMULATED" in out and "NOT performance numbers" in out and "cortex-a72" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2"]
    assert all(float(r.split("|")[4]) < 1e-4 for r in rows)  # max |board - host| per level
    gc.collect()


def test_cli_run_through_the_tracker(nested, board_tracker, capsys):
    import json

    host, port = board_tracker.address
    assert (
        cli_main(["run", nested["so"], "--tracker", f"{host}:{port}", "--key", board_tracker.key, "--repeat", "1"]) == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [d["level"] for d in lines] == [0, 1, 2] and all(d["outputs"] == [[1, 10]] for d in lines)
    gc.collect()


# ------------------------------------------------------------------------------ failures
@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a busy board, or not an RPC server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize("via", ["direct", "tracker"])
def test_board_that_never_answers_fails_within_the_timeout(via, silent_port):
    kw = (
        {"rpc": ("127.0.0.1", silent_port)}
        if via == "direct"
        else {"tracker": f"127.0.0.1:{silent_port}", "key": "rpi4"}
    )
    t0 = time.monotonic()
    with pytest.raises(BoardError, match="no answer within"):
        dp.connect(**kw, timeout=2)
    assert time.monotonic() - t0 < 8


def test_cli_deploy_to_a_dead_board_is_a_clear_error(nested, capsys):
    from tvm_nested.deploy.board import free_port

    dead = free_port("127.0.0.1", 21000, 22000)
    t0 = time.monotonic()
    assert cli_main(["deploy", nested["so"], "--rpc", f"127.0.0.1:{dead}", "--timeout", "3"]) == 2
    assert f"127.0.0.1:{dead} unreachable" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10


def test_tracker_without_the_key_fails_within_the_timeout(board_tracker):
    t0 = time.monotonic()
    with pytest.raises(BoardError, match="no free server with key 'no-such-board'"):
        dp.connect(tracker=board_tracker.address, key="no-such-board", timeout=2)
    assert time.monotonic() - t0 < 8


# -------------------------------------------------------------------------- remote tuning
def test_remote_tuning_log_is_reused_for_the_board_and_refused_elsewhere(board_tracker, tmp_path, aarch64_cc):
    """A few trials of two tiny nested kernels measured ON the board (cross-compiled .so candidates),
    then builds for that board reuse the log without measuring; other boards' targets refuse it.
    (A second kernel's candidates were uploaded under the first one's names and crashed the board.)"""
    from tvm_nested.schedules import tuning_log as tunelog
    from tvm_nested.tuning import RPCSettings, tune

    torch.manual_seed(0)
    model = tnn.nest(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8)).eval(), {"0": (0.5, 0.2), "1": (0.5, 0.2)})
    model = model.eval()
    x = torch.randn(2, 32)
    mod = tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)})
    log = tmp_path / "rpi4-log"
    host, port = board_tracker.address
    report = tune(
        mod,
        BOARD_TARGET,
        log,
        max_trials=2,
        num_trials_per_iter=2,
        progress=False,
        runner=RPCSettings(tracker_host=host, tracker_port=port, key=board_tracker.key),
    )
    assert len(report.nested) == 2
    for kernel in report.nested:
        assert kernel.trials >= 2 and kernel.best_seconds > 0 and len(kernel.level_seconds) == 2
    lib = tvm_nested.build(mod, BOARD_TARGET, tuning_log=log)
    rt = dp.deploy(lib, tracker=board_tracker.address, key=board_tracker.key)
    with torch.no_grad():
        for lvl in range(2):
            np.testing.assert_allclose(
                rt.run(x.numpy(), level=lvl)[0], model(x, level=torch.tensor(lvl)).numpy(), rtol=1e-4, atol=1e-5
            )
    del rt  # the board's server is free for the next client once the session is collected
    gc.collect()
    for other in ("rpi5", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", "llvm"):
        with pytest.raises(tunelog.TuningLogError, match="was made for target"):
            tvm_nested.build(mod, other, tuning_log=log)


@pytest.mark.slow
def test_nested_squeezenet_on_the_board(board_server, aarch64_cc):
    """A model-zoo network (SqueezeNet 1x3x224x224, nested at two levels) at every level on the board
    against the host build (about 30 s here: two compiles, ~1 s per emulated run)."""
    from tvm_nested.authoring import zoo

    model = zoo.nested("squeezenet", densities=(0.5, 0.2), keep_first_dense=True)
    mod = tvm_nested.from_onnx(model)
    (x,) = zoo.example_input(model, seed=1).values()
    host = tvm_nested.build(mod, "llvm").runtime()
    rt = dp.deploy(tvm_nested.build(mod, BOARD_TARGET), board_server.address)
    for lvl in range(2):
        (out,), (ref,) = rt.run(x, level=lvl), host.run(x, level=lvl)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    del rt
    gc.collect()
