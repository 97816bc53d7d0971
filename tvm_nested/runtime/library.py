"""Checking a compiled module's file before the native loader sees it.

``dlopen`` trusts the file it maps: a truncated library (a half-finished copy) dies with SIGBUS when
a page past its end is touched, and a library for another CPU fails with a misleading "cannot open
shared object file: No such file or directory". So every path that loads an exported module
(``tvm_nested.load``, ``tvm-nested run``, ``deploy`` of a ``.so``) calls ``check_library`` first:

* the file is a regular, non-empty file, an ELF shared object (``ET_DYN``) whose program headers,
  loaded segments and section headers all lie inside the file (a truncated copy fails here);
* its machine is the one that will run it (``expect_machine``: this host, or the board's), named in
  the error together with the module's;
* the metadata ``tvm_nested.build`` compiled into it (``nested_info``, stored as raw JSON in the
  library's data) is read from the bytes and its versions checked: a module built by another TVM
  series is refused before it is loaded.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import struct
from dataclasses import dataclass

import tvm

from ..contract import INFO_VERSION

ELF_MAGIC = b"\x7fELF"
ET_DYN = 3
PT_LOAD = 1
SHT_STRTAB = 3
# e_machine -> the name platform.machine() and LLVM triples use
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
_INFO_MARK = b'{"info_version": '  # how relay_passes/metadata.py's json.dumps starts the record


class LibraryError(ValueError):
    """A file that is not a loadable compiled module for this machine; the message says why."""


@dataclass(frozen=True)
class LibraryInfo:
    path: str
    size: int
    machine: str  # "x86_64", "aarch64", ... (ELF_MACHINES), or "machine N" when unknown
    info: dict | None  # the nested_info record read from the file's bytes, None when not found


def host_machine() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def _elf_layout(data: bytes, path: str) -> tuple[int, str]:
    """(e_type, machine) of an ELF file whose headers and loaded segments lie inside ``data``."""
    size = len(data)
    if size < 52 or data[:4] != ELF_MAGIC:
        raise LibraryError(f"{path!r} is not a shared library (not an ELF file: {size} bytes)")
    cls, order = data[4], data[5]
    if cls not in (1, 2) or order not in (1, 2):
        raise LibraryError(f"{path!r}: damaged ELF header (class {cls}, data {order})")
    end = "<" if order == 1 else ">"
    if cls == 2:  # ELF64
        if size < 64:
            raise LibraryError(f"{path!r}: truncated ELF header ({size} bytes)")
        e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
        phoff, shoff = struct.unpack_from(end + "QQ", data, 32)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "HHHHH", data, 54)
        ph_fields = (end + "IIQQQQ", lambda t: (t[0], t[2], t[5]))  # p_type, p_offset, p_filesz
        sh_fields = (end + "IIQQQQ", lambda t: (t[1], t[4], t[5]))  # sh_type, sh_offset, sh_size
    else:  # ELF32
        e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
        phoff, shoff = struct.unpack_from(end + "II", data, 28)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "HHHHH", data, 42)
        ph_fields = (end + "IIIIII", lambda t: (t[0], t[1], t[4]))
        sh_fields = (end + "IIIIII", lambda t: (t[1], t[4], t[5]))
    machine = ELF_MACHINES.get(e_machine, f"machine {e_machine}")
    truncated = f"{path!r} is truncated or damaged ({size} bytes): "
    if data[6] != 1 or struct.unpack_from(end + "I", data, 20)[0] != 1:
        raise LibraryError(truncated + "its ELF header is garbled (version)")
    if phnum == 0:
        raise LibraryError(truncated + "it has no program headers")
    if phoff + phnum * phentsize > size:
        raise LibraryError(truncated + "its program headers lie past the end (an unfinished copy?)")
    if shoff + shnum * shentsize > size:
        raise LibraryError(truncated + "its section headers lie past the end (an unfinished copy?)")
    fmt, pick = ph_fields
    if phentsize < struct.calcsize(fmt):
        raise LibraryError(truncated + f"program header entries of {phentsize} bytes")
    loads = 0
    for i in range(phnum):
        p_type, p_offset, p_filesz = pick(struct.unpack_from(fmt, data, phoff + i * phentsize))
        loads += p_type == PT_LOAD
        if p_type == PT_LOAD and p_offset + p_filesz > size:
            raise LibraryError(truncated + f"segment {i} ends at byte {p_offset + p_filesz} (an unfinished copy?)")
    if not loads:
        raise LibraryError(truncated + "it has no loadable segment")
    # the section headers come last in the file: a copy whose tail was never written (zeros, or
    # garbage) loses them first, and the section-name table they point to must be a string table
    fmt, pick = sh_fields
    if shnum:
        if shstrndx >= shnum or shentsize < struct.calcsize(fmt):
            raise LibraryError(truncated + "its section headers are garbled (an unfinished copy?)")
        sh_type, sh_offset, sh_size = pick(struct.unpack_from(fmt, data, shoff + shstrndx * shentsize))
        if sh_type != SHT_STRTAB or sh_offset + sh_size > size:
            raise LibraryError(truncated + "its section headers are garbled (an unfinished copy?)")
    return e_type, machine


def embedded_info(data: bytes) -> dict | None:
    """The ``nested_info`` record compiled into a library, read from its bytes (None if absent).

    The VM stores the uint8 constant as its 8-byte length followed by the bytes (the JSON)."""
    at = data.find(_INFO_MARK)
    if at < 8:
        return None
    (length,) = struct.unpack_from("<Q", data, at - 8)
    if not 0 < length <= len(data) - at:
        return None
    try:
        info = json.loads(data[at : at + length].decode("utf-8"))
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _series(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def check_versions(info: dict, where: str) -> None:
    """Refuse metadata from another tvm_nested metadata version or another TVM series."""
    if info.get("info_version") != INFO_VERSION:
        raise LibraryError(
            f"{where}: module metadata version {info.get('info_version')!r} is not supported (this tvm_nested "
            f"reads {INFO_VERSION}); rebuild it"
        )
    built = str(info.get("tvm_version", "?"))
    if _series(built) != _series(tvm.__version__):
        raise LibraryError(
            f"{where}: module built with TVM {built}; this is TVM {tvm.__version__}: compiled modules are "
            f"compatible within a release series ({_series(tvm.__version__)}.x); rebuild it with this version"
        )


def check_library(path: str | os.PathLike, expect_machine: str | None = None) -> LibraryInfo:
    """Validate an exported module before it is loaded (see the module docstring).

    ``expect_machine``: the machine that will run it (default: this host); None-like "" skips the check.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no compiled module at {path!r}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LibraryError(f"{path!r} is not a regular file")
    if st.st_size == 0:
        raise LibraryError(f"{path!r} is empty (an unfinished copy or export?)")
    with open(path, "rb") as f:
        data = f.read()
    e_type, machine = _elf_layout(data, path)
    if e_type != ET_DYN:
        raise LibraryError(f"{path!r} is an ELF file but not a shared library (type {e_type})")
    want = host_machine() if expect_machine is None else expect_machine
    if want and machine != want:
        where = "this machine" if expect_machine is None else "the board"
        raise LibraryError(
            f"{path!r} is a module for {machine}, and {where} is {want}: "
            + (
                "run it on a board of its architecture (tvm_nested.deploy / tvm-nested run --rpc HOST:PORT), "
                "or compile it for this machine"
                if expect_machine is None
                else "compile it for the board's target"
            )
        )
    info = embedded_info(data)
    if info is not None:
        check_versions(info, repr(path))
    return LibraryInfo(path, len(data), machine, info)


__all__ = [
    "ELF_MACHINES",
    "LibraryError",
    "LibraryInfo",
    "check_library",
    "check_versions",
    "embedded_info",
    "host_machine",
]
