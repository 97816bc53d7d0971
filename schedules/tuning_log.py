"""Tuning logs (DESIGN section 6): a directory = MetaSchedule's JSON database + a small manifest.

The manifest binds the log to the whole target in canonical form (not just its kind: a log applied
to another CPU is wrong, apache/tvm#15549), to the nested format's version and to TVM's version.
One directory serves one target. Tuning again appends records; nothing here ever rewrites or
deletes a user's records.

How a log survives concurrency and damage:

* Readers (``database``: ``build``, ``compile --tuning-log``) never write into the log. They read
  the JSON lines themselves, check each one, and hand MetaSchedule a clean in-memory database;
  TVM's own JSON loader never sees a line (it crashed on a blank line and on a record pointing past
  the workloads). A line that is torn, blank, not JSON, not UTF-8 or not a record MetaSchedule can
  parse is skipped with one ``TuningLogWarning`` per file naming the file and its line numbers.
* One writer at a time: ``open_for_tuning`` takes an exclusive ``flock`` on ``tvm_nested.lock`` for
  as long as the writer is open (the kernel drops it when the process dies, even by SIGKILL); a
  second ``tune`` on the same log is refused, naming the process that holds it.
* Records are appended whole: one ``write`` of the complete line and its newline on a file opened
  ``O_APPEND`` (MetaSchedule's own database writes the record and the newline separately, so a
  reader could see half a line). A torn last line left by a killed run is terminated by the next
  writer so that new records start on a line of their own; the torn bytes stay where they were.
* Symlinks, and anything but a regular file where the log keeps its files, are refused: a log is
  opened ``O_NOFOLLOW`` and checked with ``fstat``, so neither a planted link nor a directory or a
  FIFO named like a record file is followed, written through or silently ignored.

The line formats are MetaSchedule's (``JSONDatabase``): a workload line is ``[shash, base64 IR]``,
a record line ``[workload line index, record]``, the index counting every line of the workload file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..contract import FORMAT_VERSION
from ..target import canonical

MANIFEST = "tvm_nested_manifest.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
LOCK_FILE = "tvm_nested.lock"  # flock'ed by the one writer; holds its pid
LOGS_DIR = "logs"  # MetaSchedule's own log files (tune_tir writes them under work_dir/logs)
KNOBS_FILE = "nested_knobs.json"  # the nested kernels' tuned CPU knobs (schedules/knob_table.py)
# the names the log keeps; each must be a regular file (LOGS_DIR a directory of regular files)
LOG_FILES = (MANIFEST, WORKLOAD_FILE, RECORD_FILE, KNOBS_FILE, LOCK_FILE)
MAX_DAMAGE_LISTED = 8  # damaged lines named per warning (the count says how many more)


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


class TuningLogWarning(UserWarning):
    """Lines of a tuning log that were skipped (torn, blank or unreadable); the message names them."""


# ------------------------------------------------------------------------------ safe file access
def _where(path: Path) -> str:
    return f"tuning log {str(path)!r}"


def scan(path: str | os.PathLike) -> Path:
    """Refuse a log holding a symlink or a non-regular file (TuningLogError naming it).

    The log directory itself may be reached through a link; what is inside may not: a record file
    linked to a user's file would be appended to (or, by older versions, truncated), a planted link
    at a temporary name would be written through, and a directory named like a record file would be
    silently ignored.
    """
    path = Path(path)
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return path
    except NotADirectoryError as err:
        raise TuningLogError(f"{_where(path)} is not a directory") from err
    except OSError as err:
        raise TuningLogError(f"{_where(path)}: cannot list it: {err}") from err
    for entry in entries:
        _check_entry(path, entry, inside_logs=False)
    return path


def _check_entry(log: Path, entry: os.DirEntry, *, inside_logs: bool) -> None:
    name = entry.name if not inside_logs else f"{LOGS_DIR}/{entry.name}"
    if entry.is_symlink():
        raise TuningLogError(
            f"{_where(log)}: {name} is a symbolic link; a tuning log holds no links (they would be read or "
            "written through): remove it"
        )
    mode = entry.stat(follow_symlinks=False).st_mode
    if not inside_logs and entry.name == LOGS_DIR:
        if not stat.S_ISDIR(mode):
            raise TuningLogError(f"{_where(log)}: {LOGS_DIR} is not a directory")
        for sub in os.scandir(entry.path):
            _check_entry(log, sub, inside_logs=True)
        return
    if stat.S_ISREG(mode):
        return
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    if inside_logs or entry.name in LOG_FILES or not stat.S_ISDIR(mode):
        raise TuningLogError(f"{_where(log)}: {name} is {kind}; a tuning log keeps regular files only: remove it")


def _open_regular(file: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that follows no link and accepts only a regular file (a FIFO does not block)."""
    try:
        fd = os.open(file, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TuningLogError(f"{_where(file.parent)}: {file.name} is a symbolic link: remove it") from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TuningLogError(f"{_where(file.parent)}: {file.name} is not a regular file: remove it")
    os.set_blocking(fd, True)
    return fd


def read_bytes(file: Path) -> bytes | None:
    """The bytes of a log file (None when it does not exist), never through a link."""
    try:
        fd = _open_regular(file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise TuningLogError(f"{_where(file.parent)}: cannot read {file.name}: {err}") from err
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_json(file: Path, *, what: str):
    """A whole-file JSON document of the log (the manifest, the knob table); None when absent."""
    data = read_bytes(file)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise TuningLogError(f"{_where(file.parent)}: {file.name} ({what}) is not UTF-8 text: {err}") from err
    except ValueError as err:
        line = getattr(err, "lineno", None)
        at = f" line {line}" if line else ""
        raise TuningLogError(f"{_where(file.parent)}: {file.name}{at} ({what}) is not valid JSON: {err}") from err


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ------------------------------------------------------------------------------------ manifest
def _read_manifest(path: Path) -> Manifest:
    raw = read_json(path / MANIFEST, what="the manifest")
    try:
        return Manifest(str(raw["target"]), str(raw["tvm_version"]), int(raw["format_version"]))
    except (KeyError, TypeError, ValueError) as err:
        raise TuningLogError(f"{_where(path)}: unreadable manifest {MANIFEST}: {err!r}") from err


def check(work_dir: str | os.PathLike, target) -> Path:
    """An existing log for ``target``; TuningLogError saying why it cannot be used."""
    path = scan(work_dir)
    if not path.is_dir():
        raise TuningLogError(f"no tuning log at {str(path)!r} (expected a directory written by tvm_nested.tune)")
    if not (path / MANIFEST).exists():
        if (path / RECORD_FILE).exists():
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
    knobs = read_json(path / KNOBS_FILE, what="the knob table")
    if knobs is not None and not (isinstance(knobs, dict) and isinstance(knobs.get("kernels", {}), dict)):
        raise TuningLogError(f"{_where(path)}: {KNOBS_FILE} is not a knob table (a JSON object with 'kernels')")
    return path


# --------------------------------------------------------------------------------- the records
@dataclass
class LogContents:
    """What a reader found: the usable workloads and records, and every damaged line."""

    workloads: dict[int, object] = field(default_factory=dict)  # workload line index -> Workload
    records: list = field(default_factory=list)  # TuningRecord
    damage: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line number from 1, why)
    workload_lines: int = 0  # lines in the workload file, the torn tail included
    torn_workload_tail: bool = False
    torn_record_tail: bool = False


def _lines(data: bytes | None) -> tuple[list[bytes], bool]:
    """The lines of a file and whether its last one lacks its newline (torn, or being written)."""
    if not data:
        return [], False
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    if not torn:
        lines.pop()
    return lines, torn


def _parse(line: bytes, torn: bool):
    """A line as JSON, or (None, why)."""
    if torn:
        return None, "incomplete last line (a run killed mid-write, or a tune writing into the log now)"
    if not line.strip():
        return None, "blank line"
    try:
        return json.loads(line.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as err:
        return None, f"not JSON ({err})"


def read_log(path: Path) -> LogContents:
    """Every workload and record of the log that MetaSchedule can parse; the rest as ``damage``."""
    out = LogContents()
    # records first: a writer appends a workload before any record of it, so every record read
    # here finds its workload in the (later, longer) read of the workload file
    rec_lines, out.torn_record_tail = _lines(read_bytes(path / RECORD_FILE))
    wl_lines, out.torn_workload_tail = _lines(read_bytes(path / WORKLOAD_FILE))
    out.workload_lines = len(wl_lines)
    for i, line in enumerate(wl_lines):
        obj, why = _parse(line, out.torn_workload_tail and i == len(wl_lines) - 1)
        if why is None and not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(v, str) for v in obj)):
            why = "not a workload ([hash, module])"
        if why is None:
            try:
                out.workloads[i] = ms.database.Workload.from_json(obj)
            except Exception as err:  # TVM's own check of the module: the line is damaged
                why = f"MetaSchedule cannot read the workload ({_first_line(err)})"
        if why is not None:
            out.damage.append((WORKLOAD_FILE, i + 1, why))
    for i, line in enumerate(rec_lines):
        obj, why = _parse(line, out.torn_record_tail and i == len(rec_lines) - 1)
        if why is None and not (
            isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is int and isinstance(obj[1], list)
        ):
            why = "not a record ([workload index, record])"
        if why is None and obj[0] not in out.workloads:
            why = (
                f"its workload (line {obj[0] + 1} of {WORKLOAD_FILE}) is damaged"
                if 0 <= obj[0] < out.workload_lines
                else f"refers to workload index {obj[0]}, but {WORKLOAD_FILE} has {out.workload_lines} lines"
            )
        if why is None:
            try:
                out.records.append(ms.database.TuningRecord.from_json(obj[1], out.workloads[obj[0]]))
            except Exception as err:
                why = f"MetaSchedule cannot read the record ({_first_line(err)})"
        if why is not None:
            out.damage.append((RECORD_FILE, i + 1, why))
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:200]


