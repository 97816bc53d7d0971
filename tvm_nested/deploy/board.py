"""An emulated aarch64 edge board for TVM RPC: qemu-user + an arm64 Debian 12 sysroot.

No binfmt_misc, no chroot, no change to the host's dpkg: a private apt state resolves the arm64
closure of ``python3.11`` and ``dpkg -x`` unpacks it into ``sysroot/``; the aarch64 wheels
(apache-tvm matching the host's, apache-tvm-ffi pinned to the host's 0.1.14.x, ...) are installed
with ``pip install --platform manylinux_2_28_aarch64 --target``; ``bin/board-python`` runs that
interpreter under ``qemu-aarch64 -L sysroot`` with a scrubbed environment.

    env = ensure_board()                      # build once (cached), then instant and offline
    with Board(env) as board:
        tracker = board.start_tracker()       # TVM's tracker, on the host
        server = board.start_server(tracker=tracker.address, key="tvm-nested-board")
        ...                                   # rpc.connect(*server.address) / connect_tracker
    # leaving the block kills every process group it started

Layout of the cache directory (``default_cache_dir()`` unless given):
    downloads/apt/            private apt state: arm64 lists and .debs
    downloads/wheels-aarch64/ the aarch64 wheels
    sysroot/                  the board's root file system (+ ``.board-manifest.json``)
    bin/board-python          the board's python3.11 (host-side wrapper around qemu-aarch64)
    run/                      logs of running servers (one temporary folder per ``Board``)

Emulated timings are meaningless as performance numbers: the board checks the deployment
plumbing (cross-compiled code runs as aarch64 with the CPU's ISA), not the schedules' speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..contract import CROSS_TOOLCHAINS, TVM_FFI_BOARD_PIN, TVM_FFI_SERIES
from .remote import BoardError

BOARD_KEY = "tvm-nested-board"  # the tracker key the test fixtures and docs use
DEFAULT_CPU = "cortex-a72"  # Raspberry Pi 4: no SVE, so code the real board lacks dies (SIGILL)

# host executable or file -> Debian package that provides it: qemu, and the aarch64 cross
# toolchain (its compiler and a start file of its libc: gcc alone cannot link a .so)
_AARCH64 = CROSS_TOOLCHAINS["aarch64"]
HOST_TOOLS = {
    "qemu-aarch64": "qemu-user",
    _AARCH64.cc: _AARCH64.packages[0],
    _AARCH64.libc_file: _AARCH64.packages[1],
}

DEBIAN_SUITE = "bookworm"  # the board is Debian 12 arm64 whatever the host runs
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BOARD_DEBS = ("python3.11", "libstdc++6")  # the closure of these is the board's userland
BOARD_PY = "3.11"

# Board wheels: pinned to the host's installed versions (so host and board agree and the cache
# is keyed on them); the fallbacks apply only to packages the host lacks.
WHEEL_FALLBACKS = {
    "apache-tvm": "0.27.0.post1",
    "apache-tvm-ffi": TVM_FFI_BOARD_PIN,  # 0.1.15.x segfaults serialising TIR (contract.py)
    "numpy": "2.4.6",
    "ml_dtypes": "0.6.0",
    "psutil": "7.2.2",
    "cloudpickle": "3.1.2",
    "tornado": "6.6.1",
    "typing_extensions": "4.16.0",
}
# The sha256 of each aarch64 wheel the board installs, by pin: pip checks them (--require-hashes) on
# download and on install, so a tampered mirror or cache cannot put other code on the board. A pin
# not listed here (the host has another version) is pinned on first download: its hash is recorded
# in the cache (downloads/wheels-aarch64/SHA256SUMS), said in the log, and checked from then on.
WHEEL_SHA256 = {
    "apache-tvm==0.27.0.post1": "4acfdb7653e4e1ba7a707bdf2833db72eb8fda7d04d99141f2a4e1da43171fb7",
    "apache-tvm-ffi==0.1.14.post1": "c7a759781d4fbf2b99fa12f2741f250b882b06acc2747bb02831d491d1ac7d3c",
    "cloudpickle==3.1.3": "1654f4f18e416447210a63c5c25a135d65a292156aa5fa519dfa4baf7726dddb",
    "ml_dtypes==0.6.0": "7728c0420ec1c338564fc8b01015ff2d58567e70f17fedce5a0a7c0308c0d5b9",
    "numpy==2.4.6": "0ab0a9c4ffb1a6d95ef519fe4247dba8eb6b18ad93999f76b7f657039acabd47",
    "psutil==7.2.2": "b0726cecd84f9474419d67252add4ac0cd9811b04d61123054b9fb6f57df6e9e",
    "tornado==6.6.1": "da6ce2da215810d56539fa6cac77d9e27f4d8139c6868c53436b2fe933f43c79",
    "typing_extensions==4.16.0": "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
}
RECORDED_HASHES = "SHA256SUMS"  # in the wheels folder: hashes pinned on first download
WHEEL_PLATFORM = [
    "--only-binary=:all:", "--python-version", BOARD_PY, "--implementation", "cp",
    "--abi", "cp311", "--abi", "abi3", "--abi", "none",
    "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64",
    "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64",
    "--platform", "any",
]  # fmt: skip

# Bumped whenever the layout or the generated files change: forces a rebuild of the sysroot.
_LAYOUT_VERSION = 1

# Single-process variant of `python -m tvm.exec.rpc_server` (one tvm import instead of two, so a
# faster start and half the memory). Uses a private TVM 0.27 name, kept here only.
_INPROC_SERVER = """\
import sys, threading
from tvm.rpc.server import _popen_start_rpc_server
host, port, port_end, tracker, key = sys.argv[1:6]
tr = (tracker.rsplit(":", 1)[0], int(tracker.rsplit(":", 1)[1])) if tracker else None
_popen_start_rpc_server(host, int(port), int(port_end), False, tr, key)
threading.Event().wait()
"""


def log(msg: str) -> None:
    print(f"[board {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm-nested" / "board"


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardEnv:
    """A built board: where it lives and what is on it."""

    cache_dir: Path
    sysroot: Path
    python: Path  # bin/board-python: argv like python3.11's, runs the aarch64 interpreter
    wheels: dict = field(default_factory=dict)  # name -> version installed on the board

    @property
    def tvm_version(self) -> str:
        return self.wheels["apache-tvm"]

    def command(self, *args: str) -> list[str]:
        """argv running the board's python with ``args``."""
        return [str(self.python), *args]


