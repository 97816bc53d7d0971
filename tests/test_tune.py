"""Tuning and tuning logs (DESIGN section 6): real MetaSchedule tuning, tiny, on llvm.

The expensive tuning runs once per session (``tuned``); the other tests reuse its log.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tvm_ffi
from ir_checks import run_pipeline
from nested_models import ConvLinear

import tvm_nested
from tvm_nested.authoring import nn as tnn
from tvm_nested.schedules import knob_table
from tvm_nested.schedules import tuning_log as tunelog
from tvm_nested.tuning import RPCSettings, tune
from tvm_nested.tuning import knobs as knob_measure

DENSITIES = (0.5, 0.2, 0.1)
TRIALS = 8


def _close(got, ref, tol=1e-4):
    scale = max(float(np.max(np.abs(ref))), 1.0)
    assert float(np.max(np.abs(got - ref))) <= tol * scale


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    torch.manual_seed(0)
    model = tnn.nest(ConvLinear().eval(), {"conv": DENSITIES, "fc": DENSITIES}).eval()
    x = torch.randn(1, 3, 6, 6)
    level = {"level": torch.tensor(0)}
    mod = tvm_nested.from_torch(model, (x,), level)
    root = tmp_path_factory.mktemp("tune")
    pt2 = root / "tiny.pt2"
    torch.export.save(torch.export.export(model, (x,), level), str(pt2))
    log = root / "log"
    report = tune(mod, "llvm", log, max_trials=TRIALS, num_trials_per_iter=TRIALS, progress=False)
    return {"model": model, "x": x, "mod": mod, "log": log, "report": report, "pt2": pt2, "root": root}


def _records(log):
    return [line for line in (log / tunelog.RECORD_FILE).read_text().splitlines() if line.strip()]


def test_tuning_measures_knob_candidates_of_every_nested_kernel(tuned):
    report, log = tuned["report"], tuned["log"]
    assert sorted(k.op for k in report.nested) == ["conv2d", "linear"]
    table = knob_table.load_knobs(log)
    assert len(table) == 2
    for k in report.nested:
        assert 0 < k.trials <= TRIALS and k.records == k.trials
        assert k.levels == [0, 1, 2]
        assert len(k.level_seconds) == 3 and all(0 < s < 1 for s in k.level_seconds)
        assert k.latency(2) == k.level_seconds[2]
    for entry in table.values():
        ok = [m for m in entry["measured"] if m["level_seconds"]]
        assert ok and len(entry["measured"]) <= TRIALS
        assert entry["knobs"] == knob_measure.best(entry["measured"])["knobs"]  # the best candidate is kept
        assert entry["measured"][0]["knobs"] == entry["measured"][0]["knobs"]  # JSON round trip
    assert report.dense and all(k.records > 0 for k in report.dense)


def test_build_from_log_measures_nothing_and_uses_the_records(tuned, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    from tvm_nested.tuning import knobs

    def forbidden(*_a, **_k):
        raise AssertionError("build measured or tuned with a tuning log")

    for owner, name in [
        (ms, "tune_tir"),
        (ms, "tune_tasks"),
        (ms.tir_integration, "tune_tir"),
        (ms.runner.LocalRunner, "run"),
        (ms.builder.LocalBuilder, "build"),
        (ms.task_scheduler.TaskScheduler, "tune"),
        (knobs, "measure"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)

    mod, log, model, x = tuned["mod"], tuned["log"], tuned["model"], tuned["x"]
    lib = tvm_nested.build(mod, "llvm", tuning_log=log)
    rt = lib.runtime()
    for level in range(lib.num_levels):
        ref = model(x, level=torch.tensor(level)).detach().numpy()
        _close(rt.run(x.numpy(), level=level)[0], ref)
    # every nested layer runs the knobs the log chose (recorded in the module's metadata)
    table = knob_table.load_knobs(log)
    assert {json.dumps(e["knobs"], sort_keys=True) for e in table.values()} == {
        json.dumps(layer["knobs"], sort_keys=True) for layer in lib.info["layers"]
    }
    assert all(layer["tuned"] for layer in lib.info["layers"])
    # the dense functions build compiles are the log's best schedules
    target = lib.target
    plain = run_pipeline(mod, target, tuning_log=log, stop_after="legalize")  # as build and tune do
    applied = run_pipeline(plain, target, tuning_log=log, start_at="schedule", stop_after="schedule")
    db = tunelog.database(log)
    found = 0
    for task in ms.relax_integration.extract_tasks(plain, target):
        func = task.dispatched[0]["main"]
        sch = db.query_schedule(task.dispatched[0], target, workload_name="main")
        if (func.attrs is not None and "nested.op" in func.attrs) or sch is None:
            continue
        found += 1
        scheduled = applied[task.task_name]
        assert bool(scheduled.attrs["tirx.is_scheduled"])
        assert tvm_ffi.structural_equal(scheduled.body, sch.mod["main"].body, map_free_vars=True)
    assert found >= 1


def test_log_for_another_target_is_refused(tuned):
    host = tvm_nested.parse_target("llvm")
    with pytest.raises(tunelog.TuningLogError, match="aarch64") as err:
        tvm_nested.build(tuned["mod"], "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", tuning_log=tuned["log"])
    assert str(host.attrs["mtriple"]) in str(err.value)  # both targets are named


def test_raw_metaschedule_runner_is_refused(tuned, tmp_path):
    from tvm.s_tir import meta_schedule as ms

    with pytest.raises(TypeError, match="RPCSettings"):
        tune(tuned["mod"], "llvm", tmp_path / "log", max_trials=1, runner=ms.runner.LocalRunner())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "127.0.0.1"},
        {"tracker_host": "127.0.0.1", "tracker_port": 9190},
        {"tracker_host": "127.0.0.1", "tracker_port": 9190, "key": "k", "host": "127.0.0.1", "port": 9090},
    ],
    ids=["no-port", "no-key", "mixed"],
)
def test_rpc_settings_are_checked(kwargs):
    with pytest.raises(ValueError, match="RPCSettings"):
        RPCSettings(**kwargs)


def test_interrupted_run_keeps_records_and_tuning_again_appends(tuned, tmp_path):
    """Tune again (CLI, in a subprocess) into a copy of the log; kill it once it has added records."""
    log = tmp_path / "log"
    shutil.copytree(tuned["log"], log)
    before = _records(log)
    code = "import sys; from tvm_nested.cli.tune import tune_main; sys.exit(tune_main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(tuned["pt2"]),
            "--target",
            "llvm",
            "--log",
            str(log),
            "--trials",
            "64",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(_records(log)) <= len(before):
            time.sleep(1)
        grew = len(_records(log)) > len(before)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its worker processes, mid-run
        proc.wait()
    assert grew, proc.stderr.read().decode()[-3000:]
    after = _records(tunelog.check(log, "llvm"))
    db = tunelog.database(log)  # loads, even if the kill tore the last line
    assert after[: len(before)] == before  # nothing lost or rewritten
    assert len(db.get_all_tuning_records()) > len(before)
    # the knob table of the first run is kept whole (rewritten atomically, entries only added to)
    old, new = knob_table.load_knobs(tuned["log"]), knob_table.load_knobs(log)
    assert old.keys() <= new.keys()
    assert all(new[k]["measured"][: len(e["measured"])] == e["measured"] for k, e in old.items())


def test_foreign_log_handlers_do_not_break_tuning():
    """TVM's tune_tir re-configures its logger from the handlers' names; an unnamed handler (pytest's
    capture, a user's StreamHandler) crashed it. tune detaches such handlers while tuning, then restores them."""
    import logging

    from tvm_nested.tuning.measure import metaschedule_logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    mine = logging.StreamHandler()
    logger.addHandler(mine)
    try:
        with metaschedule_logging():
            assert mine not in logger.handlers
            assert all((h.get_name() or "").startswith(logger.name) for h in logger.handlers)
        assert mine in logger.handlers
    finally:
        logger.removeHandler(mine)


@pytest.mark.parametrize("verbose, level", [(False, "ERROR"), (True, "INFO")], ids=["quiet", "verbose"])
def test_metaschedule_logs_reach_the_terminal_only_when_verbose(verbose, level):
    """tune_tir gives its console handler its logger's level (and logs everything to LOG/logs)."""
    import logging

    from tvm_nested.tuning.measure import metaschedule_logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    before = logger.level
    with metaschedule_logging(verbose):
        assert logging.getLevelName(logger.level) == level
    assert logger.level == before


def test_export_to_a_missing_directory_says_so(tuned, tmp_path):
    lib = tvm_nested.build(tuned["mod"], "llvm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lib.export_library(tmp_path / "no" / "such" / "m.so")


_DESIGN_SPACE_PER_TARGET = """
import sys
import tvm
from tvm.script import tirx as T
from tvm.s_tir import meta_schedule as ms
from tvm_nested.target import parse_target
from tvm_nested.tuning import register_tensor_intrinsics

@T.prim_func(s_tir=True)
def mm(a: T.Buffer((16, 16), "float32"), b: T.Buffer((16, 16), "float32"),
       c: T.Buffer((16, 16), "float32")):
    for i, j, k in T.grid(16, 16, 16):
        with T.sblock("c"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float32(0)
            c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

for text in sys.argv[1:]:
    target = parse_target(text)
    register_tensor_intrinsics(target)
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": mm}), target=target,
                         space_generator="post-order-apply", search_strategy="evolutionary")
    print(text, len(ctx.generate_design_space()))
"""


def test_tensor_intrinsics_for_every_target_in_one_process(tmp_path):
    """A process that tunes for a board (aarch64) and then for an x86 CPU with VNNI (whose default
    MetaSchedule rules look up ``dot_16x4_vnni``) gets each architecture's intrinsics. Generating a
    design space needs no such CPU; a fresh process, so no earlier test has registered anything."""
    targets = ["rpi4", "llvm -mcpu=icelake-server -num-cores=2", "llvm -mcpu=znver5 -num-cores=2", "llvm"]
    script = tmp_path / "spaces.py"  # a file: TVMScript parses its functions from their source
    script.write_text(_DESIGN_SPACE_PER_TARGET)
    out = subprocess.run([sys.executable, str(script), *targets], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.rsplit(" ", 1)[0] for line in out.stdout.splitlines()] == targets


def test_knob_choice_weighs_levels_alike_and_never_slows_a_level():
    """``knobs.best``: the defaults come first; a candidate faster on average in seconds but
    slower at a sparse level than the defaults is not taken; among the rest the geometric mean
    over the levels decides."""

    def m(name, *secs):
        return {"knobs": name, "level_seconds": list(secs), "error": None}

    defaults = m("defaults", 10.0, 2.0, 1.0)
    dense_only = m("cblocks", 7.0, 2.5, 1.3)  # mean 3.6 < 4.33, but levels 1 and 2 slower
    even = m("tile", 9.5, 1.8, 0.9)
    broken = {"knobs": "broken", "level_seconds": None, "error": "LLVM error"}
    assert knob_measure.best([defaults, dense_only, broken])["knobs"] == "defaults"
    assert knob_measure.best([defaults, dense_only, even])["knobs"] == "tile"
    assert knob_measure.best([broken, dense_only])["knobs"] == "cblocks"  # no defaults to compare with
    with pytest.raises(ValueError, match="no candidate"):
        knob_measure.best([broken])
