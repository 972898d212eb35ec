import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated: set it before fa_core is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