def missing_host_tools() -> list[str]:
    """Debian packages still to install for the host side (qemu-user, the cross gcc)."""

    def present(what: str) -> bool:
        return os.path.exists(what) if what.startswith("/") else shutil.which(what) is not None

    return sorted({pkg for what, pkg in HOST_TOOLS.items() if not present(what)})


def install_host_tools(packages: list[str]) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BoardError(f"cannot install {' '.join(packages)}: needs root and apt-get")
    log(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env)


def board_wheels() -> dict[str, str]:
    """The pinned board wheels: the host's installed version of each, else the fallback."""
    from importlib.metadata import PackageNotFoundError, version

    pins = {}
    for name, fallback in WHEEL_FALLBACKS.items():
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            pins[name] = fallback
    if not pins["apache-tvm-ffi"].startswith(TVM_FFI_SERIES):
        log(
            f"host apache-tvm-ffi {pins['apache-tvm-ffi']} is not {TVM_FFI_SERIES}.x; the board gets "
            f"{WHEEL_FALLBACKS['apache-tvm-ffi']} (0.1.15.x crashes serialising TIR)"
        )
        pins["apache-tvm-ffi"] = WHEEL_FALLBACKS["apache-tvm-ffi"]
    return pins


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except subprocess.CalledProcessError as e:
        out = e.stderr or e.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise BoardError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{out[-3000:]}") from e
    except FileNotFoundError as e:
        raise BoardError(f"command not found: {cmd[0]}") from e


def _apt(state: Path) -> list[str]:
    """apt-get on a private arm64 state under ``state`` (the host's dpkg is never read/written)."""
    return ["apt-get", "-q", "-o", f"Dir={state}",
            "-o", f"Dir::State::status={state}/var/lib/dpkg/status",
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", "Debug::NoLocking=1", "-o", "Acquire::Languages=none",
            "-o", "APT::Install-Recommends=false"]  # fmt: skip


