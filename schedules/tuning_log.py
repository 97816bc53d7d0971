"""Tuning logs (DESIGN section 6): a directory = MetaSchedule's JSON database + a small manifest.

The manifest binds the log to the whole target in canonical form (not just its kind: a log applied
to another CPU is wrong, apache/tvm#15549), to the nested format's version and to TVM's version.
One directory serves one target. Tuning again appends records (MetaSchedule's JSON database writes
one line per measured record, so an interrupted run keeps everything measured before it); nothing
here ever rewrites or deletes a user's records.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import tvm

from ..contract import FORMAT_VERSION
from ..target import canonical

MANIFEST = "tvm_nested_manifest.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


def _tvm_series(version: str) -> str:
    """Schedules and traces are compatible within a release series (0.27.x)."""
    return ".".join(version.split(".")[:2])


@dataclass(frozen=True)
class Manifest:
    target: str  # canonical JSON of the whole target
    tvm_version: str
    format_version: int

    @staticmethod
    def current(target) -> Manifest:
        return Manifest(canonical(target), tvm.__version__, int(FORMAT_VERSION))


class TuningLogError(ValueError):
    """A tuning log that cannot serve this build: another target, another version, or damaged."""


def _read_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads((path / MANIFEST).read_text())
        return Manifest(str(raw["target"]), str(raw["tvm_version"]), int(raw["format_version"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TuningLogError(f"tuning log {str(path)!r}: unreadable manifest {MANIFEST}: {err}") from err


def check(work_dir: str | os.PathLike, target) -> Path:
    """An existing log for ``target``; TuningLogError saying why it cannot be used."""
    path = Path(work_dir)
    if not (path / MANIFEST).is_file():
        if path.is_dir() and (path / RECORD_FILE).exists():
            raise TuningLogError(
                f"{str(path)!r} holds MetaSchedule records but no {MANIFEST}: not a tvm_nested tuning "
                "log (its target and versions are unknown, so it is not applied)"
            )
        raise TuningLogError(f"no tuning log at {str(path)!r} (expected {MANIFEST} written by tvm_nested.tune)")
    have, want = _read_manifest(path), Manifest.current(target)
    if have.target != want.target:
        raise TuningLogError(
            f"tuning log {str(path)!r} was made for target {have.target}, not {want.target}: "
            "records tuned for one target are wrong for another; tune into a new directory"
        )
    if _tvm_series(have.tvm_version) != _tvm_series(want.tvm_version):
        raise TuningLogError(
            f"tuning log {str(path)!r} was made with TVM {have.tvm_version}; this is TVM {want.tvm_version}"
        )
    if have.format_version != want.format_version:
        raise TuningLogError(
            f"tuning log {str(path)!r} was made for nested format v{have.format_version}; "
            f"this tvm_nested uses v{want.format_version}"
        )
    return path


def open_for_tuning(work_dir: str | os.PathLike, target) -> Path:
    """Create a log for ``target`` or reuse one made for it (records are appended, never dropped)."""
    path = Path(work_dir)
    if (path / MANIFEST).is_file():
        return check(path, target)
    if path.exists() and any(path.iterdir()):
        raise TuningLogError(f"{str(path)!r} exists and is not a tvm_nested tuning log: refusing to write into it")
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(Manifest.current(target)), indent=1))
    os.replace(tmp, path / MANIFEST)
    return path


def database(path: Path):
    """MetaSchedule's JSON database over the log (files created on first write)."""
    from tvm.s_tir import meta_schedule as ms

    _repair_torn_tail(path / RECORD_FILE)
    _repair_torn_tail(path / WORKLOAD_FILE)
    return ms.database.JSONDatabase(work_dir=str(path))


def _repair_torn_tail(file: Path) -> None:
    """A run killed mid-write can leave half a line at the end; keep every complete record.

    The torn bytes are moved to ``<file>.torn`` (appended), never silently dropped.
    """
    if not file.is_file():
        return
    data = file.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail)
        with file.open("ab") as f:  # a complete last record without its newline: just terminate it
            f.write(b"\n")
        return
    except ValueError:
        pass
    with (file.parent / (file.name + ".torn")).open("ab") as f:
        f.write(tail + b"\n")
    with file.open("r+b") as f:
        f.truncate(cut)
