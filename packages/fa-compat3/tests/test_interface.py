"""FlashAttention-3's ``flash_attn_interface`` API (fa-compat3) against the float32 PyTorch reference.

Kernels run in Triton's interpreter on CPU (tiny shapes, fp32 / fp16); GPU-only cases carry ``gpu``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

import flash_attn_3  # noqa: E402
import flash_attn_interface as fa3  # noqa: E402
import pytest  # noqa: E402

from fa_core.errors import FlashAttnValueError  # noqa: E402
from fa_core.reference import attention_ref, attention_varlen_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: the highest-precision dtype the kernels take on this device
HI = torch.float32 if DEVICE == "cpu" else torch.float16
TOL = {torch.float32: 2e-4, torch.float16: 4e-3}


def _rand(*shape, dtype=HI, grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def _close(a, b, tol, what=""):
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: inf pattern differs"
    err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol, f"{what}: max abs err {err} > {tol}"


# ----------------------------------------------------------------------------------------- signatures
FA3_SIGNATURES = {
    "flash_attn_func": [
        ("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("v", inspect.Parameter.empty),
        ("softmax_scale", None), ("causal", False), ("qv", None), ("q_descale", None), ("k_descale", None),
        ("v_descale", None), ("window_size", (-1, -1)), ("attention_chunk", 0), ("softcap", 0.0),
        ("num_splits", 1), ("pack_gqa", None), ("deterministic", False), ("sm_margin", 0),
        ("return_attn_probs", False),
    ],
    "flash_attn_varlen_func": [
        ("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("v", inspect.Parameter.empty),
        ("cu_seqlens_q", inspect.Parameter.empty), ("cu_seqlens_k", inspect.Parameter.empty),
        ("max_seqlen_q", inspect.Parameter.empty), ("max_seqlen_k", inspect.Parameter.empty),
        ("seqused_q", None), ("seqused_k", None), ("softmax_scale", None), ("causal", False), ("qv", None),
        ("q_descale", None), ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)),
        ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None),
        ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False),
    ],
    "flash_attn_qkvpacked_func": [
        ("qkv", inspect.Parameter.empty), ("softmax_scale", None), ("causal", False), ("q_descale", None),
        ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)), ("attention_chunk", 0),
        ("softcap", 0.0), ("deterministic", False), ("num_heads_q", None), ("sm_margin", 0),
        ("return_attn_probs", False),
    ],
    "flash_attn_with_kvcache": [
        ("q", inspect.Parameter.empty), ("k_cache", inspect.Parameter.empty),
        ("v_cache", inspect.Parameter.empty), ("k", None), ("v", None), ("qv", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("page_table", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None), ("max_seqlen_q", None),
        ("rotary_seqlens", None), ("q_descale", None), ("k_descale", None), ("v_descale", None),
        ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("attention_chunk", 0),
        ("softcap", 0.0), ("rotary_interleaved", True), ("scheduler_metadata", None), ("num_splits", 0),
        ("pack_gqa", None), ("sm_margin", 0), ("return_softmax_lse", False),
    ],
    "get_scheduler_metadata": [
        ("batch_size", inspect.Parameter.empty), ("max_seqlen_q", inspect.Parameter.empty),
        ("max_seqlen_k", inspect.Parameter.empty), ("num_heads_q", inspect.Parameter.empty),
        ("num_heads_kv", inspect.Parameter.empty), ("headdim", inspect.Parameter.empty),
        ("cache_seqlens", inspect.Parameter.empty), ("qkv_dtype", torch.bfloat16), ("headdim_v", None),
        ("cu_seqlens_q", None), ("cu_seqlens_k_new", None), ("cache_leftpad", None), ("page_size", None),
        ("max_seqlen_k_new", 0), ("causal", False), ("window_size", (-1, -1)), ("attention_chunk", 0),
        ("has_softcap", False), ("num_splits", 0), ("pack_gqa", None), ("sm_margin", 0),
    ],
    "flash_attn_combine": [
        ("out_partial", inspect.Parameter.empty), ("lse_partial", inspect.Parameter.empty), ("out", None),
        ("out_dtype", None),
    ],
}  # fmt: skip

#: FlashAttention-3's autograd Functions: forward's parameters after ctx
FA3_APPLY = {
    "FlashAttnFunc": ["q", "k", "v", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale",
                      "window_size", "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic",
                      "sm_margin", "return_softmax"],
    "FlashAttnVarlenFunc": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k",
                            "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "qv", "q_descale",
                            "k_descale", "v_descale", "window_size", "attention_chunk", "softcap", "num_splits",
                            "pack_gqa", "deterministic", "sm_margin", "return_softmax"],
    "FlashAttnQKVPackedFunc": ["qkv", "softmax_scale", "causal", "q_descale", "k_descale", "v_descale",
                               "window_size", "attention_chunk", "softcap", "deterministic", "num_heads_q",
                               "sm_margin", "return_softmax"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FA3_SIGNATURES))
def test_signature_matches_fa3(name):
    params = list(inspect.signature(getattr(fa3, name)).parameters.values())
    got = [(p.name, p.default) for p in params]
    assert got == FA3_SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize("name", sorted(FA3_APPLY))
def test_function_classes_take_fa3_order(name):
    params = list(inspect.signature(getattr(fa3, name).apply).parameters)
    assert params == FA3_APPLY[name]


def test_flash_attn_3_package():
    assert flash_attn_3.__version__ == "3.0.0"
    assert flash_attn_3.__fa_plus__ is True
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
                 "flash_attn_with_kvcache", "flash_attn_combine", "get_scheduler_metadata", "FlashAttnFunc"):  # fmt: skip
        assert getattr(flash_attn_3, name) is getattr(fa3, name)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, flash_attn_interface, flash_attn_3; print('torch._dynamo' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_conflict_warning(monkeypatch):
    import dataclasses
    import importlib.metadata

    from fa_core import settings

    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.get(), silence_conflict=False))
    monkeypatch.setattr(
        importlib.metadata, "packages_distributions",
        lambda: {"flash_attn_interface": ["flash_attn_3", "fa-compat3"], "flash_attn_3": ["flash_attn_3"]},
    )  # fmt: skip
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.0")
    with pytest.warns(flash_attn_3.FlashAttnPlusConflictWarning, match="flash_attn_3 3.0.0"):
        flash_attn_3._warn_if_shadowing()
    monkeypatch.setattr(
        importlib.metadata, "packages_distributions", lambda: {"flash_attn_3": ["fa_compat3"]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn_3._warn_if_shadowing()
    with settings.override(silence_conflict=True), warnings.catch_warnings():
        monkeypatch.setattr(
            importlib.metadata, "packages_distributions", lambda: {"flash_attn_3": ["flash_attn_3"]}
        )
        warnings.simplefilter("error")
        flash_attn_3._warn_if_shadowing()


def test_own_shim_does_not_warn(monkeypatch):
    """The metadata-only ``flash-attn-3`` distribution built from flash-attn-3-shim is not a conflict; a CUDA
    flash_attn_3 of the same name (no ``+faplus`` label) is."""
    import dataclasses
    import importlib.metadata

    from fa_core import settings

    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.get(), silence_conflict=False))
    monkeypatch.setattr(
        importlib.metadata, "packages_distributions",
        lambda: {"flash_attn_interface": ["flash_attn_3", "fa-compat3"], "flash_attn_3": ["fa-compat3"]},
    )  # fmt: skip
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.0+faplus.0.1.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn_3._warn_if_shadowing()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.0")
    with pytest.warns(flash_attn_3.FlashAttnPlusConflictWarning):
        flash_attn_3._warn_if_shadowing()


def test_shim_metadata_matches_the_package():
    """The shim's version is FA3's API version plus this project's label and version; it needs fa-compat3."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).parents[1]
    shim = tomllib.loads((root / "flash-attn-3-shim" / "pyproject.toml").read_text())["project"]
    own = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    label = flash_attn_3.SHIM_LOCAL_LABEL
    assert shim["name"] == "flash-attn-3"
    assert shim["version"] == f"{flash_attn_3.__version__}+{label}.{own['version']}"
    assert shim["dependencies"] == [f"fa-compat3=={own['version']}"]
    assert own["version"] == flash_attn_3.__fa_plus_version__


