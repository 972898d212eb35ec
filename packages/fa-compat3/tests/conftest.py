"""fa-compat3 tests: kernels run through Triton's CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton / fa_core / flash_attn_interface are imported (``triton.jit`` reads
it at decoration time), hence here, at the top of the conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
