"""CUDA: the nested schedules built and inspected on this GPU-less machine, run where a GPU exists.

Without a GPU: every nested kernel is scheduled (thread-bound, shared memory within the target's
limits), the whole model builds into one module for ``cuda -arch=sm_80`` and the A100 tag, the
CUDA source compiles to PTX with nvcc, and ``export_library`` writes a host library holding it.
With a GPU (marker ``gpu``, gated by a probe that never raises): every level runs on the device and
is compared with PyTorch / onnxruntime / the NumPy references.
"""

import importlib.util
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch
import tvm
from ir_checks import run_pipeline, thread_tags
from nested_kernels import nested_conv2d, nested_linear
from torch import nn

import tvm_nested
from tvm_nested.authoring import nn as tnn
from tvm_nested.schedules import NestedCSR
from tvm_nested.schedules import reference as ref
from tvm_nested.schedules.cuda import (
    CUDA_KNOBS,
    CUDAKnobs,
    _space_fn,
    cuda_space,
    default_knobs,
    launch_shape,
    schedule_cuda,
    target_family,
    target_limits,
)
from tvm_nested.target import parse_target

SM80 = "cuda -arch=sm_80"
DENSITIES = (0.5, 0.2, 0.1)


# ------------------------------------------------------------------------------------ probes
def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _gpu_probe() -> tuple[bool, str]:
    """(usable, why not): a CUDA device and a way to compile CUDA source at load time. Never raises."""
    try:
        if not tvm.cuda(0).exist:
            return False, "no CUDA GPU visible to TVM (tvm.cuda(0).exist is False)"
    except Exception as err:  # no libcuda / TVM built without the CUDA runtime
        return False, f"TVM has no CUDA runtime here: {type(err).__name__}: {err}"
    if importlib.util.find_spec("cuda") is not None or _nvcc() is not None:
        return True, ""
    return False, "a GPU is present but neither cuda-bindings (NVRTC) nor nvcc can compile CUDA source"


GPU_OK, GPU_WHY = _gpu_probe()
gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")


# ------------------------------------------------------------------------------------ helpers
def _cuda_modules(mod) -> list:
    out, stack = [], [mod]
    while stack:
        cur = stack.pop()
        if cur.kind == "cuda":
            out.append(cur)
        stack.extend(cur.imports)
    return out


def _cuda_source(executable) -> str:
    (cuda,) = _cuda_modules(executable.mod)
    return cuda.inspect_source("")


def _kernels(src: str) -> dict[str, dict]:
    """__global__ name -> {threads: launch bound, shared: bytes of static shared memory}."""
    out = {}
    for m in re.finditer(r"__global__ void __launch_bounds__\((\d+)\) (\w+)\([^)]*\) \{(.*?)\n\}", src, re.S):
        shared = sum(
            {"float": 4, "int": 4, "half": 2, "uchar": 1, "ushort": 2}.get(t, 4) * int(n)
            for t, n in re.findall(r"__shared__ alignas\(\d+\) (\w+) \w+\[(\d+)\];", m.group(3))
        )
        out[m.group(2)] = {"threads": int(m.group(1)), "shared": shared}
    return out


def _nested_names(mod: tvm.IRModule) -> list[str]:
    return [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "nested.op" in f.attrs
    ]


def _close(got, want, tol=1e-4):
    scale = max(float(np.max(np.abs(want))), 1.0)
    assert float(np.max(np.abs(got - want))) <= tol * scale, f"max err {np.max(np.abs(got - want))}"


