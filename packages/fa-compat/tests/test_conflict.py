"""Installing fa-compat next to another distribution of ``flash_attn`` warns instead of shadowing silently."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import warnings

import pytest

import flash_attn
from fa_core import settings


@pytest.fixture
def fake_metadata(monkeypatch):
    def install(mapping: dict[str, list[str]], versions: dict[str, str], cuda_ext: bool = False):
        monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: mapping)
        monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec",
            lambda name, *a: object() if (cuda_ext and name == "flash_attn_2_cuda") else real_find_spec(name, *a),
        )  # fmt: skip
        monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.get(), silence_conflict=False))

    return install


def test_real_flash_attn_warns(fake_metadata):
    fake_metadata({"flash_attn": ["fa-compat", "flash_attn"]}, {"fa-compat": "0.1.0", "flash_attn": "2.8.3"})
    with pytest.warns(
        flash_attn.FlashAttnPlusConflictWarning, match=r"flash_attn 2\.8\.3 is installed as well"
    ):
        flash_attn._warn_if_shadowing()


def test_cuda_extension_leftover_warns(fake_metadata):
    fake_metadata({"flash_attn": ["fa-compat"]}, {"fa-compat": "0.1.0"}, cuda_ext=True)
    with pytest.warns(flash_attn.FlashAttnPlusConflictWarning, match="flash_attn_2_cuda"):
        flash_attn._warn_if_shadowing()


def test_own_shim_and_fa_compat_alone_do_not_warn(fake_metadata):
    fake_metadata(
        {"flash_attn": ["flash-attn", "fa-compat"]},
        {"fa-compat": "0.1.0", "flash-attn": "2.8.3+faplus.0.1.0"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn._warn_if_shadowing()


def test_silenced_by_setting(fake_metadata):
    """``FA_PLUS_SILENCE_CONFLICT=1`` (``fa_core.settings``' ``silence_conflict``) silences the warning."""
    from fa_core import settings

    fake_metadata({"flash_attn": ["flash-attn"]}, {"flash-attn": "2.8.3"})
    with settings.override(silence_conflict=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn._warn_if_shadowing()