def _fetch_debs(downloads: Path) -> list[Path]:
    """Resolve and download the arm64 closure of BOARD_DEBS; return the .deb files."""
    state = downloads / "apt"
    for d in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "var/lib/dpkg/status").write_text("")  # empty: resolve the full closure
    if not Path(DEBIAN_KEYRING).exists():
        raise BoardError(f"{DEBIAN_KEYRING} missing: install debian-archive-keyring")
    src = f"[arch=arm64 signed-by={DEBIAN_KEYRING}]"
    (state / "etc/apt/sources.list").write_text(
        f"deb {src} {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
        f"deb {src} {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
        f"deb {src} {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main\n"
    )
    apt = _apt(state)
    if not list((state / "var/lib/apt/lists").glob("*_Packages*")):
        log(f"apt-get update (arm64 {DEBIAN_SUITE} lists)")
        _run([*apt, "update"], capture_output=True)
    sim = _run([*apt, "install", "-s", *BOARD_DEBS], capture_output=True, text=True).stdout
    # "Inst libc6 (2.36-9+deb12u10 Debian:12.11/stable [arm64])" -> libc6_2.36-9+deb12u10_arm64.deb
    archives = state / "var/cache/apt/archives"
    debs = [
        archives / f"{p}_{v.replace(':', '%3a')}_{a}.deb"
        for p, v, a in re.findall(r"^Inst (\S+) \((\S+) .*\[(arm64|all)\]\)", sim, re.M)
    ]
    if not debs:
        raise BoardError(f"apt resolved no packages for {BOARD_DEBS}:\n{sim[-2000:]}")
    if not all(d.exists() for d in debs):
        log(f"download {len(debs)} arm64 .debs (closure of {' '.join(BOARD_DEBS)})")
        _run([*apt, "install", "-y", "-d", *BOARD_DEBS], capture_output=True)
    missing = [d.name for d in debs if not d.exists()]
    if missing:
        raise BoardError(f"apt did not download: {missing}")
    return debs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _recorded(wheels: Path) -> dict[str, str]:
    """``name==version`` -> sha256 pinned on first download (RECORDED_HASHES)."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (wheels / RECORDED_HASHES).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                pin, digest = line.split()
                out[pin] = digest
    return out


def wheel_hashes(wheels: Path, pins: dict[str, str]) -> dict[str, str]:
    """The sha256 each pinned wheel must have: WHEEL_SHA256, else the one recorded on first download."""
    recorded = _recorded(wheels)
    return {
        f"{n}=={v}": WHEEL_SHA256.get(f"{n}=={v}") or recorded[f"{n}=={v}"]
        for n, v in pins.items()
        if f"{n}=={v}" in WHEEL_SHA256 or f"{n}=={v}" in recorded
    }


def requirements_file(wheels: Path, pins: dict[str, str]) -> Path:
    """A pip requirements file pinning every wheel by version and hash (pip --require-hashes)."""
    hashes = wheel_hashes(wheels, pins)
    missing = [f"{n}=={v}" for n, v in pins.items() if f"{n}=={v}" not in hashes]
    if missing:
        raise BoardError(f"no sha256 known or recorded for the board wheels {missing}")
    path = wheels / "requirements.txt"
    path.write_text("".join(f"{pin} --hash=sha256:{digest}\n" for pin, digest in hashes.items()))
    return path


def _record_first_download(wheels: Path, pins: dict[str, str]) -> None:
    """Pins without a hash in WHEEL_SHA256 are downloaded once without one; their files' hashes are
    recorded (and said) so that every later download and install is checked against them."""
    known = wheel_hashes(wheels, pins)
    new = {n: v for n, v in pins.items() if f"{n}=={v}" not in known}
    if not new:
        return
    reqs = [f"{n}=={v}" for n, v in new.items()]
    log(f"pip download aarch64 wheels without a known hash (pinned on first download): {' '.join(reqs)}")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", *WHEEL_PLATFORM, "-d", str(wheels), *reqs])
    lines = []
    for name, version in new.items():
        found = [p for p in wheels.glob("*.whl") if p.name.split("-")[:2] == [_norm(name), version]]
        if len(found) != 1:
            raise BoardError(f"expected one downloaded wheel for {name}=={version}, found {[p.name for p in found]}")
        digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
        log(f"recorded sha256 {digest} for {found[0].name}")
        lines.append(f"{name}=={version} {digest}\n")
    with open(wheels / RECORDED_HASHES, "a") as f:
        f.writelines(lines)


def _fetch_wheels(downloads: Path, pins: dict[str, str]) -> Path:
    wheels = downloads / "wheels-aarch64"
    wheels.mkdir(parents=True, exist_ok=True)
    _record_first_download(wheels, pins)
    req = requirements_file(wheels, pins)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", *WHEEL_PLATFORM, "-d", str(wheels)]
    pip += ["--require-hashes", "-r", str(req)]
    offline = subprocess.run([*pip, "--no-index", "--find-links", str(wheels), "-q"], capture_output=True)
    if offline.returncode != 0:
        log(f"pip download aarch64 wheels (checked by sha256): {' '.join(f'{n}=={v}' for n, v in pins.items())}")
        _run([*pip, "--progress-bar", "off"])
    return wheels


def wrapper_text(sysroot: Path, wrapper: Path) -> str:
    # The board python sees only this environment (an x86 PYTHONPATH or venv leaking in makes it
    # import x86 extension modules). Child interpreters (TVM's PopenWorker) come back through here
    # because sitecustomize points sys.executable at this script. The cache paths are quoted for the
    # shell as literal words (shlex.quote): a --cache-dir holding "$(...)", backquotes or quotes is
    # a name, never a command.
    python = shlex.quote(f"{sysroot}/usr/bin/python{BOARD_PY}")
    return f"""#!/bin/sh
