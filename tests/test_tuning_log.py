"""Tuning logs under concurrency and damage (DESIGN section 6): readers never write and never crash,
one writer at a time, records appended whole, links and non-regular files refused.

The logs here are made without measuring: real MetaSchedule workloads and records (a traced schedule
of a small matmul) committed through the writer ``tune`` uses. Cases that crashed the process before
(TVM's JSON loader on a blank line) run in a subprocess and assert its exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.script import tirx as T

import tvm_nested
from tvm_nested.schedules import tuning_log as tl

HOST = tvm_nested.parse_target("llvm")


def _matmul(n: int):
    @T.prim_func(s_tir=True)
    def mm(a: T.Buffer((n, n), "float32"), b: T.Buffer((n, n), "float32"), c: T.Buffer((n, n), "float32")):
        for i, j, k in T.grid(n, n, n):
            with T.sblock("c"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi, vj] = T.float32(0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    return mm


def commit_records(db, n: int, count: int, seconds: float = 1e-3) -> None:
    """``count`` records of an n x n matmul (a split of its first loop by 2, 4, ...) into ``db``."""
    func = _matmul(n)
    mod = tvm.IRModule({"main": func})
    workload = db.commit_workload(mod)
    for r in range(count):
        sch = tvm.s_tir.Schedule(mod)
        i, _, _ = sch.get_loops(sch.get_sblock("c"))
        sch.split(i, [None, 2 ** (1 + r % 3)])
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [seconds * (r + 1)], HOST, args))


def make_log(path: Path, records: int = 4) -> Path:
    with tl.open_for_tuning(path, HOST) as log:
        commit_records(log.database, 16, records)
        commit_records(log.database, 8, 2)
    return path


@pytest.fixture
def log(tmp_path):
    return make_log(tmp_path / "log")


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _python(code: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the reader
def test_records_round_trip_through_the_writer(log):
    db = tl.database(log)
    assert len(db.get_all_tuning_records()) == 6
    lines = (log / tl.RECORD_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # whole lines only


_BUILD_WITH_BLANK_LINE = """
import sys, warnings, torch, tvm_nested
from torch import nn
from tvm_nested.authoring import nn as tnn
model = tnn.nest(nn.Sequential(nn.Linear(8, 4)).eval(), {"0": (0.5, 0.25)}).eval()
mod = tvm_nested.from_torch(model, (torch.ones(1, 8),), {"level": torch.tensor(0)})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = tvm_nested.build(mod, "llvm", tuning_log=sys.argv[1])
print(lib.num_levels, [str(w.message) for w in caught if "tuning log" in str(w.message)])
"""


def test_blank_and_torn_lines_are_skipped_with_a_warning_and_nothing_is_written(log):
    """One extra blank line made build segfault in TVM's JSON loader; repairing the tail wrote into
    the log the build was reading (a read-only log failed, a running tune lost a record)."""
    with open(log / tl.RECORD_FILE, "ab") as f:
        f.write(b"\n[0, [[[")  # a blank line, then a torn one
    before = _digest(log)
    out = _python(_BUILD_WITH_BLANK_LINE, log)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "line 7: blank line" in out.stdout and "line 8: incomplete last line" in out.stdout
    assert tl.RECORD_FILE in out.stdout and str(log) in out.stdout  # names the file and the log
    assert _digest(log) == before and not list(log.glob("*.torn"))  # the reader wrote nothing


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda lines: [*lines[:2], b"\xff\xfe not utf-8", *lines[2:]], "line 3: not UTF-8"),
        (lambda lines: [*lines[:1], b"{not json", *lines[1:]], "line 2: not JSON"),
        (lambda lines: [*lines, b"[99, []]"], "line 7: refers to workload index 99"),
        (lambda lines: [*lines, b"[0, [1, 2, 3, 4]]"], "line 7: MetaSchedule cannot read the record"),
        (lambda lines: [*lines, b'{"a": 1}'], "line 7: not a record"),
    ],
    ids=["utf8", "json", "index", "record", "shape"],
)
def test_damage_is_reported_naming_file_and_line(log, damage, why):
    lines = (log / tl.RECORD_FILE).read_bytes().split(b"\n")[:-1]
    (log / tl.RECORD_FILE).write_bytes(b"\n".join(damage(lines)) + b"\n")
    with pytest.warns(tl.TuningLogWarning, match=why) as caught:
        db = tl.database(log)
    assert tl.RECORD_FILE in str(caught[0].message)
    assert len(db.get_all_tuning_records()) == 6  # every good record is kept


def test_a_damaged_workload_skips_only_its_own_records(log):
    lines = (log / tl.WORKLOAD_FILE).read_bytes().split(b"\n")
    lines[0] = lines[0][:100]  # cut in the middle of the 16x16 workload (not the last line)
    (log / tl.WORKLOAD_FILE).write_bytes(b"\n".join(lines))
    with pytest.warns(tl.TuningLogWarning) as caught:
        db = tl.database(log)
    text = " ".join(str(w.message) for w in caught)
    assert f"{tl.WORKLOAD_FILE} (line 1: not JSON" in text
    assert "its workload (line 1 of database_workload.json) is damaged" in text
    assert len(db.get_all_tuning_records()) == 2  # the 8x8 records


@pytest.mark.parametrize("name", [tl.RECORD_FILE, tl.MANIFEST, tl.KNOBS_FILE])
def test_corrupt_json_files_name_the_file(log, name):
    if name == tl.RECORD_FILE:
        (log / name).write_bytes(b"\x00\x01garbage")
        with pytest.warns(tl.TuningLogWarning, match=f"{name}.*line 1"):
            tl.database(tl.check(log, HOST))
        return
    (log / name).write_bytes(b'{"target": \xff')
    with pytest.raises(tl.TuningLogError, match=f"{name}.*not UTF-8"):
        tl.check(log, HOST)
    (log / name).write_text('{"target": ')
    with pytest.raises(tl.TuningLogError, match=f"{name} line 1 .*not valid JSON"):
        tl.check(log, HOST)


def test_duplicated_workloads_from_two_old_writers_still_load(log):
    """Two unlocked tunes left the same workload twice; TVM's loader then mis-indexed every later
    record ('parallel_for_dynamic error'). Each record here keeps the line it names."""
    wl = (log / tl.WORKLOAD_FILE).read_bytes().split(b"\n")
    rec = (log / tl.RECORD_FILE).read_bytes().split(b"\n")[:-1]
    (log / tl.WORKLOAD_FILE).write_bytes(b"\n".join([wl[0], wl[0], wl[1], b""]))
    shifted = [json.dumps([json.loads(r)[0] * 2, json.loads(r)[1]]).encode() for r in rec]  # 0 -> 0, 1 -> 2
    (log / tl.RECORD_FILE).write_bytes(b"\n".join([*rec, *shifted, b""]))
    assert len(tl.database(log).get_all_tuning_records()) == 12


# ------------------------------------------------------------------- links, non-regular files
def test_a_record_file_linked_to_a_user_file_is_refused_and_the_file_untouched(log, tmp_path):
    user = tmp_path / "notes.txt"
    user.write_bytes(b"first line\nlast line without newline")
    (log / tl.RECORD_FILE).unlink()
    (log / tl.RECORD_FILE).symlink_to(user)
    with pytest.raises(tl.TuningLogError, match=f"{tl.RECORD_FILE} is a symbolic link"):
        tl.check(log, HOST)
    with pytest.raises(tl.TuningLogError, match="symbolic link"):
        tl.open_for_tuning(log, HOST)
    assert user.read_bytes() == b"first line\nlast line without newline"


def test_a_planted_link_anywhere_in_the_log_stops_tune(log, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (log / "nested_knobs.tmp").symlink_to(victim)
    with pytest.raises(tl.TuningLogError, match=r"nested_knobs\.tmp is a symbolic link"):
        tl.open_for_tuning(log, HOST)
    (log / "nested_knobs.tmp").unlink()
    (log / tl.LOGS_DIR).mkdir(exist_ok=True)
    (log / tl.LOGS_DIR / "tvm.s_tir.meta_schedule.logging.task_scheduler.log").symlink_to(victim)
    with pytest.raises(tl.TuningLogError, match=r"logs/tvm\.s_tir.*symbolic link"):
        tl.open_for_tuning(log, HOST)
    assert victim.read_text() == "keep me"


def test_the_knob_table_is_written_through_a_fresh_temporary_file(log, tmp_path):
    with tl.open_for_tuning(log, HOST) as writer:
        writer.replace_json(tl.KNOBS_FILE, {"version": 1, "kernels": {}})
    assert json.loads((log / tl.KNOBS_FILE).read_text()) == {"version": 1, "kernels": {}}
    assert not [p for p in log.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_record_file_that_is_not_a_regular_file_is_refused(log, kind):
    (log / tl.RECORD_FILE).unlink()
    if kind == "directory":
        (log / tl.RECORD_FILE).mkdir()  # was silently "not applied"
    else:
        os.mkfifo(log / tl.RECORD_FILE)  # would block a reader for ever
    with pytest.raises(tl.TuningLogError, match=f"{tl.RECORD_FILE} is (a directory|not a regular file)"):
        tl.check(log, HOST)


# ------------------------------------------------------------------------------ the writer
def test_one_writer_at_a_time(log):
    with tl.open_for_tuning(log, HOST):
        with pytest.raises(tl.TuningLogError, match=rf"being written by another tune \(pid {os.getpid()}\)"):
            tl.open_for_tuning(log, HOST)
        assert len(tl.database(log).get_all_tuning_records()) == 6  # readers are never blocked
    with tl.open_for_tuning(log, HOST):  # released on close
        pass


def test_the_lock_dies_with_its_process(log):
    """A SIGKILLed tune leaves no stale lock: the kernel drops a flock with its holder."""
    code = """
    import sys, time, tvm_nested
    from tvm_nested.schedules import tuning_log as tl
    log = tl.open_for_tuning(sys.argv[1], tvm_nested.parse_target("llvm"))
    print("locked", flush=True)
    time.sleep(600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(tl.TuningLogError, match=f"pid {proc.pid}"):
            tl.open_for_tuning(log, HOST)
    finally:
        proc.kill()
        proc.wait()
    tl.open_for_tuning(log, HOST).close()


def test_a_torn_tail_is_closed_off_by_the_next_writer(log):
    with open(log / tl.RECORD_FILE, "ab") as f:
        f.write(b'[0,[[["GetSB')  # a writer killed mid-line
    with tl.open_for_tuning(log, HOST) as writer, pytest.warns(tl.TuningLogWarning, match="incomplete last line"):
        commit_records(writer.database, 16, 1, seconds=5e-4)
    lines = (log / tl.RECORD_FILE).read_bytes().split(b"\n")
    assert lines[6] == b'[0,[[["GetSB' and json.loads(lines[7])[0] == 0 and lines[-1] == b""
    with pytest.warns(tl.TuningLogWarning, match="line 7: not JSON"):
        assert len(tl.database(log).get_all_tuning_records()) == 7


_APPENDER = """
import sys, tvm_nested
sys.path.insert(0, sys.argv[2])
from test_tuning_log import commit_records
from tvm_nested.schedules import tuning_log as tl
with tl.open_for_tuning(sys.argv[1], tvm_nested.parse_target("llvm")) as log:
    print("locked", flush=True)
    commit_records(log.database, 16, int(sys.argv[3]))
"""


def test_readers_beside_a_running_writer_see_whole_records(log):
    """Builds while a tune appends: no crash, no write, never more than the tail reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _APPENDER, str(log), str(Path(__file__).parent), "150"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        assert proc.stdout.readline().strip() == "locked"
        while proc.poll() is None:
            contents = tl.read_log(log)
            assert all(line == max(n for _, n, _ in contents.damage) for _, line, _ in contents.damage)
            seen.append(len(contents.records))
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seen == sorted(seen)  # records only ever added
    assert len(tl.database(log).get_all_tuning_records()) == 6 + 150


_FUZZ = """
import os, sys, random, warnings
from hypothesis import given, settings, HealthCheck, strategies as st
from tvm_nested.schedules import tuning_log as tl
log = sys.argv[1]
originals = {n: open(os.path.join(log, n), "rb").read() for n in (tl.RECORD_FILE, tl.WORKLOAD_FILE)}
good = len(tl.read_log(__import__("pathlib").Path(log)).records)

@settings(max_examples=int(sys.argv[2]), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(originals)), st.sampled_from(["cut", "flip", "blank", "dup", "garbage", "zero"]),
       st.integers(0, 10**9), st.integers(0, 255))
