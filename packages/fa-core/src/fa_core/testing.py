"""Test helpers shared by every package's test suite (the 2x error rule, poisoning, tolerances)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fa_core import settings

__all__ = ["DEVICE", "assert_close_2x", "poisoned", "slack_for", "use_settings"]


def use_settings(monkeypatch: Any, **changes: Any) -> None:
    """Change :mod:`fa_core.settings` fields for the rest of one test; ``monkeypatch`` (pytest's fixture)
    restores them when the test ends. ``use_settings(monkeypatch, tma=False)``."""
    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.get(), **changes))


def slack_for(dtype: torch.dtype) -> float:
    """Absolute slack added to the 2x rule: a few ulps of the output dtype at magnitude ~1."""
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)


def poisoned(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A NaN-filled buffer: any element a kernel forgets to write fails the comparison."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def assert_close_2x(
    ours: torch.Tensor,
    ref: torch.Tensor,
    ref_lowp: torch.Tensor,
    name: str = "out",
    factor: float = 2.0,
    slack: float | None = None,
) -> None:
    """flash-attn's rule: ``max|ours - ref| <= factor * max|ref_lowp - ref| + slack``.

    ``ref`` is the high-precision reference, ``ref_lowp`` the same plain-PyTorch computation run in the
    inputs' low precision. +inf entries (lse of empty rows) must match exactly; NaN never passes.
    """
    ours_f, ref_f, low_f = ours.double(), ref.double(), ref_lowp.double()
    assert not torch.isnan(ours_f).any(), f"{name}: NaN in output ({int(torch.isnan(ours_f).sum())} elements)"
    inf_ours, inf_ref = torch.isinf(ours_f), torch.isinf(ref_f)
    assert torch.equal(inf_ours, inf_ref), f"{name}: infinite entries differ from the reference"
    if inf_ref.any():
        assert torch.equal(ours_f[inf_ref], ref_f[inf_ref]), f"{name}: signs of infinite entries differ"
        ours_f, ref_f, low_f = ours_f[~inf_ref], ref_f[~inf_ref], low_f[~inf_ref]
    if ours_f.numel() == 0:
        return
    if slack is None:
        slack = slack_for(
            ours.dtype if ours.dtype != torch.float32 or ref_lowp.dtype == torch.float32 else ref_lowp.dtype
        )
    err = (ours_f - ref_f).abs().max().item()
    base = (low_f - ref_f).abs().nan_to_num(0.0).max().item()
    assert err <= factor * base + slack, (
        f"{name}: max error {err:.3e} > {factor} x reference low-precision error {base:.3e} + slack {slack:.1e}"
    )


#: Where tests run: the GPU when there is one, else the CPU (kernels through the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
