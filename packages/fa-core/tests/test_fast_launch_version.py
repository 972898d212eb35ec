"""The direct-launch shortcut of ``fa_core.fast_launch`` calls a private Triton launcher signature: it is taken
only on the Triton versions it was tested for; any other version launches through Triton's own path."""

from __future__ import annotations

import pytest
import torch

from fa_core import fast_launch, settings


@pytest.mark.parametrize(
    "version, ok",
    [
        ("3.6.0", True),
        ("3.6.1+gitabc", True),
        ("3.5.1", False),
        ("3.9.0", False),
        ("4.0.0", False),
        ("nightly", False),
        ("", False),
    ],
)
def test_launcher_supported_only_on_tested_versions(version, ok):
    assert fast_launch.launcher_supported(version) is ok


def test_this_processes_decision_follows_its_triton():
    import triton

    assert fast_launch.LAUNCHER_SUPPORTED is fast_launch.launcher_supported(triton.__version__)


class _Kernel:
    """Stands in for a ``@triton.jit`` kernel: records which path launched it."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls += 1

        return run


def test_untested_version_takes_tritons_path(monkeypatch):
    """With an untested Triton the launcher never reaches its cache: every call goes to ``kernel[grid]``."""
    kernel = _Kernel()
    launcher = fast_launch.FastLaunch(kernel)
    launcher.ok = True  # structurally eligible
    monkeypatch.setattr(fast_launch, "LAUNCHER_SUPPORTED", False)

    def boom(*args, **kwargs):
        raise AssertionError("the shortcut's planning ran on an untested Triton")

    monkeypatch.setattr(launcher, "_plan", boom)
    launcher._launch((1,), 0, (torch.empty(1),), {})
    assert kernel.calls == 1


def test_fast_launch_follows_settings():
    previous = fast_launch.set_fast_launch(None)
    try:
        with settings.override(fast_launch=False):
            assert not fast_launch.fast_launch_enabled()
        with settings.override(fast_launch=True):
            assert fast_launch.fast_launch_enabled()
            assert fast_launch.set_fast_launch(False) is True
            assert not fast_launch.fast_launch_enabled()
    finally:
        fast_launch.set_fast_launch(None)
    assert isinstance(previous, bool)