def _check_fwd_bwd(out, lse, ref_out, ref_lse, inputs):
    """out / lse against the reference's (``TOL``), then the gradients of ``inputs`` (q, k, v) for one random
    output gradient (5x ``TOL``)."""
    tol = TOL[HI]
    _close(out, ref_out, tol, "out")
    _close(lse, ref_lse, tol, "lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref_out, inputs, dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        _close(g, r, 5 * tol, f"d{name}")


# -------------------------------------------------------------------------------------------- dense
DENSE_CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(5, 2)),
    dict(causal=True, window_size=(7, -1)),
    dict(softcap=2.5),
    dict(attention_chunk=8, causal=True),
]


@pytest.mark.parametrize(
    "case", DENSE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain"
)
@pytest.mark.parametrize("gqa", [False, True])
def test_flash_attn_func_fwd_bwd(case, gqa):
    torch.manual_seed(0)
    hk = 2 if gqa else 4
    q = _rand(2, 24, 4, 32, grad=True)
    k, v = _rand(2, 40, hk, 32, grad=True), _rand(2, 40, hk, 32, grad=True)
    out, lse = fa3.flash_attn_func(q, k, v, return_attn_probs=True, **case)
    ref_case = dict(case)
    ref_out, ref_lse = attention_ref(q, k, v, **ref_case)
    assert out.shape == (2, 24, 4, 32) and lse.shape == (2, 4, 24) and lse.dtype == torch.float32
    _check_fwd_bwd(out, lse, ref_out, ref_lse, (q, k, v))


