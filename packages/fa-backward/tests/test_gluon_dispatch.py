"""The backward's choice between the Triton and the Gluon passes (``fa_backward.launch._gluon_passes``), on CPU:
the device, the Gluon modules' availability and their argument checks stubbed, so that only the rule is tested
(thresholds in FLOPs per pass, halved work when causal, the options that keep the Triton passes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fa_backward import gluon_dkdv, gluon_dq, launch

SHAPE = (2, 1024, 16, 128)  # one pass: 8 * b * h * s * s * d FLOPs
WORK = 8 * 2 * 16 * 1024 * 1024 * 128


def _tensor(shape=SHAPE):
    return SimpleNamespace(is_cuda=True, shape=shape, device="cuda:0")


def _choose(**overrides):
    q = _tensor()
    kw = dict(
        varlen=False, dropout_p=0.0, alibi_slopes=None, softcap=0.0, window=(-1, -1), attention_chunk=0,
        seqused_k=None, score_mod=None, mask_mod=None, block_mask=None, causal=False,
    )  # fmt: skip
    kw.update(overrides)
    t = _tensor()
    return launch._gluon_passes(q, t, t, t, t, t, t, t, t, t, t, None, **kw)


@pytest.fixture
def gluon_everywhere(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Gluon available and every argument accepted; records the passes whose checks ran."""
    checked: dict[str, list] = {"dq": [], "dkdv": []}
    monkeypatch.setattr(gluon_dkdv, "available", lambda device=None: True)
    monkeypatch.setattr(gluon_dq, "unsupported_reason", lambda *a, **k: checked["dq"].append(k) or None)
    monkeypatch.setattr(gluon_dkdv, "unsupported_reason", lambda *a, **k: checked["dkdv"].append(k) or None)
    return checked


def test_thresholds_none_keep_the_triton_passes(gluon_everywhere, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", None)
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", None)
    assert _choose() == (False, False)
    assert gluon_everywhere == {"dq": [], "dkdv": []}


@pytest.mark.parametrize(
    ("dq_min", "dkdv_min", "causal", "expected"),
    [
        (0.0, None, False, (True, False)),
        (None, 0.0, False, (False, True)),
        (WORK, WORK, False, (True, True)),  # at the threshold: taken
        (WORK + 1, WORK, False, (False, True)),
        (WORK, WORK, True, (False, False)),  # causal: half the work
        (WORK / 2, WORK, True, (True, False)),
    ],
)
def test_thresholds(gluon_everywhere, monkeypatch, dq_min, dkdv_min, causal, expected) -> None:
    monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", dq_min)
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", dkdv_min)
    assert _choose(causal=causal) == expected
    # each pass's own argument check ran exactly when its threshold was met, with the call's causal flag
    for tag, used in zip(("dq", "dkdv"), expected):
        assert len(gluon_everywhere[tag]) == int(used)
        assert all(k["causal"] is causal for k in gluon_everywhere[tag])


@pytest.mark.parametrize(
    ("dq_min", "dkdv_min", "expected"),
    [
        ({128: 0.0}, {64: 0.0}, (True, False)),  # this call's head dim is 128
        ({64: 0.0}, {128: WORK}, (False, True)),
        ({128: None}, {128: WORK + 1}, (False, False)),
        ({}, {64: 0.0, 128: 0.0}, (False, True)),
        ({128: WORK}, {128: WORK / 2}, (True, True)),
    ],
)
def test_thresholds_per_head_dim(gluon_everywhere, monkeypatch, dq_min, dkdv_min, expected) -> None:
    """A map from head dim to threshold applies the entry of the call's head dim; a missing one means never."""
    monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", dq_min)
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", dkdv_min)
    assert _choose() == expected
    if expected == (True, True):  # causal: half the work, below the dQ threshold, at the dK/dV one
        assert _choose(causal=True) == (False, True)


def test_default_thresholds_are_per_head_dim() -> None:
    """The shipped rule: both Gluon passes at d128, the Gluon dK/dV pass alone at d64."""
    for setting in (launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS):
        assert isinstance(setting, dict) and set(setting) <= {64, 128}
    assert launch._min_flops(launch.GLUON_DQ_MIN_FLOPS, 64) is None
    assert launch._min_flops(launch.GLUON_DQ_MIN_FLOPS, 128) is not None
    assert launch._min_flops(launch.GLUON_DKDV_MIN_FLOPS, 64) is not None
    assert launch._min_flops(launch.GLUON_DKDV_MIN_FLOPS, 256) is None


@pytest.mark.parametrize(
    "option",
    [
        dict(varlen=True), dict(dropout_p=0.1), dict(alibi_slopes=object()), dict(softcap=30.0),
        dict(window=(64, 0)), dict(attention_chunk=256), dict(seqused_k=object()), dict(score_mod=abs),
        dict(mask_mod=abs), dict(block_mask=object()),
    ],
)  # fmt: skip
def test_options_keep_the_triton_passes(gluon_everywhere, monkeypatch, option) -> None:
    monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", 0.0)
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", 0.0)
    assert _choose() == (True, True)
    assert _choose(**option) == (False, False)


def test_refusals(gluon_everywhere, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass whose own checks refuse the tensors (strides, dtypes, lse layout) keeps its Triton kernel; no
    Gluon device: both do."""
    monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", 0.0)
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", 0.0)
    monkeypatch.setattr(gluon_dq, "unsupported_reason", lambda *a, **k: "lse must be ...")
    assert _choose() == (False, True)
    monkeypatch.setattr(gluon_dkdv, "available", lambda device=None: False)
    assert _choose() == (False, False)
    q = _tensor()
    q.is_cuda = False
    t = _tensor()
    assert launch._gluon_passes(
        q, t, t, t, t, t, t, t, t, t, t, None, varlen=False, dropout_p=0.0, alibi_slopes=None, softcap=0.0,
        window=(-1, -1), attention_chunk=0, seqused_k=None, score_mod=None, mask_mod=None, block_mask=None,
        causal=False,
    ) == (False, False)  # fmt: skip