# aarch64 python{BOARD_PY} of the emulated board (qemu-user). Generated by tvm_nested.board.
# QEMU_CPU picks the emulated core (default {DEFAULT_CPU}); TVM_NUM_THREADS passes through.
exec env -i HOME="${{HOME:-/}}" PATH=/usr/bin:/bin LANG=C.UTF-8 TMPDIR="${{TMPDIR:-/tmp}}" \\
  QEMU_CPU="${{QEMU_CPU:-{DEFAULT_CPU}}}" ${{TVM_NUM_THREADS:+TVM_NUM_THREADS=$TVM_NUM_THREADS}} \\
  PYTHONNOUSERSITE=1 BOARD_PYTHON={shlex.quote(str(wrapper))} \\
  qemu-aarch64 -L {shlex.quote(str(sysroot))} {python} "$@"
"""


_SITECUSTOMIZE = """\
# tvm_nested.board: without binfmt_misc the aarch64 ELF cannot be exec'd by a child process
# (ENOEXEC), so sys.executable names the host-side wrapper, which re-enters qemu.
import os as _os, sys as _sys
if _os.environ.get("BOARD_PYTHON"):
    _sys.executable = _os.environ["BOARD_PYTHON"]
"""


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def board_manifest(pins: dict[str, str]) -> dict:
    return {
        "layout": _LAYOUT_VERSION,
        "debian": DEBIAN_SUITE,
        "debs": list(BOARD_DEBS),
        "wheels": pins,
    }


@contextlib.contextmanager
def _locked(cache_dir: Path):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_board(
    cache_dir: str | os.PathLike | None = None,
    *,
    install_tools: bool = False,
    rebuild: bool = False,
) -> BoardEnv:
    """Build the board (idempotent, cached) and return it.

    A second call with the same host versions returns at once without touching the network.
    ``install_tools=True`` lets it ``apt-get install`` the host tools (qemu-user, the aarch64
    cross gcc) when they are missing; otherwise a missing tool raises ``BoardError`` naming the
    packages. ``rebuild=True`` re-extracts the sysroot from the downloads (offline if cached).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir = cache_dir.expanduser().resolve()
    need = missing_host_tools()
    if need and not install_tools:
        raise BoardError(
            f"missing host tools: install the Debian packages {' '.join(need)} "
            "(or allow it: ensure_board(install_tools=True) / "
            "`tvm-nested board setup --install-tools`)"
        )
    if need:
        install_host_tools(need)
    pins = board_wheels()
    want = board_manifest(pins)
    sysroot, wrapper = cache_dir / "sysroot", cache_dir / "bin" / "board-python"
    manifest_file = sysroot / ".board-manifest.json"
    env = BoardEnv(cache_dir, sysroot, wrapper, dict(pins))

    def current():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(manifest_file.read_text())
        return None

    def write_wrapper():  # atomic: a board process may be starting through the old one
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        tmp = wrapper.with_name(f".{wrapper.name}.{os.getpid()}")
        tmp.write_text(wrapper_text(sysroot, wrapper))
        tmp.chmod(0o755)
        os.replace(tmp, wrapper)

    def ready() -> bool:
        if rebuild or current() != want:
            return False
        # the wrapper bakes in absolute paths: a moved cache (e.g. a copied CI cache) needs a
        # new one, nothing else (the sysroot itself does not depend on where it lies)
        with contextlib.suppress(OSError):
            if wrapper.read_text() == wrapper_text(sysroot, wrapper):
                return True
        write_wrapper()
        return True

    if ready():
        return env
    with _locked(cache_dir):
        if ready():
            return env  # another process built it while we waited
        t0 = time.perf_counter()
        downloads = cache_dir / "downloads"
        debs = _fetch_debs(downloads)
        wheels = _fetch_wheels(downloads, pins)

        log(f"extract {len(debs)} .debs into a fresh sysroot")
        tmp = cache_dir / "sysroot.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for d in debs:
            _run(["dpkg-deb", "-x", str(d), str(tmp)])
        site = tmp / "usr/lib/python3/dist-packages"
        log(f"pip install {len(pins)} aarch64 wheels -> {site}")
        # host pip byte-compiles them with the host CPython (same 3.11 .pyc magic)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                str(wheels),
                "--no-deps",
                *WHEEL_PLATFORM,
                "--target",
                str(site),
                "--require-hashes",
                "-r",
                str(requirements_file(wheels, pins)),
            ]
        )
        stdlib = tmp / f"usr/lib/python{BOARD_PY}"
        custom = stdlib / "sitecustomize.py"  # Debian's is an absolute symlink into the HOST /etc
        custom.unlink(missing_ok=True)
        custom.write_text(_SITECUSTOMIZE)
        # byte-compile the stdlib on the host (fast) rather than on first use under emulation (slow)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "compileall",
                "-q",
                "-j0",
                "-x",
                "test|idlelib|lib2to3",
                str(stdlib),
            ],
            capture_output=True,
        )
        # the wrapper bakes in the final path of the sysroot
        shutil.rmtree(sysroot, ignore_errors=True)
        tmp.rename(sysroot)
        write_wrapper()

        log("smoke test: import tvm on the board")
        t1 = time.perf_counter()
        probe = "import platform, tvm, tvm_ffi; print(platform.machine(), tvm.__version__, tvm_ffi.__version__)"
        res = subprocess.run(env.command("-c", probe), capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise BoardError(f"the board cannot import tvm:\n{res.stderr[-3000:]}")
        log(f"board: {res.stdout.strip()} (import under emulation {time.perf_counter() - t1:.0f}s)")
        manifest_file.write_text(json.dumps(want, indent=1))
        log(
            f"board ready in {time.perf_counter() - t0:.0f}s: {cache_dir} "
            f"(downloads {dir_size(downloads) / 1e6:.0f} MB, sysroot "
            f"{dir_size(sysroot) / 1e6:.0f} MB)"
        )
    return env


def board_available(cache_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether ``ensure_board(cache_dir, install_tools=True)`` can work here. Never raises.

    True when the board is built, or when its prerequisites are there: the host tools (or root +
    apt-get to install them), apt-get and dpkg-deb, and, for a cold cache, the Debian and PyPI
    registries reachable.
    """
    try:
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        need = missing_host_tools()
        if need and (shutil.which("apt-get") is None or os.geteuid() != 0):
            return (
                False,
                f"host tools missing ({' '.join(need)}) and no root apt-get to install them",
            )
        built = (cache_dir / "sysroot/.board-manifest.json").exists()
        if built:
            return True, "board built"
        for exe in ("apt-get", "dpkg-deb"):
            if shutil.which(exe) is None:
                return False, f"{exe} not found: the arm64 sysroot is built with apt and dpkg"
        if not Path(DEBIAN_KEYRING).exists():
            return False, f"{DEBIAN_KEYRING} missing (package debian-archive-keyring)"
        for host, port in (("deb.debian.org", 80), ("pypi.org", 443)):
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as e:
                return False, f"cold board cache and {host}:{port} unreachable ({e})"
        return True, "prerequisites present"
    except Exception as e:
        return False, f"probe failed: {e!r}"


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1", port: int = 9090, port_end: int = 9199) -> int:
    """The first port in [port, port_end) that can be bound now (others use 9090, 9190, ...)."""
    if port_end <= port:
        raise BoardError(f"empty port range [{port}, {port_end}): the end must be above the start")
    for p in range(port, port_end):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, p))
                return p
            except OSError:
                continue
    if port_end == port + 1:
        raise BoardError(f"port {port} on {host} is in use (pick another port, or let it choose a free one)")
    raise BoardError(f"no free port in [{port}, {port_end}) on {host}")


def is_listening(host: str, port: int) -> bool:
    """Whether something listens on host:port, read from /proc/net/tcp (no connection made:
    a bare connect would count as a failed RPC handshake on the server)."""
    want = socket.inet_aton(host)[::-1].hex().upper() + f":{port:04X}"
    any_ = f"00000000:{port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[1] in (want, any_):  # 0A = LISTEN
                return True
    return False


@dataclass
class BoardProcess:
    """A process group started by ``Board``: a board RPC server or a host tracker."""

    kind: str  # "server" | "tracker"
    proc: subprocess.Popen
    host: str
    port: int  # the bound port (known once started)
    log: Path
    key: str | None = None
    tracker: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started with start_new_session: its own group

    def pids(self) -> list[int]:
        """Live pids of the process group (server + PopenWorker + session children)."""
        import psutil

        out = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == self.pgid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
        return out

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class Board:
    """Runs board RPC servers (under qemu) and TVM trackers (on the host); ``stop()`` kills them.

    ``inproc=True`` serves from a single emulated process (TVM's private in-process server) instead
    of the stock ``python -m tvm.exec.rpc_server`` (launcher + PopenWorker child): a faster start
    and half the memory, but the stock one is what a real board runs.
    """

    def __init__(
        self,
        env: BoardEnv | None = None,
        *,
        cpu: str = DEFAULT_CPU,
        inproc: bool = False,
        start_timeout: float = 300.0,
    ):
        self.env = env or ensure_board()
        self.cpu = cpu
        self.inproc = inproc
        self.start_timeout = start_timeout
        self.procs: list[BoardProcess] = []
        run = self.env.cache_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="board-", dir=run))

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- processes ------------------------------------------------------------------------------
    def _spawn(self, kind: str, cmd: list[str], env: dict, host: str, port: int, **info) -> BoardProcess:
        log = self.run_dir / f"{kind}-{port}-{len(self.procs)}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        bp = BoardProcess(kind, proc, host, port, log, **info)
        self.procs.append(bp)
        return bp

    def _wait_bound(self, bp: BoardProcess, timeout: float) -> BoardProcess:
        """Wait for TVM's "bind to HOST:PORT" line and the socket in LISTEN state."""
        deadline = time.monotonic() + timeout
        pat = re.compile(rf"bind to {re.escape(bp.host)}:(\d+)")
        while True:
            m = pat.search(bp.log.read_text(errors="replace"))
            if m and is_listening(bp.host, int(m.group(1))):
                bp.port = int(m.group(1))
                return bp
            if bp.proc.poll() is not None:
                self._fail(bp, f"exited with code {bp.proc.returncode} before listening")
            if time.monotonic() > deadline:
                self._fail(bp, f"not listening after {timeout:.0f}s")
            time.sleep(0.25)

    def _fail(self, bp: BoardProcess, why: str):
        tail = bp.log_tail()
        self._kill(bp)
        raise BoardError(f"board {bp.kind} on {bp.host}:{bp.port} {why}; log {bp.log}:\n{tail}")

    def start_tracker(
        self, host: str = "127.0.0.1", port: int = 9190, port_end: int = 9299, wait: bool = True
    ) -> BoardProcess:
        """TVM's RPC tracker (``python -m tvm.exec.rpc_tracker``) on the host, its own group.

        ``wait=False`` returns at once (servers given its address retry for 60 s until it is
        up): call ``wait_ready(proc)`` later.
        """
        port = free_port(host, port, port_end)
        cmd = [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            host,
            "--port",
            str(port),
            "--port-end",
            str(port_end),
        ]
        bp = self._spawn("tracker", cmd, dict(os.environ), host, port)
        return self.wait_ready(bp) if wait else bp

    def start_server(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        port_end: int = 9199,
        tracker: tuple[str, int] | str | None = None,
        key: str | None = None,
        wait: bool = True,
        inproc: bool | None = None,
    ) -> BoardProcess:
        """Start a TVM RPC server on the emulated board, in its own process group.

        Returns once it listens (and, with a tracker, once the tracker lists ``key``); raises
        ``BoardError`` with the tail of its log if it dies or does not come up in
        ``start_timeout`` seconds. ``wait=False`` returns at once: call ``wait_ready(proc)``.
        ``inproc`` overrides the board's choice of server variant for this one.
        """
        if isinstance(tracker, str):
            th, tp = tracker.rsplit(":", 1)
            tracker = (th, int(tp))
        if tracker and not key:
            raise ValueError("a server registered with a tracker needs a key")
        port = free_port(host, port, port_end)
        env = dict(os.environ, QEMU_CPU=self.cpu)
        if self.inproc if inproc is None else inproc:
            trk = f"{tracker[0]}:{tracker[1]}" if tracker else ""
            cmd = self.env.command("-c", _INPROC_SERVER, host, str(port), str(port_end), trk, key or "")
        else:
            cmd = self.env.command(
                "-m",
                "tvm.exec.rpc_server",
                "--host",
                host,
                "--port",
                str(port),
                "--port-end",
                str(port_end),
            )
            if tracker:
                cmd += ["--tracker", f"{tracker[0]}:{tracker[1]}", "--key", key]
            elif key:
                cmd += ["--key", key]
        bp = self._spawn("server", cmd, env, host, port, key=key, tracker=tracker)
        return self.wait_ready(bp) if wait else bp

    def wait_ready(self, bp: BoardProcess, timeout: float | None = None) -> BoardProcess:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._wait_bound(bp, timeout)
        if bp.kind == "server" and bp.tracker:
            while not self._registered(bp):
                if bp.proc.poll() is not None:
                    self._fail(bp, f"exited with code {bp.proc.returncode} while registering")
                if time.monotonic() > deadline:
                    self._fail(bp, f"not registered with tracker {bp.tracker} as {bp.key!r}")
                time.sleep(0.5)
        return bp

    @staticmethod
    def _registered(bp: BoardProcess) -> bool:
        from tvm import rpc

        try:
            info = rpc.connect_tracker(*bp.tracker).summary()
        except (OSError, RuntimeError):
            return False
        return any(s.get("key") == f"server:{bp.key}" and s["addr"][1] == bp.port for s in info.get("server_info", []))

    @property
    def running(self) -> list[BoardProcess]:
        return [bp for bp in self.procs if bp.proc.poll() is None]

    # -- stopping -------------------------------------------------------------------------------
    @staticmethod
    def _kill(bp: BoardProcess, grace: float = 10.0) -> None:
        """SIGTERM the whole group (the stock server's PopenWorker child is the real listener),
        then SIGKILL whatever is left after ``grace`` seconds (qemu can be slow to deliver)."""

        def alive() -> bool:
            bp.proc.poll()
            return bool(bp.pids())

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(bp.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(bp.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bp.proc.wait(timeout=5)

    def stop(self) -> None:
        """Kill every process group this board started (servers first, then trackers)."""
        for bp in sorted(self.procs, key=lambda p: p.kind != "server"):
            self._kill(bp)
        self.procs.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)


__all__ = [
    "BOARD_KEY",
    "DEFAULT_CPU",
    "HOST_TOOLS",
    "WHEEL_SHA256",
    "Board",
    "BoardEnv",
    "BoardError",
    "BoardProcess",
    "board_available",
    "board_manifest",
    "board_wheels",
    "default_cache_dir",
    "dir_size",
    "ensure_board",
    "free_port",
    "install_host_tools",
    "is_listening",
    "log",
    "missing_host_tools",
    "requirements_file",
    "wheel_hashes",
    "wrapper_text",
]
