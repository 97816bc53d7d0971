"""Per-layer, per-level choice between the nested sparse kernel and a dense kernel (CPU).

XNNPACK switches to its sparse kernels past a fixed 2/3 of zeros; here the choice is measured. A
nested conv kernel in the flat layout can carry a dense path (``kernels.nested_conv2d_flat``,
``dense_levels``): at a chosen level it scatters the level's prefix of the packed weights into a
zeroed workspace and runs a register-blocked dense conv on it, so no second copy of the weights is
stored (DESIGN section 5). The choice is a per-kernel bit mask of levels compiled into the kernel
(a constant the kernel tests against the run-time level).

* ``choose(sparse_s, dense_s)``: the table (int8 ``[L]``, 1 = dense) from per-level timings: dense
  where it is faster than sparse by more than ``margin`` (noise on a shared machine).
* ``kernel_key(func, level_len)``: what a choice is keyed by in a tuning log: the kernel's
  structure and its level lengths (nnz per row per level), so a log never applies a choice to
  another layer.
* ``measure_choices(mod, target)``: times every nested conv kernel of a lowered, specialised module
  both ways at every level (real packed arrays, random input, default knobs) and returns the
  tables; ``tvm_nested.tune`` calls it and stores them in the log (``CHOICE_FILE``).
* ``apply_choices(mod, tables)``: re-specialises the kernels whose key has a table with a dense
  level; every other kernel stays all-sparse (the default when untuned).

Linear kernels have no dense path yet: they always run sparse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import tvm

from ..contract import ATTR_NUM_LEVELS, IS_SCHEDULED, as_target, call_sites
from .cpu import schedule_cpu, specialize_cpu
from .kernel import is_nested_kernel, kernel
from .spec import spec_of, to_json

CHOICE_FILE = "nested_choices.json"
CHOICE_VERSION = 1


def choose(sparse_s, dense_s, margin: float = 0.9) -> np.ndarray:
    """Table int8 ``[L]``: 1 where ``dense_s[l] < margin * sparse_s[l]`` (dense clearly faster)."""
    sparse_s = np.asarray(sparse_s, np.float64)
    dense_s = np.asarray(dense_s, np.float64)
    if sparse_s.shape != dense_s.shape or sparse_s.ndim != 1:
        raise ValueError(
            f"per-level timings must be two 1-D arrays of one length, got {sparse_s.shape} and {dense_s.shape}"
        )
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    return (dense_s < margin * sparse_s).astype(np.int8)


def has_dense_path(func) -> bool:
    """Kernels that can take a dense path: nested conv kernels in the flat layout."""
    spec = spec_of(func)
    return spec is not None and spec.op == "conv2d" and spec.layout == "flat"


def kernel_key(func, level_len) -> str:
    """Key of a choice: the all-sparse kernel's spec + the layer's level lengths (not its name)."""
    h = hashlib.sha1(to_json(dataclasses.replace(spec_of(func), dense_levels=())).encode())
    h.update(np.ascontiguousarray(level_len).tobytes())
    return h.hexdigest()[:20]


def _level_len_arg(func, args):
    names = [p.name for p in func.params]
    return args[names.index("level_len")].value.numpy()


def kernels_with_keys(mod) -> list[tuple[str, object, list, str]]:
    """(name, func, call-site args, key) of every kernel of ``mod`` that has a dense path."""
    sites = call_sites(mod)
    out = []
    for gv, func in mod.functions_items():
        if has_dense_path(func) and gv.name_hint in sites:
            args = sites[gv.name_hint]
            out.append((gv.name_hint, func, args, kernel_key(func, _level_len_arg(func, args))))
    return out


def with_dense_levels(func, levels):
    """The same conv kernel with ``levels`` on its dense path."""
    return kernel(dataclasses.replace(spec_of(func), dense_levels=tuple(levels)))


def apply_choices(mod, tables: dict | None) -> tuple[tvm.IRModule, dict[str, list[int]]]:
    """Re-specialise the kernels whose key has a table with a dense level. Returns the module and
    ``{kernel name: dense levels}`` for every kernel that has a dense path (empty list: sparse)."""
    tables = tables or {}
    mod = mod.clone()
    chosen = {}
    for name, func, _, key in kernels_with_keys(mod):
        table = tables.get(key)
        levels = [] if table is None else [lvl for lvl, v in enumerate(table) if int(v)]
        chosen[name] = levels
        if tuple(levels) != spec_of(func).dense_levels:
            mod.update_func(mod.get_global_var(name), with_dense_levels(func, levels).with_attr("global_symbol", name))
    return mod, chosen


def _time_kernel(func, target, args, levels, number, repeat) -> list[float]:
    ex = tvm.compile(schedule_cpu(func, target), target=target)
    dev = tvm.cpu()
    tensors = []
    for a, p in zip(args, func.params):
        if isinstance(a, tvm.ir.Constant):
            tensors.append(tvm.runtime.tensor(a.value.numpy(), dev))
        elif p.name == "level":
            tensors.append(None)
        else:
            shape = [int(d) for d in p.ty.shape]
            tensors.append(tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), dev))
    shape = [int(d) for d in func.params[-1].ty.shape]
    tensors.append(tvm.runtime.tensor(np.zeros(shape, "float32"), dev))
    f = ex.mod.time_evaluator("main", dev, number=number, repeat=repeat, min_repeat_ms=10)
    out = []
    for lvl in levels:
        call = [tvm.runtime.tensor(np.array(lvl, "int32"), dev) if t is None else t for t in tensors]
        out.append(float(min(f(*call).results)))
    return out


def measure_choices(
    mod, target, levels=None, *, number: int = 3, repeat: int = 3, margin: float = 0.9, progress=None
) -> dict[str, dict]:
    """Time every kernel of ``mod`` with a dense path, all-sparse and all-dense, at every level.

    Returns ``{key: {"name", "table", "sparse_s", "dense_s"}}`` (``table`` from ``choose``).
    Runs on this machine (local CPU); ``mod`` is lowered and specialised (``specialize_cpu``).
    """
    out = {}
    for name, func, args, key in kernels_with_keys(mod):
        num_levels = int(func.attrs[ATTR_NUM_LEVELS])
        lv = list(range(num_levels)) if levels is None else list(levels)
        sparse = with_dense_levels(func, ())
        dense = with_dense_levels(func, range(num_levels))
        sparse_s = _time_kernel(sparse, target, args, lv, number, repeat)
        dense_s = _time_kernel(dense, target, args, lv, number, repeat)
        full_s = [np.inf] * num_levels
        full_d = [np.inf] * num_levels
        for lvl, s, d in zip(lv, sparse_s, dense_s):
            full_s[lvl], full_d[lvl] = s, d
        table = choose(full_s, [d if np.isfinite(d) else np.inf for d in full_d], margin)
        out[key] = {"name": name, "table": table.tolist(), "sparse_s": sparse_s, "dense_s": dense_s, "levels": lv}
        if progress:
            progress(
                f"[tvm-nested choice] {name}: sparse "
                + "/".join(f"{s * 1e3:.3f}" for s in sparse_s)
                + " ms, dense "
                + "/".join(f"{d * 1e3:.3f}" for d in dense_s)
                + f" ms -> {table.tolist()}"
            )
    return out


def save_choices(log_dir, measured: dict, target: str) -> Path:
    """Merge ``measured`` into ``log_dir/CHOICE_FILE`` (atomically)."""
    path = Path(log_dir) / CHOICE_FILE
    data = load_choices_file(path)
    data["version"] = CHOICE_VERSION
    data["target"] = target
    data.setdefault("kernels", {}).update(measured)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def load_choices_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"version": CHOICE_VERSION, "kernels": {}}
    data = json.loads(path.read_text())
    if int(data.get("version", 0)) != CHOICE_VERSION:
        raise ValueError(f"{path}: choice table version {data.get('version')} != {CHOICE_VERSION}")
    return data


def load_choices(log_dir) -> dict[str, list[int]]:
    """``{key: table}`` from a tuning log directory (empty when it has no choice file)."""
    if log_dir is None:
        return {}
    data = load_choices_file(Path(log_dir) / CHOICE_FILE)
    return {k: v["table"] for k, v in data.get("kernels", {}).items()}


def specialize_module(mod, target, tables: dict | None = None):
    """``specialize_cpu`` on every nested kernel of ``mod`` (llvm targets), then ``apply_choices``.

    What ``build`` and ``tune`` both run before tuning / applying a log, so a tuning log records
    the very kernels that are compiled. Returns ``(mod, {kernel: dense levels})``."""
    target = as_target(target)
    if target.kind.name != "llvm":
        return mod, {}
    mod = mod.clone()  # update_func below must not touch the caller's module
    for gv, func in list(mod.functions_items()):
        if not is_nested_kernel(func):
            continue
        if func.attrs is not None and bool(func.attrs.get(IS_SCHEDULED, False)):
            continue
        new = specialize_cpu(func, target)
        if new is not func:
            mod.update_func(gv, new.with_attr("global_symbol", gv.name_hint))
    return apply_choices(mod, tables)


__all__ = [
    "CHOICE_FILE",
    "apply_choices",
    "choose",
    "has_dense_path",
    "kernel_key",
    "kernels_with_keys",
    "load_choices",
    "measure_choices",
    "save_choices",
    "specialize_module",
]
