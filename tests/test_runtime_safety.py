"""A runtime that is safe to share and a loader that checks its file (the audit's crashes).

Crash-type cases run in a subprocess and assert on its exit status (a signal is a negative code):
the test process must survive whatever the code under test does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tvm_nested
from tvm_nested.authoring import nn as tnn
from tvm_nested.runtime import LibraryError, check_library
from tvm_nested.runtime.library import embedded_info


@pytest.fixture(scope="module")
def tiny_so(tmp_path_factory):
    torch.manual_seed(0)
    model = tnn.nest(nn.Sequential(nn.Linear(32, 16)).eval(), {"0": (0.5, 0.2)}).eval()
    x = torch.randn(2, 32)
    lib = tvm_nested.build(tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)}), "llvm")
    path = tmp_path_factory.mktemp("rt") / "tiny.so"
    lib.export_library(path)
    return path


def _python(code: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


_THREADS = """
import sys, threading, numpy as np, tvm_nested
rt = tvm_nested.load(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, 32)).astype("float32")
ref = [rt.run(x, level=lvl)[0] for lvl in range(rt.num_levels)]
calls = lambda: {row.function: row.calls for row in rt.profile(x, level=0, repeat=5).rows}
solo = calls()
failures = []
def work(k):
    try:
        for i in range(150):
            lvl = (i + k) % rt.num_levels
            if i % 50 == 0:
                rt.time(x, level=lvl, number=1, repeat=1)
            if k == 0 and i % 10 == 5 and calls() != solo:
                failures.append((k, i, "the profile counted other threads' calls"))
            if not np.array_equal(rt.run(x, level=lvl)[0], ref[lvl]):
                failures.append((k, i, "wrong output"))
    except Exception as err:
        failures.append((k, type(err).__name__, str(err)[:200]))
threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("failures", failures)
sys.exit(1 if failures else 0)
"""


def test_one_runtime_shared_by_four_threads(tiny_so):
    """Unlocked, this crashed (SIGSEGV, 'malloc(): unaligned tcache chunk') or raised
    'reg < frame->register_file.size()'; calls through one runtime are serialised (a profile too:
    it instrumented and counted the calls other threads made meanwhile)."""
    out = _python(_THREADS, tiny_so)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "failures []" in out.stdout


# ------------------------------------------------------------------------------ the loader
def test_truncated_library_is_refused_without_a_crash(tiny_so, tmp_path):
    """A half-finished copy used to die with SIGBUS inside dlopen."""
    data = tiny_so.read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(data[: len(data) * 2 // 3])
    out = _python("import sys, tvm_nested; tvm_nested.load(sys.argv[1])", cut)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])  # a Python exception, not a signal
    assert "LibraryError" in out.stderr and "truncated" in out.stderr and "cut.so" in out.stderr


@pytest.mark.parametrize(
    "content, match",
    [(b"", "is empty"), (b"not a library at all\n", "not an ELF file"), (b"\x7fELF\x02\x01", "not an ELF")],
    ids=["empty", "text", "header-only"],
)
def test_files_that_are_not_libraries(tmp_path, content, match):
    path = tmp_path / "m.so"
    path.write_bytes(content)
    with pytest.raises(LibraryError, match=match):
        tvm_nested.load(path)


def test_a_module_for_another_cpu_names_both_machines(tiny_so, tmp_path):
    data = bytearray(tiny_so.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine: aarch64
    path = tmp_path / "arm.so"
    path.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match=r"module for aarch64, and this machine is x86_64"):
        tvm_nested.load(path)


def test_a_module_from_another_tvm_series_is_refused_before_loading(tiny_so, tmp_path):
    data = tiny_so.read_bytes()
    version = data.find(b'"tvm_version": "0.')
    assert version > 0 and embedded_info(data)["tvm_version"].startswith("0.")
    old = data[:version] + b'"tvm_version": "0.1' + data[version + len(b'"tvm_version": "0.1') :]
    path = tmp_path / "old.so"
    path.write_bytes(old)
    with pytest.raises(LibraryError, match=r"built with TVM 0\.1"):
        check_library(path)


_LOAD_FUZZ = """
import itertools, os, sys, numpy as np, tvm_nested
from hypothesis import given, settings, HealthCheck, strategies as st
from tvm_nested.runtime import LibraryError
data = open(sys.argv[1], "rb").read()
x = np.ones((2, 32), "float32")
ref = tvm_nested.load(sys.argv[1]).run(x, level=1)[0]
count = itertools.count()

