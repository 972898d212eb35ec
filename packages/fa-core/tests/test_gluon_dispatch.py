"""The forward's choice between the Triton and the Gluon kernels (``fa_core.ops._gluon_forward``), on CPU: the
Gluon module stubbed (it accepts everything and records its calls), so that only the rule is tested: the work
threshold (``GLUON_MIN_FLOPS``, the same for dense causal and non-causal calls, doubled for causal varlen) and
the options that keep the Triton kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fa_core import gluon, ops

D, H = 128, 16


def _work(batch: int, seqlen: int) -> float:
    return 4.0 * batch * seqlen * seqlen * H * D


def _tensor(shape: tuple[int, ...]) -> SimpleNamespace:
    return SimpleNamespace(is_cuda=True, shape=shape)


def _spec(causal: bool, varlen: bool = False, seqlen: int = 0, **changes: object) -> ops.Spec:
    spec = ops.Spec(
        varlen=varlen, pack=ops.DENSE, max_seqlen_q=seqlen, max_seqlen_k=seqlen, dropout_p=0.0,
        softmax_scale=D**-0.5, causal=causal, window_left=-1, window_right=-1, softcap=0.0, return_softmax=False,
        attention_chunk=0, deterministic=False, mods=None,
    )  # fmt: skip
    return spec._replace(**changes)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Gluon accepts every call; returns the list of launched entry points ("dense" / "varlen")."""
    seen: list[str] = []
    monkeypatch.setattr(gluon, "supports", lambda *a, **k: True)
    monkeypatch.setattr(gluon, "forward", lambda *a, **k: seen.append("dense") or (None, "lse"))
    monkeypatch.setattr(gluon, "forward_varlen", lambda *a, **k: seen.append("varlen") or (None, "lse"))
    return seen


def _dense(batch: int, seqlen: int, causal: bool, **changes: object) -> object:
    q = _tensor((batch, seqlen, H, D))
    spec = _spec(causal, **changes)
    return ops._gluon_forward(q, q, q, q, None, None, None, None, None, None, spec)


def _varlen(batch: int, seqlen: int, causal: bool) -> object:
    q = _tensor((batch * seqlen, H, D))
    spec = _spec(causal, varlen=True, seqlen=seqlen)
    return ops._gluon_forward(q, q, q, q, object(), object(), None, None, None, None, spec)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_threshold_is_the_same_causal_or_not(calls, monkeypatch, causal) -> None:
    monkeypatch.setattr(ops, "GLUON_MIN_FLOPS", _work(8, 2048))
    assert _dense(8, 2048, causal) == "lse"  # at the threshold: taken
    assert _dense(4, 2048, causal) is None  # below: the Triton kernels
    assert calls == ["dense"]


def test_causal_varlen_threshold_is_doubled(calls, monkeypatch) -> None:
    monkeypatch.setattr(ops, "GLUON_MIN_FLOPS", _work(8, 2048))
    assert _varlen(8, 2048, causal=False) == "lse"
    assert _varlen(8, 2048, causal=True) is None
    assert _varlen(16, 2048, causal=True) == "lse"
    assert calls == ["varlen", "varlen"]


def test_default_threshold_takes_2k_x_8_causal(calls) -> None:
    """The shipped rule sends the 16k-token 2k x 8 (d128, 16 heads) causal call to Gluon, not 1k x 16."""
    assert _dense(8, 2048, causal=True) == "lse"
    assert _dense(16, 1024, causal=True) is None


@pytest.mark.parametrize(
    "option",
    [dict(dropout_p=0.1), dict(attention_chunk=256), dict(mods=(None, None, None, None))],
)
def test_options_keep_the_triton_kernels(calls, monkeypatch, option) -> None:
    monkeypatch.setattr(ops, "GLUON_MIN_FLOPS", 0.0)
    assert _dense(8, 2048, True, **option) is None
    assert calls == []