@pytest.mark.parametrize("dv", [512, 264])
def test_wide_v_head_dim(dv):
    """FlashAttention-3 takes V head dims up to 512 (with a q head dim of 64: MLA's latent width); they run as
    passes over column blocks of V, exact in the output, the lse and the gradients, dense and varlen."""
    torch.manual_seed(5)
    q = _rand(2, 12, 4, 64, grad=True)
    k, v = _rand(2, 20, 2, 64, grad=True), _rand(2, 20, 2, dv, grad=True)
    out, lse = fa3.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    assert out.shape == (2, 12, 4, dv)
    _check_fwd_bwd(out, lse, ref_out, ref_lse, (q, k, v))
    cu_q = torch.tensor([0, 12, 24], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 40], dtype=torch.int32, device=DEVICE)
    flat = [t.detach().flatten(0, 1) for t in (q, k, v)]
    out_v = fa3.flash_attn_varlen_func(*flat, cu_q, cu_k, 12, 20, causal=True)
    _close(out_v, ref_out.flatten(0, 1), TOL[HI], "varlen out")
    with pytest.raises(FlashAttnValueError, match="v head dim"):
        fa3.flash_attn_func(q, k, _rand(2, 20, 2, 520))


def test_flash_attn_func_return_convention_and_tuning_args():
    torch.manual_seed(1)
    q, k, v = _rand(1, 16, 2, 32), _rand(1, 16, 2, 32), _rand(1, 16, 2, 32)
    out = fa3.flash_attn_func(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    res = fa3.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 2
    tuned = fa3.flash_attn_func(
        q, k, v, causal=True, num_splits=3, pack_gqa=True, sm_margin=8, deterministic=True
    )
    assert torch.equal(out, tuned)
    # descales are ignored with 16-bit inputs, as in FlashAttention-3
    ones = torch.ones(1, 2, device=DEVICE)
    assert torch.equal(out, fa3.flash_attn_func(q, k, v, causal=True, q_descale=ones * 3, k_descale=ones))
    scaled = fa3.flash_attn_func(q, k, v, softmax_scale=0.3)
    _close(scaled, attention_ref(q, k, v, softmax_scale=0.3)[0], TOL[HI], "softmax_scale")
    # the class view with FA3's positional order
    via_class = fa3.FlashAttnFunc.apply(q, k, v, None, True, None, None, None, None, (-1, -1), 0, 0.0, 1, None,
                                        False, 0, False)  # fmt: skip
    assert torch.equal(out, via_class)


def test_fp16_forward():
    torch.manual_seed(2)
    q, k, v = (_rand(1, 32, 2, 64, dtype=torch.float16) for _ in range(3))
    out = fa3.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.float16
    _close(out, attention_ref(q, k, v, causal=True)[0], 4e-3, "fp16 out")


def test_refusals():
    q, k, v = _rand(1, 8, 2, 32), _rand(1, 8, 2, 32), _rand(1, 8, 2, 32)
    with pytest.raises(FlashAttnValueError, match="qv"):
        fa3.flash_attn_func(q, k, v, qv=_rand(1, 8, 2, 32))
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(FlashAttnValueError, match="qv"):
        fa3.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, qv=q[0])
    kc, vc = _rand(1, 16, 2, 32), _rand(1, 16, 2, 32)
    with pytest.raises(FlashAttnValueError, match="qv"):
        fa3.flash_attn_with_kvcache(q, kc, vc, qv=q)
    with pytest.raises(FlashAttnValueError, match="cu_seqlens_k_new"):
        fa3.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=0, cu_seqlens_k_new=cu)
    with pytest.raises(FlashAttnValueError, match="rotary_seqlens"):
        fa3.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=0, rotary_cos=kc[0, :, 0, :8],
                                    rotary_sin=kc[0, :, 0, :8], rotary_seqlens=torch.zeros(2, dtype=torch.int32))  # fmt: skip
    with pytest.raises(FlashAttnValueError, match="cu_seqlens_k_new must be given"):
        fa3.flash_attn_with_kvcache(
            q[0], kc, vc, k=k[0], v=v[0], cache_seqlens=0, cu_seqlens_q=cu, max_seqlen_q=8
        )
    with pytest.raises(FlashAttnValueError, match="cu_seqlens_k_new must be non-decreasing"):
        fa3.flash_attn_with_kvcache(q[0], kc, vc, k=k[0], v=v[0], cache_seqlens=10, cu_seqlens_q=cu, max_seqlen_q=8,
                                    cu_seqlens_k_new=cu)  # fmt: skip
    with pytest.raises(FlashAttnValueError, match="cache_leftpad"):
        fa3.flash_attn_with_kvcache(q[0], kc, vc, cache_leftpad=cu[:1], cu_seqlens_q=cu, max_seqlen_q=8,
                                    page_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))  # fmt: skip
    with pytest.raises(FlashAttnValueError, match=r"cache_leftpad\[b\] must lie"):
        fa3.flash_attn_with_kvcache(q[0], kc, vc, cache_seqlens=2, cache_leftpad=cu[1:], cu_seqlens_q=cu,
                                    max_seqlen_q=8)  # fmt: skip
    with pytest.raises(ValueError, match="num_heads_q"):
        fa3.flash_attn_qkvpacked_func(_rand(1, 8, 6, 32))
    assert issubclass(FlashAttnValueError, RuntimeError)


