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
