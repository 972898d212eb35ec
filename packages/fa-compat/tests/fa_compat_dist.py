"""Spawned gloo process groups (CPU) for fa-compat's distributed tests.

``spawn_gloo(__file__, ["_check_a", "_check_b"], world, tmp_path, *args)`` runs the named functions of the calling
test module on every rank of a fresh gloo group, each as ``check(rank, world, group, *args)``; an assertion on any
rank fails the test.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
import torch


def _gloo_worker(
    rank: int, world: int, store: str, checks: Sequence[Callable[..., None]], args: tuple[Any, ...]
) -> None:
    """One rank of a gloo group: the checks in order (an assertion fails the spawn)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        group = dist.group.WORLD
        for check in checks:
            check(rank, world, group, *args)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank passed the last barrier: leave without tearing the group down (a rank's gloo
    # threads still running at destruction abort the process under load)
    os._exit(0)


def spawn_gloo(
    test_file: str, checks: Sequence[str], world: int, tmp_path, *args: Any, limit_s: float = 150
) -> None:
    """Run ``checks`` (names of functions of the module at ``test_file``) on ``world`` spawned gloo ranks that
    rendezvous through a file store under ``tmp_path``; fails the test when a rank fails or when the ranks have not
    finished within ``limit_s`` seconds (then every rank is ended). ``args`` follow ``(rank, world, group)``."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    # spawned processes import the checks by module name: make the test file importable as a top-level module
    here = os.path.dirname(os.path.abspath(test_file))
    name = os.path.splitext(os.path.basename(test_file))[0]
    sys.path.insert(0, here)
    try:
        module = importlib.import_module(name)
        assert os.path.samefile(module.__file__, test_file), f"{name} resolves to {module.__file__}"
        context = mp.spawn(
            _gloo_worker,
            args=(world, str(tmp_path / "store"), [getattr(module, check) for check in checks], args),
            nprocs=world,
            join=False,
        )
        deadline = time.monotonic() + limit_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(10)
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"the gloo ranks did not finish {list(checks)} within {limit_s} s")
    finally:
        sys.path.remove(here)