def warn_damage(path: Path, damage: list[tuple[str, int, str]], stacklevel: int = 3) -> None:
    """One TuningLogWarning per damaged file, naming it and its damaged lines."""
    for name in sorted({d[0] for d in damage}):
        lines = [d for d in damage if d[0] == name]
        listed = "; ".join(f"line {n}: {why}" for _, n, why in lines[:MAX_DAMAGE_LISTED])
        more = f"; and {len(lines) - MAX_DAMAGE_LISTED} more" if len(lines) > MAX_DAMAGE_LISTED else ""
        warnings.warn(
            f"{_where(path)}: skipped {len(lines)} damaged line(s) of {name} ({listed}{more}); "
            "every other record is used",
            TuningLogWarning,
            stacklevel=stacklevel,
        )


def database(path: str | os.PathLike):
    """A read-only, in-memory MetaSchedule database of the log's usable records (damage warned).

    Nothing is written into the log, so a read-only log, or one a ``tune`` is appending to, serves
    a build as well as any other.
    """
    path = scan(path)
    contents = read_log(path)
    warn_damage(path, contents.damage)
    db = ms.database.MemoryDatabase()
    for workload in contents.workloads.values():
        db.commit_workload(workload.mod)
    for record in contents.records:
        db.commit_tuning_record(record)
    return db