def check(name, how, where, byte):
    data = bytearray(originals[name])
    at = where % (len(data) + 1)
    if how == "cut":
        data = data[:at]
    elif how == "flip" and data:
        data[at % len(data)] ^= byte or 1
    elif how == "blank":
        data[at:at] = b"\\n"
    elif how == "dup":
        lines = bytes(data).split(b"\\n")
        k = where % len(lines)
        data = bytearray(b"\\n".join(lines[: k + 1] + lines[k:]))
    elif how == "garbage":
        data[at:at] = bytes([byte]) * 7 + b"\\n"
    else:
        data[at : at + 64] = bytes(len(data[at : at + 64]))
    for n, original in originals.items():
        with open(os.path.join(log, n), "wb") as f:
            f.write(bytes(data) if n == name else original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.TuningLogWarning)
        db = tl.database(log)
    assert len(db.get_all_tuning_records()) <= good + 2  # a duplicated record line at most

check()
print("fuzz ok")
"""


def test_fuzz_the_reader_on_damaged_logs(log):
    """Cut, flipped, blank, duplicated, garbage and zeroed bytes in either file: the reader warns
    and goes on, never raises, never crashes (a subprocess, so a crash fails the test)."""
    out = _python(_FUZZ, log, 80, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "fuzz ok" in out.stdout


def test_a_read_only_log_serves_builds(log):
    """Nothing is ever opened for writing by a reader: a log on a read-only mount works as any."""
    with open(log / tl.RECORD_FILE, "ab") as f:
        f.write(b"[1, [")
    opened = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        opened.append((str(path), flags))
        return real_open(path, flags, *args, **kwargs)

    try:
        os.open = spy
        with pytest.warns(tl.TuningLogWarning):
            tl.database(tl.check(log, HOST))
    finally:
        os.open = real_open
    assert opened and all(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND) == 0 for _, flags in opened)


_READ = """
import sys, warnings, tvm_nested
from tvm_nested.schedules import tuning_log as tl
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    db = tl.database(tl.check(sys.argv[1], tvm_nested.parse_target("llvm")))
print(len(db.get_all_tuning_records()), [str(w.message) for w in caught])
"""
# root writes through any mode bits: its reader sees the log on a read-only bind mount of its own
_READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def test_a_read_only_log_with_a_torn_tail_serves_builds(log):
    """`build` moved a torn tail to a `.torn` file in the log: a read-only log failed with
    'OSError: Read-only file system: ...json.torn'. Here the log is read-only for the reader (a
    read-only mount for root, no write bits otherwise) and its records are still used."""
    with open(log / tl.RECORD_FILE, "ab") as f:
        f.write(b"\n[1, [")  # a blank line and a torn tail
    before = _digest(log)
    cmd = [sys.executable, "-c", textwrap.dedent(_READ), str(log)]
    if os.geteuid() == 0:
        cmd = ["unshare", "--mount", "sh", "-c", _READ_ONLY_MOUNT, str(log), *cmd]
    else:
        for path in [log, *log.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        for path in [log, *log.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    if out.returncode != 0 and out.stderr.startswith(("unshare:", "mount:")):
        pytest.skip(f"no read-only mount here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("6 ") and "line 7: blank line" in out.stdout and "line 8: incomplete" in out.stdout
    assert _digest(log) == before and not list(log.glob("*.torn"))


def test_open_for_tuning_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(tl.TuningLogError, match="not a tvm_nested tuning log"):
        tl.open_for_tuning(tmp_path, HOST)
    (tmp_path / "file").write_text("x")
    with pytest.raises(tl.TuningLogError, match="not a directory"):
        tl.open_for_tuning(tmp_path / "file", HOST)
