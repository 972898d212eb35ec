"""fa-backward tests: run the kernels through Triton's CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton / fa_core / fa_backward are imported (``triton.jit`` reads it at
decoration time), hence here, at the top of the conftest.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# shared helpers live next to the tests (pytest runs with --import-mode=importlib: no implicit sys.path entry)
sys.path.insert(0, os.path.dirname(__file__))
