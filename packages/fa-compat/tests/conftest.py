"""fa-compat tests: kernels run through Triton's CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton / fa_core / flash_attn are imported (``triton.jit`` reads it at
decoration time), hence here, at the top of the conftest. ``FA_COMPAT_SUBSET`` (set by nox) says which extras
are installed; see fa_compat_testutils.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# shared helpers live next to the tests (pytest runs with --import-mode=importlib: no implicit sys.path entry)
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