@settings(max_examples=int(sys.argv[3]), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["truncate", "zero-tail", "garbage-tail"]), st.integers(0, len(data) - 1))
def check(kind, at):
    if kind == "truncate":
        damaged = data[:at]
    elif kind == "zero-tail":
        damaged = data[:at] + bytes(len(data) - at)
    else:
        damaged = data[:at] + bytes((i * 131 + 7) % 256 for i in range(len(data) - at))
    # a fresh file each time: rewriting a library in place under a process that loaded it would
    # change its mapped code (the dynamic loader shares one mapping per file)
    path = os.path.join(sys.argv[2], f"damaged{next(count)}.so")
    with open(path, "wb") as f:
        f.write(damaged)
    try:
        rt = tvm_nested.load(path)
    except (LibraryError, FileNotFoundError):
        return
    # accepted: only a tail the loader never reads was damaged, and the module must still be right
    assert np.array_equal(rt.run(x, level=1)[0], ref), (kind, at)

check()
print("fuzz ok")
"""


def test_fuzz_load_on_damaged_files(tiny_so, tmp_path):
    """Truncated, zero-filled or garbage tails at any offset: a clean error or a working module,
    never a signal (run in a subprocess: a crash there fails this test instead of killing pytest)."""
    out = _python(_LOAD_FUZZ, tiny_so, tmp_path, 60, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "fuzz ok" in out.stdout


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=256))
def test_check_library_never_raises_anything_but_its_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "x.so"
    path.write_bytes(b"\x7fELF" + blob if blob[:1] != b"x" else blob)
    try:
        check_library(path)
    except LibraryError:
        pass


def test_load_reads_nothing_through_a_directory(tmp_path):
    with pytest.raises(LibraryError, match="not a regular file"):
        tvm_nested.load(tmp_path)
    assert not os.path.exists(tmp_path / "nothing.so")
    with pytest.raises(FileNotFoundError, match="no compiled module"):
        tvm_nested.load(tmp_path / "nothing.so")


# ------------------------------------------------------------------------------ NaN / Inf
def test_nan_reaching_only_pruned_weights_does_not_propagate(tmp_path):
    """The documented choice (README, 'What a level computes'): a weight pruned at level l is not
    computed at level l, so it does not see the input; PyTorch's masked-dense form (W * mask) gives
    NaN there (0 * NaN). A NaN that meets a kept weight propagates as usual."""
    lm = np.array([[0, 0, 1, -1], [0, 1, 1, 0]], np.int32)  # column 3: pruned in row 0, kept at level 0 in row 1
    layer = nn.Linear(4, 2, bias=False)
    model = tnn.nest(nn.Sequential(layer).eval(), {"0": lm}).eval()
    x = torch.ones(1, 4)
    lib = tvm_nested.build(tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)}), "llvm")
    rt = lib.runtime()
    nan_in_col0 = np.array([[np.nan, 1, 1, 1]], np.float32)  # weights (0, 0) and (1, 0) kept at level 0 only
    out1 = rt.run(nan_in_col0, level=1)[0]
    assert np.isfinite(out1).all()  # at level 1 nothing reads column 0
    with torch.no_grad():
        assert torch.isnan(model(torch.from_numpy(nan_in_col0), level=torch.tensor(1))).all()  # the dense form
    out0 = rt.run(nan_in_col0, level=0)[0]
    assert np.isnan(out0).all()  # kept weights see it
