"""fa_core.gluon on any machine: it imports, reports itself unavailable without an sm_90 GPU and Triton 3.6,
and its support predicate accepts exactly the calls the Gluon kernels handle."""

from __future__ import annotations

import importlib

import pytest
import torch
import triton

from fa_core import gluon as fg
from fa_core.errors import FlashAttnValueError


def _qkv(b=2, sq=100, sk=130, h=4, hk=2, d=64, dtype=torch.bfloat16):
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, sk, hk, d, dtype=dtype)
    v = torch.randn(b, sk, hk, d, dtype=dtype)
    return q, k, v


def _reason(q, k, v, **kw):
    return fg.unsupported_reason(q, k, v, check_device=False, **kw)


def test_public_api_present():
    for name in ("available", "supports", "forward", "unsupported_reason"):
        assert callable(getattr(fg, name))
    for d in fg.HEAD_DIMS:
        for causal in (False, True):
            for seqlen in (None, 1, 2048, 16384):
                for varlen in (False, True):
                    kind = fg.default_kind(d, causal, seqlen, varlen=varlen)
                    assert kind in fg.KINDS and d in fg.head_dims(kind)


def test_unavailable_without_cuda_sm90():
    if not torch.cuda.is_available():
        assert not fg.available()
    if triton.__version__.split(".")[:2] != ["3", "6"]:
        assert not fg.available(), "the kernels are written for Triton 3.6's Gluon API"


def test_cpu_tensors_refused():
    q, k, v = _qkv()
    assert not fg.supports(q, k, v)
    with pytest.raises(FlashAttnValueError, match="sm_90"):
        fg.forward(q, k, v)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_supported_shapes(d, dtype, causal):
    q, k, v = _qkv(d=d, dtype=dtype)
    assert _reason(q, k, v, causal=causal) is None
    # the causal window spelled out, and extras left at their defaults, are accepted too
    window = (-1, 0) if causal else (-1, -1)
    extras = dict(return_probs=False, learnable_sink=None, attention_chunk=0, score_mod=None)
    assert _reason(q, k, v, causal=causal, window_size=window, softmax_scale=0.2, **extras) is None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(window_size=(2**30, 0)), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("nan")), "softcap"),
        (dict(alibi_slopes=torch.ones(4)), "ALiBi"),
        (dict(dropout_p=0.1), "dropout"),
        (dict(softmax_scale=-1.0), "softmax_scale"),
        (dict(softmax_scale=float("inf")), "softmax_scale"),
        (dict(return_probs=True), "return_probs"),
        (dict(attention_chunk=128), "attention_chunk"),
        (dict(learnable_sink=torch.zeros(4)), "learnable_sink"),
    ],
)
def test_refused_features(change, match):
    q, k, v = _qkv()
    reason = _reason(q, k, v, **change)
    assert reason is not None and match in reason


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(16, 0), (-1, 8), (100, 50), (0, 0), (-1, 0)])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_windows_and_softcap_accepted(causal, window, softcap):
    q, k, v = _qkv()
    assert _reason(q, k, v, causal=causal, window_size=window, softcap=softcap) is None


@pytest.mark.parametrize("d", [32, 96, 256])
def test_refused_head_dims(d):
    q, k, v = _qkv(d=d)
    assert "head dim" in _reason(q, k, v)


def test_refused_dtypes_and_layouts():
    q, k, v = _qkv(dtype=torch.float32)
    assert "bfloat16" in _reason(q, k, v)
    q, k, v = _qkv()
    assert "float16" in _reason(q, k.half(), v)
    assert "multiple" in _reason(*_qkv(h=4, hk=3))
    assert "dense" in _reason(q[0], k[0], v[0])
    assert "empty" in _reason(*_qkv(sq=0))
    # a row stride of 66 elements (132 bytes) is not 16-byte aligned: TMA cannot describe it
    q_odd = torch.randn(2, 100, 4, 66, dtype=torch.bfloat16)[..., :64]
    assert "TMA" in _reason(q_odd, k, v)
    # a broadcast (zero-stride) head dim is refused as well
    k_bc = k[:, :, :1].expand(-1, -1, 2, -1)
    assert "TMA" in _reason(q, k_bc, v)
    # an out buffer must match q and be TMA-aligned; rng_state is ignored without dropout
    assert _reason(q, k, v, out=torch.empty_like(q), rng_state=torch.zeros(2, dtype=torch.int64)) is None
    assert "out must" in _reason(q, k, v, out=torch.empty_like(q)[:, :50])
    assert "TMA" in _reason(q, k, v, out=torch.randn(2, 100, 4, 66, dtype=torch.bfloat16)[..., :64])
    # strided views with aligned strides (packed qkv) are fine
    qkv = torch.randn(2, 100, 3, 4, 64, dtype=torch.bfloat16)
    assert _reason(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]) is None


