"""Targets as users write them, translated for TVM 0.27 (which only takes dicts, kinds and tags).

Accepted: a ``tvm.target.Target``; a dict (``{"kind": "llvm", "mtriple": ...}``); a JSON string; a
tag (``"raspberry-pi/4b-aarch64"``, ``"nvidia/nvidia-a100"``); a board preset of ``BOARD_PRESETS``
(``"rpi4"``, ``"rpi5"``, ``"jetson-orin-cpu"``); a bare kind (``"llvm"``); or the classic string form
(``"llvm -mtriple=aarch64-linux-gnu -mattr=+neon"``, ``"cuda -arch=sm_80"``).

Two conventions, both because users expect them:
* a bare ``aarch64`` triple means 64-bit ARM Linux (``aarch64-linux-gnu``), the boards users deploy to;
* ``llvm`` with neither ``mtriple`` nor ``mcpu`` means *this* CPU (TVM's old ``-mcpu=native``): the
  host's mcpu and core count are filled in, so vector widths and MetaSchedule's ``num-cores`` are right.
"""

from __future__ import annotations

import json
import os
import shlex
from functools import lru_cache

import tvm
from tvm.target import Target, TargetKind, codegen

# Bare triples users type, and what they mean on the boards we deploy to.
_TRIPLE_ALIASES = {"aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}

# Short names for the boards users deploy to (64-bit OS, the CPU's own core; NEON on all).
# The Jetson's entry is its Arm CPU only (the GPU is a cuda target); num-cores is left to the caller
# there because Orin modules have 6 to 12 cores.
_ARM64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
BOARD_PRESETS: dict[str, dict] = {
    "rpi4": {**_ARM64, "mcpu": "cortex-a72", "num-cores": 4},  # Raspberry Pi 4 (BCM2711)
    "rpi5": {**_ARM64, "mcpu": "cortex-a76", "num-cores": 4},  # Raspberry Pi 5 (BCM2712)
    "jetson-orin-cpu": {**_ARM64, "mcpu": "cortex-a78ae"},  # NVIDIA Jetson Orin, CPU side
}


@lru_cache(maxsize=1)
def _tags() -> frozenset[str]:
    from tvm.target.tag import list_tags

    return frozenset(list_tags())


def _parse_classic(text: str) -> dict:
    kind, *opts = shlex.split(text)
    try:
        schema = TargetKind.options_from_name(kind)
    except Exception as err:  # TVM raises its own error type for an unknown kind
        raise ValueError(f"unknown target kind {kind!r} in {text!r}") from err
    out: dict = {"kind": kind}
    for opt in opts:
        if not opt.startswith("-"):
            raise ValueError(f"target {text!r}: expected '-key=value', got {opt!r}")
        key, eq, value = opt.lstrip("-").partition("=")
        ty = schema.get(key)
        if ty is None or key in ("kind", "host"):
            valid = ", ".join(
                sorted(k for k in schema if k not in ("kind", "host", "from_device", "target_device_type"))
            )
            raise ValueError(f"target {text!r}: unknown option '-{key}' for kind '{kind}'. Valid options: {valid}")
        if ty.startswith("Array"):
            out[key] = [v for v in value.split(",") if v]
        elif ty == "int":
            try:
                out[key] = int(value)
            except ValueError as err:
                raise ValueError(f"target {text!r}: option '-{key}' needs an integer, got {value!r}") from err
        elif ty == "bool":
            out[key] = (not eq) or value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = value
    return out


def _normalise(d: dict) -> dict:
    d = dict(d)
    kind = d.get("kind")
    if kind == "llvm":
        if "mtriple" in d:
            d["mtriple"] = _TRIPLE_ALIASES.get(d["mtriple"], d["mtriple"])
        elif "mcpu" not in d:
            host = Target.from_device(tvm.cpu())
            d.update(mtriple=str(host.attrs["mtriple"]))
            if "mcpu" in host.attrs:
                d["mcpu"] = str(host.attrs["mcpu"])
            d.setdefault("num-cores", os.cpu_count() or 1)
        elif "mcpu" in d and str(d["mcpu"]).startswith(("cortex-", "neoverse-", "apple-")):
            # an ARM cpu without a triple would give an x86 triple with an ARM cpu
            d["mtriple"] = "aarch64-linux-gnu"
    if kind == "cuda":
        if "arch" not in d:
            raise ValueError(
                "cuda target needs an architecture (e.g. 'cuda -arch=sm_80' or the tag 'nvidia/nvidia-a100'): "
                "without a GPU TVM falls back to sm_50, which current nvcc rejects"
            )
        d.setdefault("host", _normalise({"kind": "llvm"}))
    return d


def _check_cpu(spec: dict) -> dict:
    """LLVM prints "'x' is not a recognized processor (ignoring processor)" and compiles for a generic
    CPU: an unknown ``-mcpu`` is refused here, with the names LLVM knows for the triple, before TVM
    sees it (TVM logs its own "Error: ... using default -mcpu=generic" for some triples). A triple
    LLVM has no target for is refused too: building for it crashed the process (SIGSEGV)."""
    if spec.get("kind") != "llvm":
        return spec
    triple = str(spec.get("mtriple") or codegen.llvm_get_system_triple())
    # the probe logs TVM's "Error" line for a triple it rejects: only names LLVM does not list go there
    if triple.split("-")[0] not in codegen.llvm_get_targets() and not codegen.llvm_is_valid_cpu("generic", triple):
        raise ValueError(
            f"-mtriple={triple}: LLVM has no target for it (its architecture comes first, e.g. "
            f"aarch64-linux-gnu, x86_64-linux-gnu, armv7l-linux-gnueabihf, riscv64-linux-gnu)"
        )
    if not spec.get("mcpu"):
        return spec
    cpu = str(spec["mcpu"])
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        known = sorted(set(codegen.llvm_get_cpu_archlist(Target({"kind": "llvm", "mtriple": triple}))))
        raise ValueError(
            f"-mcpu={cpu} is not a CPU LLVM knows for {triple} (it would compile for a generic CPU); "
            f"known: {', '.join(known[:40])}{' ...' if len(known) > 40 else ''}"
        )
    return spec


def _checked(target: Target) -> Target:
    attrs = {k: target.attrs[k] for k in ("mcpu", "mtriple") if k in target.attrs}
    _check_cpu({"kind": target.kind.name, **attrs})
    return target


def parse_target(target) -> Target:
    """Any target form users know -> ``tvm.target.Target`` (see module docstring)."""
    if isinstance(target, Target):
        return _checked(target)
    if isinstance(target, dict):
        return Target(_check_cpu(_normalise(target)))
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a string, dict or tvm.target.Target, got {target!r}")
    text = target.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as err:
            raise ValueError(f"target {text!r} is not valid JSON: {err}") from err
        return Target(_check_cpu(_normalise(spec)))
    if text in BOARD_PRESETS:
        return Target(dict(BOARD_PRESETS[text]))
    if text in _tags():
        return _checked(Target(text))
    return Target(_check_cpu(_normalise(_parse_classic(text))))


def canonical(target) -> str:
    """A stable text form of the whole target (kind, triple, cpu, attributes, host): the key of tuning logs."""
    t = parse_target(target)
    return json.dumps(_plain(t.export()), sort_keys=True)


def _plain(obj):
    if isinstance(obj, Target):
        return _plain(obj.export())
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "Array":
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    return str(obj)


def is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def is_cross(target: Target) -> bool:
    """True when the code does not run on this machine (another triple)."""
    if target.kind.name != "llvm":
        return True
    host_triple = str(Target.from_device(tvm.cpu()).attrs["mtriple"]).split("-")[0]
    return str(target.attrs.get("mtriple", host_triple)).split("-")[0] != host_triple
