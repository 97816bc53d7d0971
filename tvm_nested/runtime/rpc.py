"""Reaching a board over TVM RPC without ever waiting longer than a time-out.

TVM's RPC client reads its sockets without a time-out: the handshake with a port that accepts and
never answers (a board busy with another client, something that is not an RPC server) blocks for
ever, and so does a tracker that never replies. Everything in tvm_nested that opens an RPC session
(``deploy``, ``tvm-nested run --rpc``, tuning on a board) goes through ``connect`` here:

* ``probe_server``: a handshake of our own on a Python socket with a time-out. It offers a key the
  server refuses (``RPC_CODE_MISMATCH``), so a live server answers at once and starts no session;
  silence within the time-out is a ``BoardError`` naming the address, and no thread is left blocked
  inside TVM (one blocked there aborted the process at exit: "terminate called without an active
  exception").
* ``tracker_summary``: the tracker protocol, also on a socket with a time-out.
* ``connect``: the probe, then TVM's own connect in a daemon thread bounded by what is left of the
  time-out (a board that stops answering between the two is still reported, not waited for).
* a session with a ``session_timeout`` also reads with one: TVM's client waits for the board's
  answer to every call without a time-out, so a board that froze in the middle of a call (hung, a
  cut link) blocked the caller for ever; the session's socket gets a receive time-out, and such a
  call fails after ``session_timeout`` seconds of silence (when the board itself would have ended
  the session anyway). ``abandon`` then shuts that socket down, so that the session's remaining
  calls (freeing each remote object is one) fail at once instead of waiting as long again each.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref

from tvm import rpc as tvm_rpc
from tvm.rpc import base as rpc_base

PROBE_KEY = "tvm-nested-probe"  # not "client:...": every TVM RPC server refuses it, starting no session
_SESSION_SOCKETS = weakref.WeakKeyDictionary()  # session -> the descriptors of its socket (connect)


class BoardError(RuntimeError):
    """A board (real or emulated) cannot be reached, built or used; the message says what to do."""


def parse_address(text) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; ValueError otherwise."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        host, port = str(text[0]), text[1]
    else:
        host, _, port = str(text).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
    try:
        port = int(port)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected host:port with a numeric port, got {text!r}") from err
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    return host, port


def _open(addr: tuple[str, int], timeout: float, what: str) -> socket.socket:
    try:
        return socket.create_connection(addr, timeout=max(timeout, 0.1))
    except OSError as err:
        raise BoardError(f"{what} unreachable: {err}") from err


def _no_answer(what: str, timeout: float) -> BoardError:
    return BoardError(
        f"{what}: no answer within {timeout:.0f}s (a TVM RPC server serves one client at a time: is another "
        "client using the board? is it a TVM RPC server/tracker at all?)"
    )


def probe_server(host: str, port: int, timeout: float) -> None:
    """Return when a TVM RPC server answers at ``host:port``; BoardError within ``timeout`` otherwise."""
    what = f"board {host}:{port}"
    with _open((host, port), timeout, what) as sock:
        try:
            key = PROBE_KEY.encode()
            sock.sendall(struct.pack("<ii", rpc_base.RPC_MAGIC, len(key)) + key)
            code = struct.unpack("<i", rpc_base.recvall(sock, 4))[0]
        except TimeoutError as err:
            raise _no_answer(f"{what}: RPC handshake", timeout) from err
        except OSError as err:
            raise BoardError(f"{what}: not a TVM RPC server (the handshake failed: {err})") from err
    if code not in (rpc_base.RPC_CODE_MISMATCH, rpc_base.RPC_CODE_SUCCESS, rpc_base.RPC_CODE_DUPLICATE):
        raise BoardError(f"{what}: not a TVM RPC server (it answered the handshake with {code:#x})")


def tracker_summary(host: str, port: int, timeout: float) -> dict:
    """The tracker's summary (``queue_info``, ``server_info``); BoardError within ``timeout`` otherwise."""
    what = f"tracker {host}:{port}"
    with _open((host, port), timeout, what) as sock:
        try:
            sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", rpc_base.recvall(sock, 4))[0] != rpc_base.RPC_TRACKER_MAGIC:
                raise BoardError(f"{what}: not a TVM RPC tracker (wrong handshake)")
            rpc_base.sendjson(sock, [rpc_base.TrackerCode.SUMMARY])
            reply = rpc_base.recvjson(sock)
            if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == rpc_base.TrackerCode.SUCCESS):
                raise BoardError(f"{what}: unexpected answer to a summary request: {str(reply)[:200]}")
            return reply[1] if isinstance(reply[1], dict) else {}
        except TimeoutError as err:
            raise _no_answer(what, timeout) from err
        except (OSError, ValueError, struct.error) as err:
            raise BoardError(f"{what}: not a TVM RPC tracker ({err})") from err


