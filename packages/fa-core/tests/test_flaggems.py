"""The optional FlagGems forward backend (fa_core.backends.flaggems).

CPU: only the parts that need no GPU run (availability, the clear error, the window translation checked
against the reference mask); FlagGems itself cannot be imported without a GPU. GPU (``-m gpu``):
FlagGems vs the reference (and fa_core's own kernel vs the same reference) under the 2x rule, dense and
varlen, plus every unsupported feature raising. Set ``FA_REQUIRE_FLAGGEMS=1`` (scripts/gpu_run.sh does)
to turn "flag_gems not importable on a GPU machine" from a skip into a failure.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import fa_core
from fa_core import attention_ref, attention_varlen_ref, flash_attn_forward, flash_attn_varlen_forward
from fa_core.backends import flaggems as fgb
from fa_core.backends import get_forward, get_varlen_forward, resolve_backend
from fa_core.reference import visible_mask
from fa_core.testing import assert_close_2x, poisoned, use_settings

CUDA = torch.cuda.is_available()
_DISPATCH = "backend" in inspect.signature(fa_core.flash_attn_forward).parameters


def _fg_ready() -> bool:
    return CUDA and fgb.is_available()


@pytest.fixture(scope="module")
def fg_ready() -> None:
    if not _fg_ready():
        if os.environ.get("FA_REQUIRE_FLAGGEMS") == "1":
            pytest.fail(f"FA_REQUIRE_FLAGGEMS=1 but flag_gems is unusable: {fgb._IMPORT_ERROR}")
        pytest.skip(f"flag_gems not usable here: {fgb._IMPORT_ERROR}")


# ------------------------------------------------------------------------------------------ CPU tests


@pytest.mark.skipif(CUDA, reason="checks the behaviour without a GPU")
def test_unavailable_without_gpu():
    assert fgb.is_available() is False  # and did not raise
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    with pytest.raises(fgb.FlagGemsUnavailableError, match="CUDA GPU"):
        fgb.flaggems_forward(q, q, q)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(fgb.FlagGemsUnavailableError, match="CUDA GPU"):
        fgb.flaggems_varlen_forward(q[0], q[0], q[0], cu, cu, 8, 8)
    if _DISPATCH:
        with pytest.raises(fgb.FlagGemsUnavailableError):
            fa_core.flash_attn_forward(q, q, q, backend="flaggems")


def test_resolve_backend(monkeypatch):
    use_settings(monkeypatch, backend="")
    assert (
        resolve_backend(None) == "triton"
        and get_forward(None) is None
        and get_varlen_forward("native") is None
    )
    assert resolve_backend("FlagGems") == "flaggems"
    assert get_forward("flaggems") is fgb.flaggems_forward
    assert get_varlen_forward("flag_gems") is fgb.flaggems_varlen_forward
    use_settings(monkeypatch, backend="flaggems")  # FA_BACKEND=flaggems
    assert resolve_backend(None) == "flaggems" and resolve_backend("triton") == "triton"
    with pytest.raises(ValueError, match="not a known backend"):
        resolve_backend("cudnn")


def _fg_mask(left: int, right: int, sq: int, sk: int) -> torch.Tensor:
    """The mask FlagGems' kernels apply for a window returned by flaggems_window."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    diag = i + sk - sq
    if left < 0 and right < 0:
        return torch.ones(sq, sk, dtype=torch.bool)
    if left < 0:
        assert right == 0
        return j <= diag
    assert 0 <= left < sk and 0 <= right < sk
    return (j >= diag - left) & (j <= diag + right)


@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (5, 19), (19, 5), (1, 33), (33, 1)])
def test_window_translation_matches_reference(sq, sk):
    windows = [(-1, -1), (0, 0), (3, -1), (-1, 2), (4, 1), (-1, 0), (0, -1), (50, 50), (2, 40), (40, 2)]
    for causal in (False, True):
        for w in windows:
            want = visible_mask(sq, sk, causal, w)
            try:
                left, right = fgb.flaggems_window(causal, w, sq, sk)
            except NotImplementedError:
                assert sq > sk and not causal, (causal, w)
                continue
            got = _fg_mask(left, right, sq, sk)
            assert torch.equal(got, want), (causal, w, (left, right))


# ------------------------------------------------------------------------------------------ GPU tests

DTYPES = [torch.float16, torch.bfloat16]
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (32, 16)},
    "window_left_causal": {"causal": True, "window_size": (48, -1)},
    "window_right_only": {"window_size": (-1, 20)},
    "window_left_only": {"window_size": (40, -1)},
    "softcap": {"softcap": 5.0},
    "alibi": {"alibi": True},
    "causal_alibi": {"causal": True, "alibi": True},
    "causal_softcap_alibi_scale": {"causal": True, "softcap": 8.0, "alibi": True, "softmax_scale": 0.1},
}
# (seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (128, 128, 4, 4, 64),
    (200, 333, 6, 2, 128),
    (333, 200, 4, 1, 64),
    (1, 257, 8, 2, 128),
    (97, 97, 2, 2, 80),
]


