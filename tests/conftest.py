"""Shared test set-up: seeded RNGs, the emulated board's session fixtures, TVM's thread count."""

import os

import numpy as np
import pytest

# The emulated aarch64 board (qemu-user + TVM RPC server), one per session: see conftest_board.py.
pytest_plugins = ["conftest_board"]


def pytest_configure(config):
    # TVM's CPU runtime defaults to 1 thread on small machines; the tests use every core they have.
    import tvm_nested

    tvm_nested.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seeded():
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def aarch64_cc():
    """The aarch64 cross toolchain (gcc + libc headers) for tests that link ARM libraries.

    Installed through apt where the session is root (CI); otherwise missing tools skip with the reason.
    """
    from tvm_nested.deploy.board import BoardError, install_host_tools, missing_host_tools

    need = missing_host_tools()
    if need:
        try:
            install_host_tools(need)
        except BoardError as err:
            pytest.skip(f"aarch64 cross toolchain missing ({' '.join(need)}): {err}")
    return "aarch64-linux-gnu-gcc"
