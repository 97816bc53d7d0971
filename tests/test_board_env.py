"""The emulated board's set-up, without the board: a shell-safe wrapper, wheels pinned by hash,
the port a user picks (no qemu run, no download)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tvm_nested.deploy import board as tb

REPO = Path(__file__).resolve().parents[1]


def test_the_wrapper_quotes_hostile_cache_paths(tmp_path):
    """The wrapper embedded the cache path in double quotes: a --cache-dir holding $(...) ran it."""
    marker = tmp_path / "pwned"
    hostile = tmp_path / f'$(touch {marker})`touch {marker}`"q' / "cache"
    wrapper = tmp_path / "board-python"
    wrapper.write_text(tb.wrapper_text(hostile / "sysroot", hostile / "bin" / "board-python"))
    subprocess.run(["sh", str(wrapper), "-c", "pass"], capture_output=True, timeout=60)
    assert not marker.exists()
    assert subprocess.run(["sh", "-n", str(wrapper)]).returncode == 0  # still a valid script


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "print('not the real package')\n")
    return path


def test_a_wheel_that_does_not_match_its_pinned_hash_is_refused(tmp_path):
    pins = {"typing_extensions": "4.16.0"}
    _fake_wheel(tmp_path, "typing_extensions", "4.16.0")
    req = tb.requirements_file(tmp_path, pins)
    assert (
        req.read_text() == f"typing_extensions==4.16.0 --hash=sha256:{tb.WHEEL_SHA256['typing_extensions==4.16.0']}\n"
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--find-links", str(tmp_path)]
    out = subprocess.run([*cmd, "-d", str(tmp_path / "out"), "--require-hashes", "-r", str(req)], capture_output=True)
    assert out.returncode != 0 and b"HASH" in out.stderr.upper()


def test_pins_without_a_known_hash_are_pinned_on_first_download(tmp_path):
    pins = {"somepkg": "1.0"}
    with pytest.raises(tb.BoardError, match="no sha256 known or recorded"):
        tb.requirements_file(tmp_path, pins)
    wheel = _fake_wheel(tmp_path, "somepkg", "1.0")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / tb.RECORDED_HASHES).write_text(f"somepkg==1.0 {digest}\n")
    assert f"--hash=sha256:{digest}" in tb.requirements_file(tmp_path, pins).read_text()


def test_the_cached_board_wheels_match_the_pinned_hashes():
    wheels = REPO / ".cache" / "board" / "downloads" / "wheels-aarch64"
    files = sorted(wheels.glob("*.whl"))
    if not files:
        pytest.skip("no board wheel cache here (CI=true keeps it in .cache/board)")
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    pinned = tb.wheel_hashes(wheels, tb.board_wheels())
    assert set(pinned.values()) <= digests, sorted(set(pinned.values()) - digests)


def test_a_port_the_user_picks_is_that_port():
    """`board serve --port 9391` said 'no free port in [9391, 9199)'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        busy = s.getsockname()[1]
        s.listen(1)
        with pytest.raises(tb.BoardError, match=f"port {busy} on 127.0.0.1 is in use"):
            tb.free_port("127.0.0.1", busy, busy + 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert tb.free_port("127.0.0.1", free, free + 1) == free  # above 9199 too
    with pytest.raises(tb.BoardError, match="empty port range"):
        tb.free_port("127.0.0.1", 9391, 9199)
