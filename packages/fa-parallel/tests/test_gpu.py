"""GPU: run gpu_parallel_check.py on 2 GPUs (NCCL, bf16) at a moderate length; skipped without 2 GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fa_backward
import fa_core
import fa_parallel

SCRIPT = Path(__file__).with_name("gpu_parallel_check.py")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_match_one():
    # the child imports the same sources as this process (editable installs or PYTHONPATH)
    roots = [str(Path(m.__file__).resolve().parents[1]) for m in (fa_core, fa_backward, fa_parallel)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(roots + [os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(SCRIPT), "--spawn", "2", "--seqlens", "16384", "--quick"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