def bounded(fn, timeout: float, what: str):
    """``fn()`` in a daemon thread; BoardError when it has not returned after ``timeout`` seconds."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=call, name="tvm-nested-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _no_answer(what, timeout)
    if "error" in box:
        err = box["error"]
        if isinstance(err, BoardError):
            raise err
        raise BoardError(f"{what}: {type(err).__name__}: {err}") from err
    return box["value"]


def _sockets() -> dict[int, str]:
    """This process's open sockets: fd -> ``socket:[inode]`` (Linux ``/proc``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:"):
            found[int(name)] = link
    return found


def _bound_reads(before: dict[int, str], seconds: float) -> list[int]:
    """Give the TCP sockets opened since ``before`` (the session TVM's connect just made) a receive
    time-out of ``seconds``; their descriptors. TVM owns the socket and offers no time-out of its
    own: the option is set through a duplicate of its descriptor (the same socket)."""
    fds = []
    for fd, link in _sockets().items():
        if before.get(fd) == link:
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            whole = int(seconds)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6))
            )
            fds.append(fd)
    return fds


def abandon(session) -> None:
    """Shut down the socket of a session whose board stopped answering (one ``connect`` opened with
    a ``session_timeout``): its later calls fail at once. The session stays an object to drop."""
    for fd in _SESSION_SOCKETS.pop(session, ()):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed or shut down
            pass


def connect(rpc=None, *, tracker=None, key: str | None = None, timeout: float = 30.0, session_timeout: float = 0):
    """An RPC session with a board: ``rpc="host:port"`` (its server) or ``tracker="host:port"`` + ``key``.

    Raises ``BoardError`` within about ``timeout`` seconds when the board or tracker cannot be
    reached, does not answer, or has no free server registered under ``key``.
    ``session_timeout``: seconds after which the board ends the session (0: never); with it, a call
    on the session that hears nothing from the board for that long fails instead of waiting for ever
    (see the module docstring).
    """
    if (rpc is None) == (tracker is None):
        raise ValueError("give exactly one of rpc='host:port' (a board) or tracker='host:port' (with key=)")
    if tracker is not None and not key:
        raise ValueError("a tracker needs the board's key (key=)")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    host, port = parse_address(rpc if rpc is not None else tracker)
    deadline = time.monotonic() + timeout
    left = lambda: max(deadline - time.monotonic(), 1.0)
    if rpc is not None:
        probe_server(host, port, timeout)
        before = _sockets()
        session = bounded(
            lambda: tvm_rpc.connect(host, port, session_timeout=session_timeout),
            left(),
            f"board {host}:{port}: RPC connect",
        )
        if session_timeout:  # the board's own end of the session comes first
            _SESSION_SOCKETS[session] = _bound_reads(before, session_timeout + 1.0)
        return session
    what = f"tracker {host}:{port}"
    while True:
        queue = tracker_summary(host, port, left()).get("queue_info", {})
        if queue.get(key, {}).get("free", 0) > 0:
            break
        if time.monotonic() > deadline:
            raise BoardError(
                f"{what}: no free server with key {key!r} after {timeout:.0f}s (keys: {sorted(queue) or 'none'})"
            )
        time.sleep(0.5)
    before = _sockets()
    session = bounded(
        lambda: tvm_rpc.connect_tracker(host, port).request(key, session_timeout=session_timeout, max_retry=2),
        left() + 2.0,
        what,
    )
    if session_timeout:
        _SESSION_SOCKETS[session] = _bound_reads(before, session_timeout + 1.0)
    return session


__all__ = [
    "PROBE_KEY",
    "BoardError",
    "abandon",
    "bounded",
    "connect",
    "parse_address",
    "probe_server",
    "tracker_summary",
]