class ConvNet(nn.Module):
    """conv (padded), grouped strided conv with bias, 1x1 conv, linear: every kernel variant."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4),
            nn.ReLU(),
            nn.Conv2d(32, 24, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(24 * 5 * 5, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


NESTED = ["features.0", "features.2", "features.4", "head"]


@pytest.fixture(scope="module")
def torch_case():
    torch.manual_seed(0)
    model = tnn.nest(ConvNet().eval(), {name: DENSITIES for name in NESTED}).eval()
    x = torch.randn(1, 3, 10, 10)
    mod = tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)})
    t0 = time.time()
    lib = tvm_nested.build(mod, target=SM80)
    return model, x, mod, lib, time.time() - t0


@pytest.fixture(scope="module")
def squeezenet_case():
    from tvm_nested.authoring.zoo import nested

    model = nested("squeezenet", densities=(0.5, 0.2, 0.1, 0.05), seed=0)
    mod = tvm_nested.from_onnx(model)
    return model, mod, tvm_nested.build(mod, target=SM80)


# ------------------------------------------------------------------------ single kernels
def _fmt(rows, cols, levels=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lm = rng.integers(-1, levels, (rows, cols))
    return w, lm, NestedCSR.pack(w, lm, levels)


# (id, factory args) -> the kernels the rule must handle, with whether x fits shared memory
LINEAR_CASES = {
    "gemv": (64, 200, 1, True),
    "batch2": (48, 300, 2, True),
    "gemv-x-too-big": (10, 20000, 1, False),  # 80 KB of x: read from global memory
}
CONV_CASES = {  # O, C, HW, k, stride, pad, groups
    "3x3-pad": (32, 16, 13, 3, 1, 1, 1),
    "grouped-stride2": (32, 16, 14, 3, 2, 1, 4),
    "depthwise": (32, 32, 13, 3, 1, 1, 32),
    "1x1": (64, 64, 13, 1, 1, 0, 1),
    "wide-rows": (16, 8, 96, 3, 1, 1, 1),  # OW=96 > 64 positions: one output row per tile
}


def _linear(case):
    rows, cols, batch, _ = LINEAR_CASES[case]
    w, lm, fmt = _fmt(rows, cols)
    return nested_linear(fmt, batch, True), (w, lm, fmt)


def _conv(case):
    o, c, hw, k, s, p, g = CONV_CASES[case]
    w, lm, fmt = _fmt(o, c // g * k * k)
    func = nested_conv2d(fmt, (1, c, hw, hw), (k, k), (s, s), (p, p, p, p), (1, 1), g, True)
    return func, (w, lm, fmt)


def _kernel(case):
    return _linear(case) if case in LINEAR_CASES else _conv(case)


ALL_CASES = list(LINEAR_CASES) + list(CONV_CASES)


@pytest.mark.parametrize("target", [SM80, "nvidia/nvidia-a100"], ids=["sm_80", "a100-tag"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_kernel_schedule_within_target_limits(case, target):
    tgt = parse_target(target)
    func, _ = _kernel(case)
    scheduled = schedule_cuda(func, tgt)
    assert scheduled.attrs["tirx.is_scheduled"]
    src = _cuda_source(tvm.compile(scheduled, target=tgt))
    (kernel,) = _kernels(src).values()
    max_threads, max_shared, _ = target_limits(tgt)
    shape = launch_shape(func, tgt)
    assert kernel["threads"] == shape.threads <= max_threads
    assert kernel["shared"] <= max_shared
    if case in LINEAR_CASES:
        assert shape.threads_x == 32  # a warp per output row, reduced with shuffles
        assert "__shfl_down_sync" in src
        assert (kernel["shared"] > 0) == LINEAR_CASES[case][3]
    else:
        assert kernel["shared"] > 0  # every conv case's input window fits
    # the level is read inside the kernel: one launch serves every level
    assert "level_ptr[0]" in src and "level_len_ptr[" in src


def test_scheduling_keeps_the_input_function():
    func, _ = _linear("gemv")
    before = tvm.ir.save_json(func)
    schedule_cuda(func, parse_target(SM80))
    assert tvm.ir.save_json(func) == before


def test_rule_does_not_apply_elsewhere():
    func, _ = _linear("gemv")
    assert schedule_cuda(func, parse_target("llvm")) is None
    dense = tvm.te.create_prim_func([tvm.te.placeholder((4,), name="a")])
    assert schedule_cuda(dense, parse_target(SM80)) is None


def test_unscheduled_kernel_gives_no_device_code():
    """Why ``build`` refuses unscheduled kernels: TVM 0.27 compiles a PrimFunc with no thread
    binding for a cuda target into HOST code (no CUDA kernel at all), which would dereference
    device pointers on the CPU at run time. The scheduled one is a CUDA kernel."""
    func, _ = _linear("gemv")
    tgt = parse_target(SM80)
    assert _cuda_modules(tvm.compile(func, target=tgt).mod) == []
    assert len(_cuda_modules(tvm.compile(schedule_cuda(func, tgt), target=tgt).mod)) == 1


@pytest.mark.parametrize(
    "arch,family",
    [("sm_90", "sm_90"), ("sm_89", "sm_80"), ("sm_80", "sm_80"), ("sm_75", "sm_70"), ("sm_61", "generic")],
)
def test_knob_table(arch, family):
    tgt = parse_target(f"cuda -arch={arch}")
    assert target_family(tgt) == family
    assert default_knobs(tgt) is CUDA_KNOBS[family]


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"lanes": 24}, "power of two"),
        ({"lanes": 64}, "power of two"),
        ({"rows_per_block": 0}, "rows_per_block"),
        ({"shared_fraction": 0.0}, "shared_fraction"),
    ],
)
def test_knob_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        CUDAKnobs(**bad)


def test_staging_can_be_turned_off():
    func, _ = _conv("3x3-pad")
    tgt = parse_target(SM80)
    off = schedule_cuda(func, tgt, CUDAKnobs(stage_shared=False))
    (kernel,) = _kernels(_cuda_source(tvm.compile(off, target=tgt))).values()
    assert kernel["shared"] == 0


@pytest.mark.parametrize("case", ["gemv", "batch2", "3x3-pad", "depthwise"])
def test_space_samples_and_replays(case):
    """The ScheduleFn body: every sampled block shape compiles, and a trace replays with a new decision."""
    tgt = parse_target(SM80)
    func, _ = _kernel(case)
    fn = _space_fn(tgt)
    shapes = set()
    for seed in (1, 2, 3, 4):
        sch = tvm.s_tir.Schedule(func, seed=seed)
        fn(sch)
        (kernel,) = _kernels(_cuda_source(tvm.compile(sch.mod, target=tgt))).values()
        assert kernel["threads"] <= target_limits(tgt)[0]
        shapes.add(kernel["threads"])
    trace = sch.trace
    inst = next(i for i in trace.insts if i.kind.name == "SampleCategorical")
    other = (int(trace.decisions[inst]) + 1) % len(inst.attrs[0])
    replay = tvm.s_tir.Schedule(func)
    trace.with_decision(inst, other, remove_postproc=True).apply_to_schedule(replay, remove_postproc=True)
    tvm.compile(replay.mod, target=tgt)
    assert len(shapes) > 1  # the space really varies the launch shape
    assert cuda_space(tgt) is not None


# ------------------------------------------------------------------------ whole models
def test_model_every_nested_kernel_in_cuda_source(torch_case):
    _, _, mod, lib, _ = torch_case
    names = _nested_names(run_pipeline(mod))
    assert len(names) == len(NESTED)
    kernels = _kernels(_cuda_source(lib.executable))
    max_threads, max_shared, _ = target_limits(lib.target)
    for name in names:
        assert f"{name}_kernel" in kernels, f"{name} missing from the CUDA source"
    for name, k in kernels.items():
        assert 0 < k["threads"] <= max_threads, name
        assert k["shared"] <= max_shared, name
    assert lib.num_levels == len(DENSITIES)


def test_every_primfunc_scheduled(torch_case):
    """After our rule and the default CUDA legalisation (dlight), every PrimFunc is thread-bound."""
    _, _, mod, _, _ = torch_case
    mod = run_pipeline(mod, SM80, stop_after="schedule")
    funcs = [(gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) > len(NESTED)  # the dense remainder is there too
    for name, func in funcs:
        assert func.attrs is not None and func.attrs.get("tirx.is_scheduled", False), name
        assert thread_tags(func), f"{name} has no thread binding"


def test_build_reports_unscheduled_kernel(torch_case, monkeypatch):
    from tvm_nested.relay_passes import schedule

    _, _, mod, _, _ = torch_case
    monkeypatch.setattr(schedule, "NESTED_RULES", {})
    with pytest.raises(RuntimeError, match=r"no cuda schedule for \d+ function\(s\) \(4 nested kernels\): nested_"):
        tvm_nested.build(mod, target=SM80)


def test_a100_tag_builds_one_module(torch_case):
    _, _, mod, _, _ = torch_case
    lib = tvm_nested.build(mod, target="nvidia/nvidia-a100")
    assert lib.num_levels == len(DENSITIES)
    assert len(_cuda_modules(lib.executable.mod)) == 1
    assert '"arch": "sm_80"' in lib.info["target"]


@needs_nvcc
def test_model_cuda_source_compiles_to_ptx(torch_case):
    from tvm.support import nvcc

    _, _, mod, lib, _ = torch_case
    src = _cuda_source(lib.executable)
    with lib.target:
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch="sm_80", compiler="nvcc").decode()
    assert ".target sm_80" in ptx
    for name in _nested_names(run_pipeline(mod)):
        assert f".entry {name}_kernel" in ptx


def test_export_library_holds_cuda_source(torch_case, tmp_path):
    _, _, mod, lib, _ = torch_case
    path = lib.export_library(tmp_path / "net_cuda.so")
    blob = open(path, "rb").read()
    assert blob[:4] == b"\x7fELF"  # the host library, loadable where TVM's CUDA runtime is
    for name in _nested_names(run_pipeline(mod)):
        assert f"{name}_kernel".encode() in blob  # the CUDA source travels inside it


def test_squeezenet_every_nested_kernel(squeezenet_case, tmp_path):
    _, _, lib = squeezenet_case
    kernels = _kernels(_cuda_source(lib.executable))
    names = [n[: -len("_kernel")] for n in kernels if re.fullmatch(r"nested_conv2d\d*_kernel", n)]
    assert len(lib.info["layers"]) == 26  # every conv of squeezenet 1.0 (the classifier is a conv)
    assert len(names) == 26
    max_threads, max_shared, _ = target_limits(lib.target)
    for name in names:
        k = kernels[f"{name}_kernel"]
        assert 0 < k["threads"] <= max_threads and k["shared"] <= max_shared, (name, k)
    assert all(k["threads"] <= max_threads for k in kernels.values())
    assert os.path.getsize(lib.export_library(tmp_path / "squeezenet_cuda.so")) > 0


@needs_nvcc
def test_squeezenet_cuda_source_compiles_to_ptx(squeezenet_case):
    from tvm.support import nvcc

    _, _, lib = squeezenet_case
    src = _cuda_source(lib.executable)
    with lib.target:
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch="sm_80", compiler="nvcc").decode()
    for name in _kernels(src):
        assert f".entry {name}" in ptx


# ------------------------------------------------------------------------ on a real GPU
@pytest.fixture
def cuda_compile_path(monkeypatch):
    """Compile CUDA source at load time with nvcc when NVRTC (cuda-bindings) is not installed."""
    if importlib.util.find_spec("cuda") is None:
        monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ALL_CASES)
def test_gpu_kernel_every_level(case, cuda_compile_path):
    tgt = parse_target({"kind": "cuda", "arch": _device_arch()})
    func, (w, lm, fmt) = _kernel(case)
    ex = tvm.compile(schedule_cuda(func, tgt), target=tgt)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(1)
    if case in LINEAR_CASES:
        rows, cols, batch, _ = LINEAR_CASES[case]
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        out_shape = (batch, rows)
    else:
        _o, c, hw, k, s, p, g = CONV_CASES[case]
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        out_shape = tuple(int(d) for d in func.params[-1].ty.shape)
    bias = rng.standard_normal(fmt.rows).astype(np.float32)
    for level in range(fmt.num_levels):
        args = [x, *fmt.arrays(), bias, np.array(level, np.int32), np.zeros(out_shape, np.float32)]
        dev_args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
        ex["main"](*dev_args)
        got = dev_args[-1].numpy()
        if case in LINEAR_CASES:
            want = ref.nested_linear_ref(x, (w, lm), level, bias)
        else:
            want = ref.nested_conv2d_ref(x, (w, lm), level, (k, k), (s, s), (p, p, p, p), (1, 1), g, bias)
        _close(got, want)


def _device_arch() -> str:
    major, minor = tvm.cuda(0).compute_version.split(".")
    return f"sm_{major}{minor}"


@pytest.mark.gpu
@gpu
def test_gpu_torch_model_every_level(torch_case, cuda_compile_path, tmp_path):
    model, x, mod, _, _ = torch_case
    lib = tvm_nested.build(mod, target={"kind": "cuda", "arch": _device_arch()})
    path = lib.export_library(tmp_path / "net.so")
    for rt in (lib.runtime(tvm.cuda(0)), tvm_nested.load(path, device=tvm.cuda(0))):
        for level in range(lib.num_levels):
            want = model(x, level=torch.tensor(level)).detach().numpy()
            (got,) = rt.run(x.numpy(), level=level)
            _close(got, want)
        with pytest.raises(ValueError, match="out of range"):
            rt.run(x.numpy(), level=lib.num_levels)


@pytest.mark.gpu
@gpu
def test_gpu_squeezenet_every_level(squeezenet_case, cuda_compile_path):
    from tvm_nested.authoring.onnx_nest import ort_run
    from tvm_nested.authoring.zoo import example_input

    model, mod, _ = squeezenet_case
    lib = tvm_nested.build(mod, target={"kind": "cuda", "arch": _device_arch()})
    ((name, x),) = example_input(model).items()
    rt = lib.runtime(tvm.cuda(0))
    for level in range(lib.num_levels):
        (want,) = ort_run(model, {name: x}, level=level)
        (got,) = rt.run(x, level=level)
        _close(got, want)


# ------------------------------------------------------------------------------ paper families
@pytest.fixture(scope="module", params=["gat", "gnmt"])
def family_case(request):
    """GAT (its einsum once stopped dlight's GEMV rule) and GNMT (shared recurrent kernels)."""
    from tvm_nested.authoring import families
    from tvm_nested.authoring.pruning import PruningConfig, prune_model

    dense, inputs = families.build(request.param)
    nested = prune_model(dense, PruningConfig(DENSITIES))
    return nested, inputs, tvm_nested.from_torch(nested, inputs, {"level": torch.tensor(0)})


def test_family_builds_for_cuda_with_every_function_scheduled(family_case):
    _, _, mod = family_case
    lib = tvm_nested.build(mod, "cuda -arch=sm_80")  # ReportUnscheduled raises on GPU for anything left
    assert lib.num_levels == len(DENSITIES) and lib.info["layers"]


@pytest.mark.gpu
@gpu
def test_gpu_family_every_level(family_case, cuda_compile_path):
    nested, inputs, mod = family_case
    rt = tvm_nested.build(mod, target={"kind": "cuda", "arch": _device_arch()}).runtime(tvm.cuda(0))
    for level in range(len(DENSITIES)):
        with torch.no_grad():
            want = nested(*inputs, level=torch.tensor(level)).numpy()
        (got,) = rt.run(*[i.numpy() for i in inputs], level=level)
        _close(got, want)