# ---------------------------------------------------------------------------------- the writer
@derived_object
class AppendingDatabase(ms.database.PyDatabase):
    """MetaSchedule's database over a log opened for tuning: queries from memory, every commit
    appended to the log's files as one whole line (see the module docstring)."""

    def __init__(self, path: Path, contents: LogContents):
        super().__init__()
        self.path = path
        self.memory = ms.database.MemoryDatabase()
        self.index: dict[str, list[tuple[object, int]]] = {}  # workload hash -> [(Workload, line)]
        self.lines = contents.workload_lines
        for line, workload in sorted(contents.workloads.items()):
            self._remember(workload, line)
            self.memory.commit_workload(workload.mod)
        for record in contents.records:
            self.memory.commit_tuning_record(record)
        self.fds = {}
        # a torn last line (a run killed mid-write) is closed off, so that the next record starts a
        # line of its own: the torn bytes stay, as one damaged line that readers skip
        for name, torn in ((WORKLOAD_FILE, contents.torn_workload_tail), (RECORD_FILE, contents.torn_record_tail)):
            self.fds[name] = _open_regular(path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            if torn:
                _write_all(self.fds[name], b"\n")

    def _remember(self, workload, line: int) -> None:
        self.index.setdefault(str(workload.as_json()[0]), []).append((workload, line))

    def _line_of(self, mod) -> int | None:
        key = str(ms.database.Workload(mod).as_json()[0])
        for workload, line in self.index.get(key, []):
            if tvm_ffi.structural_equal(workload.mod, mod):
                return line
        return None

    def _append(self, name: str, obj) -> None:
        _write_all(self.fds[name], (json.dumps(obj, separators=(",", ":")) + "\n").encode())

    def has_workload(self, mod) -> bool:
        return self._line_of(mod) is not None

    def commit_workload(self, mod):
        if self._line_of(mod) is None:
            workload = ms.database.Workload(mod)
            self._append(WORKLOAD_FILE, workload.as_json())
            self._remember(workload, self.lines)
            self.lines += 1
        return self.memory.commit_workload(mod)

    def commit_tuning_record(self, record) -> None:
        line = self._line_of(record.workload.mod)
        if line is None:  # MetaSchedule commits the workload first; be safe all the same
            self.commit_workload(record.workload.mod)
            line = self.lines - 1
        self._append(RECORD_FILE, [line, record.as_json()])
        self.memory.commit_tuning_record(record)

    def get_top_k(self, workload, top_k: int) -> list:
        return self.memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list:
        return self.memory.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self.memory)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


