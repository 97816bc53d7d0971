"""Deploy to boards over TVM RPC: connect, upload, run and time every level on the board.

``deploy.board`` (the emulated aarch64 board: test and user tooling) is not imported here: the
real-board path does not need it.
"""

from .remote import (
    DEFAULT_TARGET,
    BoardError,
    board_triple,
    connect,
    deploy,
    is_emulated,
    parse_address,
    time_levels,
    upload,
)

__all__ = [
    "DEFAULT_TARGET",
    "BoardError",
    "board_triple",
    "connect",
    "deploy",
    "is_emulated",
    "parse_address",
    "time_levels",
    "upload",
]