# ------------------------------------------------------------------------------------------- packed
@pytest.mark.parametrize("layout", ["5d", "4d-gqa"])
def test_qkvpacked(layout):
    torch.manual_seed(3)
    if layout == "5d":
        qkv = _rand(2, 20, 3, 2, 32, grad=True)
        q, k, v = qkv.unbind(2)
        kwargs = {}
    else:
        qkv = _rand(2, 20, 4 + 2 * 2, 32, grad=True)
        q, k, v = qkv.split([4, 2, 2], dim=2)
        kwargs = dict(num_heads_q=4)
    out, lse = fa3.flash_attn_qkvpacked_func(
        qkv, causal=True, window_size=(6, 0), return_attn_probs=True, **kwargs
    )
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, window_size=(6, 0))
    _close(out, ref_out, TOL[HI], "out")
    _close(lse, ref_lse, TOL[HI], "lse")
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (r,) = torch.autograd.grad(ref_out, qkv, dout)
    assert g.shape == qkv.shape
    _close(g, r, 5 * TOL[HI], "dqkv")


# ------------------------------------------------------------------------------------------- varlen
def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(window_size=(4, 1), softcap=3.0)], ids=str)
def test_varlen_fwd_bwd(case):
    torch.manual_seed(4)
    lq, lk = [5, 17, 9], [12, 17, 30]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = _rand(sum(lq), 4, 32, grad=True)
    k, v = _rand(sum(lk), 2, 32, grad=True), _rand(sum(lk), 2, 32, grad=True)
    out, lse = fa3.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **case
    )
    ref_out, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **case)
    assert lse.shape == (4, sum(lq))
    _check_fwd_bwd(out, lse, ref_out, ref_lse, (q, k, v))


def test_varlen_seqused():
    torch.manual_seed(5)
    lq, lk = [8, 12], [16, 20]
    cu_q, cu_k = _cu(lq), _cu(lk)
    used_q = torch.tensor([5, 12], dtype=torch.int32, device=DEVICE)
    used_k = torch.tensor([9, 20], dtype=torch.int32, device=DEVICE)
    q = _rand(sum(lq), 2, 32, grad=True)
    k, v = _rand(sum(lk), 2, 32), _rand(sum(lk), 2, 32)
    out, lse = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 20, seqused_q=used_q, seqused_k=used_k,
                                          causal=True, return_attn_probs=True)  # fmt: skip
    for b, (s0, n_q, n_k, k0) in enumerate([(0, 5, 9, 0), (8, 12, 20, 16)]):
        ref_out, ref_lse = attention_ref(q[None, s0 : s0 + n_q], k[None, k0 : k0 + n_k], v[None, k0 : k0 + n_k],
                                         causal=True)  # fmt: skip
        _close(out[s0 : s0 + n_q], ref_out[0], TOL[HI], f"out[{b}]")
        _close(lse[:, s0 : s0 + n_q], ref_lse[0], TOL[HI], f"lse[{b}]")
    # rows past seqused_q: out 0, lse +inf, no gradient
    assert torch.all(out[5:8] == 0) and torch.all(lse[:, 5:8] == float("inf"))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.all(dq[5:8] == 0) and dq[:5].abs().sum() > 0


def test_varlen_batched_layout():
    """cu_seqlens None: 4-D q / k / v, lse (batch, nheads, seqlen_q)."""
    torch.manual_seed(6)
    q, k, v = _rand(2, 12, 2, 32), _rand(2, 20, 2, 32), _rand(2, 20, 2, 32)
    used_k = torch.tensor([7, 20], dtype=torch.int32, device=DEVICE)
    out, lse = fa3.flash_attn_varlen_func(q, k, v, None, None, None, None, seqused_k=used_k, causal=True,
                                          return_attn_probs=True)  # fmt: skip
    assert out.shape == (2, 12, 2, 32) and lse.shape == (2, 2, 12)
    for b, n in enumerate([7, 20]):
        ro, rl = attention_ref(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], causal=True)
        _close(out[b], ro[0], TOL[HI], "out")
        _close(lse[b], rl[0], TOL[HI], "lse")