def _slopes(shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.rand(shape, device="cuda") * 0.3 + 0.05).float()


def _refs(q, k, v, fkw, slopes, varlen_cu=None):
    kw = {k_: v_ for k_, v_ in fkw.items() if k_ != "alibi"}
    if varlen_cu is None:
        ref = attention_ref(q, k, v, alibi_slopes=slopes, **kw)
        low = attention_ref(q, k, v, alibi_slopes=slopes, upcast=False, **kw)
    else:
        cq, ck = varlen_cu
        ref = attention_varlen_ref(q, k, v, cq, ck, alibi_slopes=slopes, **kw)
        low = attention_varlen_ref(q, k, v, cq, ck, alibi_slopes=slopes, upcast=False, **kw)
    return ref, low


def _check(res, ref, low, who: str) -> None:
    assert_close_2x(res.out, ref[0], low[0], f"{who} out")
    assert_close_2x(res.lse, ref[1], low[1], f"{who} lse", slack=2e-3)


def _entries() -> list[str]:
    return ["direct", "dispatch"]


def _call_dense(entry: str, *args, **kw):
    if entry == "direct":
        return fgb.flaggems_forward(*args, **kw)
    if not _DISPATCH:
        pytest.skip("fa_core.flash_attn_forward has no backend= argument yet")
    return flash_attn_forward(*args, backend="flaggems", **kw)


def _call_varlen(entry: str, *args, **kw):
    if entry == "direct":
        return fgb.flaggems_varlen_forward(*args, **kw)
    if "backend" not in inspect.signature(flash_attn_varlen_forward).parameters:
        pytest.skip("fa_core.flash_attn_varlen_forward has no backend= argument yet")
    return flash_attn_varlen_forward(*args, backend="flaggems", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_dense_vs_reference(fg_ready, feature, shape, dtype):
    torch.manual_seed(hash((feature, shape)) % 2**31)
    sq, sk, h, hk, d = shape
    batch = 2
    q = torch.randn(batch, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype)
    fkw = FEATURES[feature]
    slopes = _slopes((batch, h) if sq % 2 else (h,)) if fkw.get("alibi") else None
    kw = {k_: v_ for k_, v_ in fkw.items() if k_ != "alibi"}
    if feature == "window_left_only" and sq > sk:
        with pytest.raises(NotImplementedError, match="left-only window"):
            fgb.flaggems_forward(q, k, v, alibi_slopes=slopes, **kw)
        return
    ref, low = _refs(q, k, v, fkw, slopes)
    res = fgb.flaggems_forward(q, k, v, alibi_slopes=slopes, out=poisoned(q.shape, dtype, "cuda"), **kw)
    assert res.lse.shape == (batch, h, sq) and res.lse.dtype == torch.float32
    assert res.rng_state.device.type == "cpu" and res.probs is None
    _check(res, ref, low, "flaggems")
    native = flash_attn_forward(q, k, v, alibi_slopes=slopes, **kw)
    _check(native, ref, low, "native")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("entry", _entries())
def test_dense_entry_points_agree(fg_ready, entry):
    torch.manual_seed(11)
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    res = _call_dense(entry, q, k, v, causal=True)
    _check(res, *_refs(q, k, v, {"causal": True}, None), entry)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


VARLEN_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window_softcap": {"window_size": (64, 8), "softcap": 6.0},
    "window_right_only": {"window_size": (-1, 8)},
    "causal_alibi": {"causal": True, "alibi": True},
    "alibi": {"alibi": True},
}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("entry", _entries())
def test_varlen_vs_reference(fg_ready, entry, case, d, dtype):
    if entry == "dispatch" and (d != 128 or dtype != torch.bfloat16):
        pytest.skip("dispatch checked on one shape")
    torch.manual_seed(hash((case, d)) % 2**31)
    lens_q = [1, 130, 0, 257, 64, 3]
    lens_k = [70, 130, 9, 300, 64, 500]
    h, hk = 6, 2
    cq, ck = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    fkw = dict(VARLEN_CASES[case])
    slopes = _slopes((len(lens_q), h)) if fkw.get("alibi") else None
    kw = {k_: v_ for k_, v_ in fkw.items() if k_ != "alibi"}
    ref, low = _refs(q, k, v, fkw, slopes, varlen_cu=(cq, ck))
    res = _call_varlen(
        entry,
        q,
        k,
        v,
        cq,
        ck,
        max(lens_q),
        max(lens_k),
        alibi_slopes=slopes,
        out=poisoned(q.shape, dtype, "cuda"),
        **kw,
    )
    assert res.lse.shape == (h, sum(lens_q))
    _check(res, ref, low, "flaggems")
    native = flash_attn_varlen_forward(q, k, v, cq, ck, max(lens_q), max(lens_k), alibi_slopes=slopes, **kw)
    _check(native, ref, low, "native")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("lens_q", [[1, 1, 1, 1], [1, 0, 1]], ids=["decode", "decode_with_empty"])