class TuningLogWriter:
    """A log opened for tuning: the exclusive lock, the appending database, atomic JSON files.

    ``with open_for_tuning(dir, target) as log: ... log.database ...``; closing releases the lock.
    """

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd
        self._db: AppendingDatabase | None = None

    @property
    def database(self) -> AppendingDatabase:
        if self._db is None:
            contents = read_log(self.path)
            warn_damage(self.path, contents.damage)
            self._db = AppendingDatabase(self.path, contents)
        return self._db

    def replace_json(self, name: str, data) -> Path:
        """Write the log file ``name`` as a whole, atomically: a fresh temporary file (``mkstemp``:
        O_EXCL, so no planted name is written through) renamed over it."""
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.path / name

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> TuningLogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _lock(path: Path) -> int:
    fd = _open_regular(path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TuningLogError(
            f"{_where(path)} is being written by another tune (pid {holder}): one writer at a time; wait for "
            "it to finish, or tune into another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_for_tuning(work_dir: str | os.PathLike, target) -> TuningLogWriter:
    """Create a log for ``target`` or reuse one made for it, locked for this writer (records are
    appended, never dropped). TuningLogError when another process is tuning into it."""
    path = scan(work_dir)
    if path.exists() and not path.is_dir():
        raise TuningLogError(f"{str(path)!r} exists and is not a directory: refusing to write a tuning log there")
    if (path / MANIFEST).exists():
        check(path, target)
    elif path.exists() and any(e.name != LOCK_FILE for e in os.scandir(path)):
        raise TuningLogError(f"{str(path)!r} exists and is not a tvm_nested tuning log: refusing to write into it")
    path.mkdir(parents=True, exist_ok=True)
    writer = TuningLogWriter(path, _lock(path))
    try:
        scan(path)  # again, under the lock: nothing planted in between
        if not (path / MANIFEST).exists():
            writer.replace_json(MANIFEST, asdict(Manifest.current(target)))
        return writer
    except BaseException:
        writer.close()
        raise


__all__ = [
    "KNOBS_FILE",
    "LOCK_FILE",
    "LOGS_DIR",
    "MANIFEST",
    "RECORD_FILE",
    "WORKLOAD_FILE",
    "AppendingDatabase",
    "LogContents",
    "Manifest",
    "TuningLogError",
    "TuningLogWarning",
    "TuningLogWriter",
    "check",
    "database",
    "open_for_tuning",
    "read_bytes",
    "read_json",
    "read_log",
    "scan",
    "warn_damage",
]