def test_kernel_module_imports_under_triton_36():
    """The kernels compile only with Triton 3.6's Gluon; elsewhere their import may fail and is skipped."""
    try:
        importlib.import_module("fa_core.gluon._hopper")
        launch = importlib.import_module("fa_core.gluon._launch")
    except Exception as exc:  # pragma: no cover - depends on the installed Triton
        if triton.__version__.startswith("3.6"):
            raise
        pytest.skip(f"Gluon kernel module does not import under Triton {triton.__version__}: {exc}")
    # every tile configuration fits Hopper's 227 KiB of shared memory (Q tiles + K/V ring, 2-byte elements)
    for (kind, d), cfg in launch.CONFIGS.items():
        q_rows = cfg["BLOCK_M"] * (2 if kind == "ws" else 1)
        smem = 2 * d * (q_rows + 2 * cfg["STAGES"] * cfg["BLOCK_N"])
        assert smem <= 227 * 1024, (kind, d, smem)
        assert cfg["BLOCK_N"] in (64, 128) and cfg["BLOCK_M"] in (64, 128)


@pytest.mark.parametrize(
    "causal, window, expected",
    [
        (False, (-1, -1), (2**30, 2**30, False)),
        (True, (-1, -1), (2**30, 0, False)),
        (True, (-1, 5), (2**30, 0, False)),  # causal overrides the right side
        (True, (16, -1), (16, 0, True)),
        (False, (-1, 0), (2**30, 0, True)),
        (False, (3, 7), (3, 7, True)),
    ],
)
def test_window_bounds(causal, window, expected):
    try:
        launch = importlib.import_module("fa_core.gluon._launch")
    except Exception as exc:  # pragma: no cover - depends on the installed Triton
        pytest.skip(f"Gluon kernel module does not import under Triton {triton.__version__}: {exc}")
    assert launch.window_bounds(causal, window) == expected


def test_varlen_predicate():
    q, k, v = (t.reshape(-1, t.shape[2], t.shape[3]) for t in _qkv(sq=100, sk=100))
    cu = torch.tensor([0, 60, 200], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=140, max_seqlen_k=140)
    assert _reason(q, k, v, causal=True, window_size=(32, 0), softcap=5.0, **kw) is None
    assert "int32" in _reason(q, k, v, **dict(kw, cu_seqlens_q=cu.long()))
    assert "same length" in _reason(q, k, v, **dict(kw, cu_seqlens_k=cu[:2]))
    assert "max_seqlen" in _reason(q, k, v, **dict(kw, max_seqlen_q=None))
    assert "both" in _reason(q, k, v, cu_seqlens_q=cu)
    assert "dense" in _reason(q, k, v)  # 3-D tensors without cu_seqlens
    assert "dense" in _reason(*_qkv(), **kw)  # 4-D tensors with cu_seqlens
    with pytest.raises(FlashAttnValueError, match="sm_90"):
        fg.forward_varlen(q, k, v, cu, cu, 140, 140)


def test_shared_layouts_are_cached_and_gluons_own():
    """The TMA descriptors' shared layouts come from one cache (Gluon derives each in Python), equal to Gluon's
    default for the block."""
    if not fg._gluon_importable():
        pytest.skip("Triton without Gluon's Hopper modules (needs Triton 3.6)")
    from triton.experimental.gluon import language as gl

    from fa_core.gluon._launch import shared_layout

    a = shared_layout((1, 64, 1, 128), torch.bfloat16)
    assert a is shared_layout((1, 64, 1, 128), torch.bfloat16)
    assert a == gl.NVMMASharedLayout.get_default_for([1, 64, 1, 128], gl.bfloat16)
    assert shared_layout((128,), torch.float32) == gl.NVMMASharedLayout.get_default_for([128], gl.float32)
    narrow = gl.NVMMASharedLayout.get_default_for([1, 64, 1, 16], gl.float16)  # 32-byte rows: another swizzle
    assert shared_layout((1, 64, 1, 16), torch.float16) == narrow != a