def test_varlen_decode_gqa_lse(fg_ready, lens_q):
    """One query per sequence with GQA: FlagGems' swapped decode path (its lse order is fixed here)."""
    torch.manual_seed(7)
    lens_k = [33, 700, 5, 128][: len(lens_q)]
    h, hk, d = 8, 2, 128
    cq, ck = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
    for fkw in ({}, {"causal": True}):
        ref, low = _refs(q, k, v, fkw, None, varlen_cu=(cq, ck))
        res = fgb.flaggems_varlen_forward(q, k, v, cq, ck, 1, max(lens_k), **fkw)
        _check(res, ref, low, f"flaggems {fkw}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dense_dropout_rate_and_rng(fg_ready):
    torch.manual_seed(5)
    q = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16)
    v = torch.ones(2, 256, 4, 64, device="cuda", dtype=torch.float16)
    res = fgb.flaggems_forward(q, q, v, dropout_p=0.25)
    # with v = 1 each output element is (kept probability mass) / (1 - p): mean ~ 1
    assert abs(res.out.float().mean().item() - 1.0) < 0.05
    assert res.rng_state.dtype == torch.int64 and res.rng_state.shape == (2,)
    assert res.rng_state.device.type == "cpu"
    with pytest.raises(NotImplementedError, match="rng_state"):
        fgb.flaggems_forward(q, q, v, dropout_p=0.25, rng_state=res.rng_state)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_unsupported_features_raise(fg_ready):
    dev = "cuda"
    q = torch.randn(1, 64, 2, 64, device=dev, dtype=torch.float16)
    cu = torch.tensor([0, 64], dtype=torch.int32, device=dev)
    q12 = q[0][..., :12].contiguous()
    cases = [
        (lambda: fgb.flaggems_forward(q.float(), q.float(), q.float()), "dtype"),
        (lambda: fgb.flaggems_forward(q, q, q[..., :32].contiguous()), "v head dim"),
        (lambda: fgb.flaggems_forward(q, q, q, return_probs=True), "return_probs"),
        (lambda: fgb.flaggems_forward(q, q, q, softcap=3.0, dropout_p=0.1), "softcap together with dropout"),
        (lambda: fgb.flaggems_forward(q, q, q, softmax_scale=0.0), "softmax_scale=0"),
        (lambda: fgb.flaggems_forward(q[..., :16], q[..., :16], q[..., :16]), "head dim 16"),
        (lambda: fgb.flaggems_varlen_forward(q[0], q[0], q[0], cu, cu, 64, 64, dropout_p=0.1), "dropout"),
        (
            lambda: fgb.flaggems_varlen_forward(q[0], q[0], q[0], cu, cu, 64, 64, return_probs=True),
            "return_probs",
        ),
        (
            lambda: fgb.flaggems_varlen_forward(
                q[0], q[0], q[0], cu, cu, 64, 64, seqused_k=torch.tensor([5], dtype=torch.int32, device=dev)
            ),
            "seqused_k",
        ),
        (lambda: fgb.flaggems_varlen_forward(q12, q12, q12, cu, cu, 64, 64), "multiple of 8"),
        (lambda: fgb.flaggems_forward(q[..., :20], q[..., :20], q[..., :20]), "multiple of 8"),
        (lambda: fgb.flaggems_forward(q, q[:, :, :1], q[:, :, :1], dropout_p=0.1), "dropout with GQA"),
        (lambda: fgb.flaggems_forward(q[..., :40], q[..., :40], q[..., :40], dropout_p=0.1), "head dim 40"),
        (
            lambda: fgb.flaggems_forward(
                torch.randn(1, 9, 2, 64, device=dev, dtype=torch.float16),
                q[:, :4],
                q[:, :4],
                window_size=(2, -1),
            ),
            "left-only window",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(NotImplementedError, match=match):
            fn()
    with pytest.raises(ValueError, match="CUDA tensors only"):
        fgb.flaggems_forward(q.cpu(), q.cpu(), q.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_empty_and_padded_headdim(fg_ready):
    torch.manual_seed(3)
    q = torch.randn(1, 40, 2, 48, device="cuda", dtype=torch.float16)  # 48 -> padded to 64 by FlagGems
    k = torch.randn(1, 10, 2, 48, device="cuda", dtype=torch.float16)
    res = fgb.flaggems_forward(q, k, k, causal=True)
    assert torch.all(res.out[:, :30] == 0) and torch.all(res.lse[:, :, :30] == float("inf"))
    _check(res, *_refs(q, k, k, {"causal": True}, None), "flaggems")
    res = fgb.flaggems_forward(q[:, :0], k, k)
    assert res.out.shape == (1, 0, 2, 48) and res.lse.shape == (1, 2, 0)
    res = fgb.flaggems_forward(q, k[:, :0], k[:, :0])
    assert torch.all(res.out == 0) and torch.all(torch.isinf(res.lse))