# ------------------------------------------------------------------------------------------ kvcache
def _cache_ref(q, k_full, v_full, seqlens, **kw):
    outs, lses = [], []
    for b, n in enumerate(seqlens):
        o, lse = attention_ref(q[b : b + 1], k_full[b : b + 1, :n], v_full[b : b + 1, :n], **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_append_and_attend(paged):
    torch.manual_seed(7)
    batch, cap, hk, d, page = 2, 48, 2, 32, 16
    seqlens = [10, 29]
    q = _rand(batch, 3, 4, d)
    k_new, v_new = _rand(batch, 3, hk, d), _rand(batch, 3, hk, d)
    k_full, v_full = _rand(batch, cap, hk, d), _rand(batch, cap, hk, d)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    if paged:
        n_pages = cap // page
        perm = torch.randperm(batch * n_pages, device=DEVICE)
        page_table = perm.view(batch, n_pages).to(torch.int32)
        k_cache = torch.empty(batch * n_pages, page, hk, d, device=DEVICE, dtype=HI)
        v_cache = torch.empty_like(k_cache)
        k_cache[perm] = k_full.reshape(batch * n_pages, page, hk, d)
        v_cache[perm] = v_full.reshape(batch * n_pages, page, hk, d)
    else:
        page_table = None
        k_cache, v_cache = k_full.clone(), v_full.clone()
    res = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens,
                                      page_table=page_table, causal=True, return_softmax_lse=True)  # fmt: skip
    assert isinstance(res, tuple) and len(res) == 4
    out, lse, out_accum, lse_accum = res
    assert out_accum.numel() == 0 and lse_accum.numel() == 0
    assert lse.shape == (batch, 4, 3) and not out.requires_grad
    for b, n in enumerate(seqlens):
        k_full[b, n : n + 3], v_full[b, n : n + 3] = k_new[b], v_new[b]
    ref_out, ref_lse = _cache_ref(q, k_full, v_full, [n + 3 for n in seqlens], causal=True)
    _close(out, ref_out, TOL[HI], "out")
    _close(lse, ref_lse, TOL[HI], "lse")
    plain = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens + 3, page_table=page_table,
                                        causal=True, scheduler_metadata=torch.zeros(1, dtype=torch.int32),
                                        pack_gqa=False, sm_margin=4)  # fmt: skip
    assert isinstance(plain, torch.Tensor)
    _close(plain, ref_out, TOL[HI], "out without new keys")


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_rotary_seqlens(causal):
    """``rotary_seqlens`` moves the rotary positions of q and the new k (as FlashAttention-3's suite passes it:
    equal to ``cache_seqlens``, the default positions, or elsewhere); without rotary tables it changes nothing."""
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(8)
    batch, cap, hk, d, rd = 2, 48, 2, 32, 16
    q = _rand(batch, 3, 4, d)
    k_new, v_new = _rand(batch, 3, hk, d), _rand(batch, 3, hk, d)
    k_full, v_full = _rand(batch, cap, hk, d), _rand(batch, cap, hk, d)
    angle = torch.rand(cap, rd // 2, device=DEVICE) * 6.28
    cos, sin = torch.cos(angle).to(HI), torch.sin(angle).to(HI)
    seqlens = torch.tensor([10, 29], dtype=torch.int32, device=DEVICE)

    def run(**kw):
        kc, vc = k_full.clone(), v_full.clone()
        return fa3.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=seqlens, causal=causal,
                                           rotary_interleaved=False, **kw)  # fmt: skip

    base = run(rotary_cos=cos, rotary_sin=sin)
    assert torch.equal(run(rotary_cos=cos, rotary_sin=sin, rotary_seqlens=seqlens), base)
    assert torch.equal(run(rotary_seqlens=seqlens // 2), run())
    starts = seqlens // 2
    out = run(rotary_cos=cos, rotary_sin=sin, rotary_seqlens=starts)
    if causal:
        q_ro = apply_rotary_emb(q, cos, sin, seqlen_offsets=starts)
    else:
        q_ro = apply_rotary_emb(q.reshape(batch, 1, -1, d), cos, sin, seqlen_offsets=starts).reshape(q.shape)
    k_ro = apply_rotary_emb(k_new, cos, sin, seqlen_offsets=starts)
    for b, n in enumerate(seqlens.tolist()):
        k_full[b, n : n + 3], v_full[b, n : n + 3] = k_ro[b], v_new[b]
    ref_out, _ = _cache_ref(q_ro, k_full, v_full, [n + 3 for n in seqlens.tolist()], causal=causal)
    _close(out, ref_out, TOL[HI], "out")
    assert not torch.allclose(out, base)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_varlen_q(paged):
    torch.manual_seed(8)
    batch, cap, hk, d, page = 2, 32, 2, 32, 16
    lq, seqlens = [3, 5], [12, 30]
    cu_q = _cu(lq)
    q = _rand(sum(lq), 4, d)
    k_full, v_full = _rand(batch, cap, hk, d), _rand(batch, cap, hk, d)
    if paged:
        page_table = torch.arange(batch * (cap // page), device=DEVICE, dtype=torch.int32).view(batch, -1)
        k_cache, v_cache = k_full.reshape(-1, page, hk, d), v_full.reshape(-1, page, hk, d)
    else:
        page_table, k_cache, v_cache = None, k_full, v_full
    out, lse, *_ = fa3.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEVICE),
        page_table=page_table, cu_seqlens_q=cu_q, max_seqlen_q=max(lq), causal=True, return_softmax_lse=True,
    )  # fmt: skip
    assert out.shape == (sum(lq), 4, d) and lse.shape == (4, sum(lq))
    for b, (s0, n) in enumerate([(0, 12), (3, 30)]):
        ro, rl = attention_ref(
            q[None, s0 : s0 + lq[b]], k_full[b : b + 1, :n], v_full[b : b + 1, :n], causal=True
        )
        _close(out[s0 : s0 + lq[b]], ro[0], TOL[HI], f"out[{b}]")
        _close(lse[:, s0 : s0 + lq[b]], rl[0], TOL[HI], f"lse[{b}]")


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_varlen_q_appends_packed_keys(paged, causal):
    """Packed q with packed new keys (``cu_seqlens_k_new``), rotated from ``rotary_seqlens``: written after each
    sequence's cached rows (through the page table), then attended (from ``cache_leftpad`` on, contiguous
    caches), as FlashAttention-3's varlen decode."""
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(9)
    batch, cap, hk, d, page, rd = 2, 32, 2, 32, 16, 16
    lq, lnew, seqlens = [3, 2], [2, 3], [12, 25]
    cu_q, cu_new = _cu(lq), _cu(lnew)
    q = _rand(sum(lq), 4, d)
    k_new, v_new = _rand(sum(lnew), hk, d), _rand(sum(lnew), hk, d)
    k_full, v_full = _rand(batch, cap, hk, d), _rand(batch, cap, hk, d)
    angle = torch.rand(cap, rd // 2, device=DEVICE) * 6.28
    cos, sin = torch.cos(angle).to(HI), torch.sin(angle).to(HI)
    starts = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)
    lp = [0, 0] if paged else [3, 7]
    if paged:
        perm = torch.randperm(batch * (cap // page), device=DEVICE)
        page_table = perm.view(batch, -1).to(torch.int32)
        k_cache = torch.empty(batch * (cap // page), page, hk, d, device=DEVICE, dtype=HI)
        v_cache = torch.empty_like(k_cache)
        k_cache[perm], v_cache[perm] = k_full.reshape(-1, page, hk, d), v_full.reshape(-1, page, hk, d)
    else:
        page_table, k_cache, v_cache = None, k_full.clone(), v_full.clone()
    out, lse, *_ = fa3.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), page_table=page_table,
        cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_new, max_seqlen_q=max(lq), rotary_seqlens=starts, causal=causal,
        rotary_interleaved=False, return_softmax_lse=True,
        cache_leftpad=None if paged else torch.tensor(lp, dtype=torch.int32, device=DEVICE),
    )  # fmt: skip
    for b in range(batch):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_new[b]), int(cu_new[b + 1]))
        off = starts[b : b + 1]
        q_b = q[None, qs]
        if causal:
            q_ro = apply_rotary_emb(q_b, cos, sin, seqlen_offsets=off)
        else:
            q_ro = apply_rotary_emb(q_b.reshape(1, 1, -1, d), cos, sin, seqlen_offsets=off).reshape(q_b.shape)
        n = seqlens[b]
        k_full[b, n : n + lnew[b]] = apply_rotary_emb(k_new[None, ks], cos, sin, seqlen_offsets=off)[0]
        v_full[b, n : n + lnew[b]] = v_new[ks]
        keys = slice(lp[b], n + lnew[b])
        ro, rl = attention_ref(q_ro, k_full[b : b + 1, keys], v_full[b : b + 1, keys], causal=causal)
        _close(out[qs], ro[0], TOL[HI], f"out[{b}]")
        _close(lse[:, qs], rl[0], TOL[HI], f"lse[{b}]")
    cached = k_cache[page_table.long()].reshape(batch, cap, hk, d) if paged else k_cache
    _close(cached, k_full, TOL[HI], "cache after the append")


def test_get_scheduler_metadata():
    seqlens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    meta = fa3.get_scheduler_metadata(2, 1, 64, 4, 2, 32, seqlens)
    assert meta.dtype == torch.int32 and meta.device == seqlens.device


# ------------------------------------------------------------------------------------------ combine
def _combine_ref(out_partial, lse_partial):
    lse = torch.logsumexp(lse_partial, dim=0)
    scale = torch.exp(lse_partial - lse)
    scale = torch.where(torch.isnan(scale), torch.zeros_like(scale), scale)
    return (scale.unsqueeze(-1) * out_partial).sum(0), lse


@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_combine_matches_reference(out_dtype):
    torch.manual_seed(9)
    splits, b, s, h, d = 3, 2, 5, 4, 32
    out_partial = torch.randn(splits, b, h, s, d, device=DEVICE).transpose(2, 3)  # non-contiguous
    lse_partial = torch.randn(splits, b, s, h, device=DEVICE) * 20
    lse_partial[1:, 0] = float("-inf")  # empty splits
    lse_partial[:, 1, 2] = float("-inf")  # rows with no key at all
    out, lse = fa3.flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
    ref_out, ref_lse = _combine_ref(out_partial, lse_partial)
    assert out.dtype == (out_dtype or torch.float32) and out.shape == (b, s, h, d)
    assert lse.shape == (b, s, h) and lse.transpose(1, 2).is_contiguous()
    _close(out, ref_out, 1e-5 if out_dtype is None else 2e-3, "out")
    assert torch.all(lse[1, 2] == float("-inf")) and torch.all(out[1, 2] == 0)
    _close(lse, ref_lse, 1e-5, "lse")
    buf = torch.empty(b, s, h, d, device=DEVICE)
    got, _ = fa3.flash_attn_combine(out_partial, lse_partial, out=buf)
    assert got is buf and torch.allclose(buf, ref_out, atol=1e-5)


def test_combine_merges_split_attention():
    """Attention over two key halves, combined, equals attention over all keys."""
    torch.manual_seed(10)
    q, k, v = _rand(1, 6, 2, 32), _rand(1, 40, 2, 32), _rand(1, 40, 2, 32)
    parts = [
        fa3.flash_attn_func(q, k[:, a:e], v[:, a:e], return_attn_probs=True) for a, e in ((0, 17), (17, 40))
    ]
    out_partial = torch.stack([o.float() for o, _ in parts])
    lse_partial = torch.stack([lse.transpose(1, 2) for _, lse in parts])
    out, lse = fa3.flash_attn_combine(out_partial, lse_partial, out_dtype=q.dtype)
    ref_out, ref_lse = attention_ref(q, k, v)
    _close(out, ref_out, TOL[HI], "out")
    _close(lse.transpose(1, 2), ref_lse, TOL[HI], "lse")


def test_combine_checks():
    with pytest.raises(TypeError, match="float32"):
        fa3.flash_attn_combine(torch.zeros(2, 1, 1, 1, 8, dtype=torch.float16), torch.zeros(2, 1, 1, 1))
    with pytest.raises(FlashAttnValueError, match="lse_partial"):
        fa3.flash_attn_combine(torch.zeros(2, 1, 1, 1, 8), torch.zeros(3, 1, 1, 1))


# -------------------------------------------------------------------------------------------- FP8
@pytest.mark.gpu
def test_fp8_forward_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda") for _ in range(3))
    scale = torch.full((2, 4), 0.5, device="cuda")
    q8, k8, v8 = ((t / 0.5).to(torch.float8_e4m3fn) for t in (q, k, v))
    out = fa3.flash_attn_func(q8, k8, v8, causal=True, q_descale=scale, k_descale=scale, v_descale=scale)
    assert out.dtype == torch.bfloat16
    deq = [t.float() * 0.5 for t in (q8, k8, v8)]
    ref, _ = attention_ref(*deq, causal=True)
    assert (out.float() - ref).abs().max().item() < 0.1
    assert math.isfinite(out.float().abs().max().item())


# ------------------------------------------------------------------------------------ torch.ops.flash_attn_3
#: the CUDA build's operator schemas (FlashAttention-3's backward-compatibility contract)
FA3_OP_SCHEMAS = {
    "fwd": (
        "flash_attn_3::fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, "
        "Tensor(v_new!)? v_new=None, Tensor? q_v=None, Tensor(out!)? out=None, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, Tensor? seqused_k=None, "
        "int? max_seqlen_q=None, int? max_seqlen_k=None, Tensor? page_table=None, "
        "Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, "
        "Tensor? seqlens_rotary=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
        "float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, int window_size_right=-1, "
        "int attention_chunk=0, float softcap=0., bool is_rotary_interleaved=False, "
        "Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) "
        "-> (Tensor(out!), Tensor, Tensor, Tensor)"
    ),
    "bwd": (
        "flash_attn_3::bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
        "Tensor(dq!)? dq=None, Tensor(dk!)? dk=None, Tensor(dv!)? dv=None, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, "
        "int? max_seqlen_k=None, float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
        "int window_size_right=-1, float softcap=0., bool deterministic=False, int sm_margin=0) "
        "-> (Tensor(dq!), Tensor(dk!), Tensor(dv!), Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "fwd_combine": (
        "flash_attn_3::fwd_combine(Tensor out_partial, Tensor lse_partial, Tensor(out!)? out=None, "
        "ScalarType? out_dtype=None) -> (Tensor(out!), Tensor)"
    ),
    "get_scheduler_metadata": (
        "flash_attn_3::get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, "
        "int num_heads, int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, Tensor seqused_k, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
        "Tensor? seqused_q=None, Tensor? leftpad_k=None, int? page_size=None, int max_seqlen_k_new=0, "
        "bool is_causal=False, int window_size_left=-1, int window_size_right=-1, "
        "int attention_chunk=0, bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, "
        "int sm_margin=0) -> Tensor"
    ),
}


@pytest.mark.parametrize("name", sorted(FA3_OP_SCHEMAS))
def test_ops_schemas_are_fa3_compatible(name):
    from torch._C import parse_schema

    op = getattr(torch.ops.flash_attn_3, name).default
    assert op._schema.is_backward_compatible_with(parse_schema(FA3_OP_SCHEMAS[name]))


def test_ops_fwd_bwd_match_the_functions():
    """``torch.ops.flash_attn_3.fwd`` dispatches dense / varlen / KV cache as FA3's forward; ``bwd`` gives the
    autograd gradients; ``fwd_combine`` and ``get_scheduler_metadata`` are the functions."""
    torch.manual_seed(10)
    ops3 = torch.ops.flash_attn_3
    q, k, v = _rand(2, 12, 4, 32, grad=True), _rand(2, 20, 2, 32, grad=True), _rand(2, 20, 2, 32, grad=True)
    out, lse = fa3.flash_attn_func(q, k, v, causal=True, window_size=(6, 0), return_attn_probs=True)
    buf = torch.full_like(out, float("nan"))
    o2, l2, acc, lacc = ops3.fwd(q.detach(), k.detach(), v.detach(), out=buf, is_causal=True, window_size_left=6,
                                 window_size_right=0)  # fmt: skip
    assert o2.data_ptr() == buf.data_ptr() and acc.numel() == 0 and lacc.numel() == 0
    _close(o2, out, 1e-6, "dense out")
    _close(l2, lse, 1e-6, "dense lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    dq, dk, dv, softmax_d, *rest = ops3.bwd(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                            is_causal=True, window_size_left=6, window_size_right=0)  # fmt: skip
    for name, g, r in zip("qkv", (dq, dk, dv), grads):
        _close(g, r, 1e-5, f"d{name}")
    # varlen
    cu_q, cu_k = _cu([5, 7]), _cu([9, 11])
    qv_, kv_, vv_ = _rand(12, 4, 32, grad=True), _rand(20, 2, 32, grad=True), _rand(20, 2, 32, grad=True)
    out_v, lse_v = fa3.flash_attn_varlen_func(
        qv_, kv_, vv_, cu_q, cu_k, 7, 11, causal=True, return_attn_probs=True
    )
    o3, l3, *_ = ops3.fwd(qv_.detach(), kv_.detach(), vv_.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=7, max_seqlen_k=11, is_causal=True)  # fmt: skip
    _close(o3, out_v, 1e-6, "varlen out")
    _close(l3, lse_v, 1e-6, "varlen lse")
    dout_v = torch.randn_like(out_v)
    grads_v = torch.autograd.grad(out_v, (qv_, kv_, vv_), dout_v)
    res_v = ops3.bwd(dout_v, qv_.detach(), kv_.detach(), vv_.detach(), out_v.detach(), lse_v.detach(),
                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=11, is_causal=True)  # fmt: skip
    for name, g, r in zip("qkv", res_v[:3], grads_v):
        _close(g, r, 1e-5, f"varlen d{name}")
    # KV cache: new keys appended in place, cache lengths as seqused_k
    kc, vc = _rand(2, 24, 2, 32), _rand(2, 24, 2, 32)
    kn, vn = _rand(2, 2, 2, 32), _rand(2, 2, 2, 32)
    qd = _rand(2, 2, 4, 32)
    lens = torch.tensor([5, 17], dtype=torch.int32, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = fa3.flash_attn_with_kvcache(qd, kc2, vc2, kn, vn, cache_seqlens=lens, causal=True)
    o4, *_ = ops3.fwd(qd, kc, vc, kn, vn, seqused_k=lens, is_causal=True)
    _close(o4, ref, 1e-6, "kvcache out")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    # combine and scheduler metadata
    parts, lses = _rand(3, 1, 4, 2, 16, dtype=torch.float32), _rand(3, 1, 4, 2, dtype=torch.float32)
    c_out, c_lse = ops3.fwd_combine(parts, lses)
    r_out, r_lse = fa3.flash_attn_combine(parts, lses)
    assert torch.equal(c_out, r_out) and torch.equal(c_lse, r_lse)
    meta = ops3.get_scheduler_metadata(2, 1, 24, 4, 2, 32, 32, torch.bfloat16, lens)
    assert meta.dtype == torch.int32
