"""fa-parallel tests: kernels through Triton's CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton / fa_core are imported (``triton.jit`` reads it at decoration
time), hence here, at the top of the conftest. Spawned ranks inherit it through the environment.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the rank worker lives next to the tests (pytest runs with --import-mode=importlib: no implicit sys.path
# entry); spawned processes receive the parent's sys.path, so they can import it too
sys.path.insert(0, os.path.dirname(__file__))
