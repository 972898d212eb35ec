"""flash_attn_with_kvcache over an FP8 (float8_e4m3fn) KV cache with FlashAttention-3's ``k_descale`` /
``v_descale``: the call runs fa_kvcache.unified.unified_attention, new k / v are quantised by append_paged_kv
with the same scales. Checked against the float32 reference (fa_core.reference.attention_ref) on the
dequantised cache read back (``k_cache.float() * k_descale``), on CPU through Triton's interpreter (float32
q: the kernel converts each e4m3 tile to q's dtype, which the interpreter executes; bf16 ``tl.dot`` is wrong
there) or on a GPU (float16 q).
"""

from __future__ import annotations

import math

import pytest
import torch

import fa_kvcache
from fa_core.errors import FlashAttnValueError
from fa_core.reference import attention_ref
from fa_core.rotary_ref import apply_rotary_ref
from fa_kvcache.unified import append_paged_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QDTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
#: float32 q in the interpreter computes exactly on the dequantised values; float16 q rounds them
TOL = 2e-3 if QDTYPE is torch.float32 else 1.5e-2
FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def make_paged(old: list[int], cap_pages: int, *, page: int, nheads_k: int, d: int, seed: int) -> dict:
    """An FP8 paged cache in shuffled pages holding ``old[b]`` rows of sequence ``b``, written by
    append_paged_kv from float32 keys / values with random per-(sequence, kv head) scales."""
    g = _gen(seed)
    batch = len(old)
    nb = batch * cap_pages + 2
    kc = torch.zeros(nb, page, nheads_k, d, dtype=FP8, device=DEVICE)
    vc = torch.zeros_like(kc)
    perm = torch.randperm(nb, generator=g)[: batch * cap_pages]
    bt = perm.view(batch, cap_pages).to(torch.int32).to(DEVICE)
    k_scale = (torch.rand(batch, nheads_k, generator=g) * 0.02 + 0.01).to(DEVICE)
    v_scale = (torch.rand(batch, nheads_k, generator=g) * 0.02 + 0.01).to(DEVICE)
    total = sum(old)
    cu = torch.tensor([0, *torch.tensor(old).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    k_old = _rand(g, total, nheads_k, d, scale=2.0).to(QDTYPE)
    v_old = _rand(g, total, nheads_k, d, scale=2.0).to(QDTYPE)
    zeros = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    append_paged_kv(k_old, v_old, kc, vc, bt, zeros, cu, max(old), k_scale=k_scale, v_scale=v_scale)
    return dict(k_cache=kc, v_cache=vc, block_table=bt, k_descale=k_scale, v_descale=v_scale)


def raw_rows(c: dict, name: str, b: int, n: int) -> torch.Tensor:
    """Rows ``[0, n)`` of sequence ``b`` of ``c[name]`` (paged through ``block_table`` or contiguous through
    ``rows``) as stored: ``(n, nheads_k, d)`` float8_e4m3fn."""
    cache = c[name]
    if c.get("block_table") is not None:
        return cache[c["block_table"][b].long()].reshape(-1, *cache.shape[2:])[:n]
    return cache[c.get("rows", list(range(len(c["k_descale"]))))[b], :n]


def dequant_rows(c: dict, name: str, b: int, n: int) -> torch.Tensor:
    """:func:`raw_rows` dequantised: ``(n, nheads_k, d)`` float32."""
    scale = c["k_descale" if name == "k_cache" else "v_descale"][b]
    return raw_rows(c, name, b, n).float() * scale[None, :, None]


def reference(q: torch.Tensor, c: dict, lens: list[int], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (b, sq, h, dv), lse (b, h, sq))`` of the float32 reference on the dequantised cache."""
    outs, lses = [], []
    for b, n in enumerate(lens):
        k = dequant_rows(c, "k_cache", b, n)
        v = dequant_rows(c, "v_cache", b, n)
        o, l = attention_ref(q[b : b + 1].float(), k[None], v[None], **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def check(out, lse, ref_out, ref_lse) -> None:
    assert out.shape == ref_out.shape and out.dtype == QDTYPE and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out, atol=TOL, rtol=TOL)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("new", [0, 1, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_paged_fp8_vs_reference(page, new, causal):
    """Decode (1 new row) and a chunk (5), or no append; GQA 4 / 2; pages smaller and larger than a tile."""
    old = [37, 3, 70]
    batch, nheads, nheads_k, d = len(old), 4, 2, 32
    cap_pages = math.ceil((max(old) + 5) / page)
    c = make_paged(old, cap_pages, page=page, nheads_k=nheads_k, d=d, seed=page + new)
    g = _gen(100 + new)
    sq = max(new, 1)
    q = _rand(g, batch, sq, nheads, d).to(QDTYPE)
    seqlens = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    kw: dict = {}
    if new:
        kw = dict(
            k=_rand(g, batch, new, nheads_k, d, scale=2.0).to(QDTYPE),
            v=_rand(g, batch, new, nheads_k, d, scale=2.0).to(QDTYPE),
        )
    out, lse = fa_kvcache.flash_attn_with_kvcache(
        q, c["k_cache"], c["v_cache"], cache_seqlens=seqlens, block_table=c["block_table"], causal=causal,
        k_descale=c["k_descale"], v_descale=c["v_descale"], return_softmax_lse=True, **kw,
    )  # fmt: skip
    lens = [o + new for o in old]
    if new:
        # the appended rows are k / k_descale rounded to e4m3 (torch's cast), in e4m3's normal range exactly
        for b in range(batch):
            got = raw_rows(c, "k_cache", b, lens[b])[old[b] :].float()
            exp = (kw["k"][b].float() / c["k_descale"][b][None, :, None]).clamp(-448, 448)
            normal = exp.abs() >= 2**-6
            assert torch.equal(got[normal], exp.to(FP8).float()[normal])
    check(out, lse, *reference(q, c, lens, causal=causal))


@pytest.mark.parametrize("nheads,nheads_k", [(8, 1), (3, 3)])
def test_gqa_groups_and_splits(nheads, nheads_k):
    old = [50, 18]
    c = make_paged(old, 4, page=16, nheads_k=nheads_k, d=32, seed=nheads)
    g = _gen(nheads)
    q = _rand(g, 2, 1, nheads, 32).to(QDTYPE)
    seqlens = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out, lse = fa_kvcache.flash_attn_with_kvcache(
            q, c["k_cache"], c["v_cache"], cache_seqlens=seqlens, block_table=c["block_table"], causal=True,
            num_splits=splits, k_descale=c["k_descale"], v_descale=c["v_descale"], return_softmax_lse=True,
        )  # fmt: skip
        check(out, lse, *reference(q, c, old, causal=True))


@pytest.mark.parametrize("interleaved", [False, True])
def test_append_with_rotary(interleaved):
    """New k rotated at ``cache_seqlens + t`` before quantisation, q rotated alike (causal)."""
    old, new, nheads, nheads_k, d, page = [20, 9], 3, 4, 2, 32, 16
    c = make_paged(old, 3, page=page, nheads_k=nheads_k, d=d, seed=31)
    g = _gen(32)
    q = _rand(g, 2, new, nheads, d).to(QDTYPE)
    k = _rand(g, 2, new, nheads_k, d, scale=2.0).to(QDTYPE)
    v = _rand(g, 2, new, nheads_k, d, scale=2.0).to(QDTYPE)
    ang = torch.rand(3 * page, 8, generator=g).to(DEVICE) * 6.28
    cos, sin = ang.cos().to(QDTYPE), ang.sin().to(QDTYPE)
    seqlens = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    out = fa_kvcache.flash_attn_with_kvcache(
        q, c["k_cache"], c["v_cache"], k, v, cos, sin, seqlens, block_table=c["block_table"], causal=True,
        rotary_interleaved=interleaved, k_descale=c["k_descale"], v_descale=c["v_descale"],
    )  # fmt: skip
    lens = [o + new for o in old]
    q_rot = torch.cat(
        [
            apply_rotary_ref(q[b : b + 1].float(), cos.float(), sin.float(), seqlen_offsets=old[b],
                             interleaved=interleaved)
            for b in range(2)
        ]
    )  # fmt: skip
    for b in range(2):
        k_rot = apply_rotary_ref(
            k[b : b + 1].float(), cos.float(), sin.float(), seqlen_offsets=old[b], interleaved=interleaved
        )[0]
        got = dequant_rows(c, "k_cache", b, lens[b])[old[b] :]
        # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 in the normal range
        big = k_rot.abs() / c["k_descale"][b][None, :, None] >= 2**-6
        assert ((got - k_rot).abs()[big] <= k_rot.abs()[big] * 2**-4 + 1e-6).all()
    ref_out, _ = reference(q_rot, c, lens, causal=True)
    torch.testing.assert_close(out.float(), ref_out, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("seqlen_cache", [64, 48])
def test_contiguous_fp8_cache(seqlen_cache):
    """A contiguous cache viewed as one page per sequence (64) or as pages of 16 (48), with an int
    cache_seqlens and an append."""
    batch, nheads, nheads_k, d, old, new = 2, 4, 2, 32, 30, 2
    g = _gen(seqlen_cache)
    k_scale = (torch.rand(batch, nheads_k, generator=g) * 0.5 + 0.5).to(DEVICE)
    v_scale = (torch.rand(batch, nheads_k, generator=g) * 0.5 + 0.5).to(DEVICE)
    kc = _rand(g, batch, seqlen_cache, nheads_k, d).to(FP8)
    vc = _rand(g, batch, seqlen_cache, nheads_k, d).to(FP8)
    q = _rand(g, batch, new, nheads, d).to(QDTYPE)
    k = _rand(g, batch, new, nheads_k, d).to(QDTYPE)
    v = _rand(g, batch, new, nheads_k, d).to(QDTYPE)
    out, lse = fa_kvcache.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=old, causal=True, k_descale=k_scale, v_descale=v_scale,
        return_softmax_lse=True,
    )  # fmt: skip
    c = dict(k_cache=kc, v_cache=vc, k_descale=k_scale, v_descale=v_scale)
    for b in range(batch):
        torch.testing.assert_close(
            dequant_rows(c, "v_cache", b, old + new)[old:], v[b].float(), atol=0.07, rtol=2**-4
        )
    check(out, lse, *reference(q, c, [old + new] * batch, causal=True))


def test_contiguous_cache_batch_idx():
    """cache_batch_idx picks each sequence's row of a contiguous FP8 cache."""
    nheads, nheads_k, d, lens = 4, 2, 32, [40, 12]
    g = _gen(5)
    kc = _rand(g, 4, 64, nheads_k, d).to(FP8)
    vc = _rand(g, 4, 64, nheads_k, d).to(FP8)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    k_scale = (torch.rand(2, nheads_k, generator=g) + 0.5).to(DEVICE)
    v_scale = (torch.rand(2, nheads_k, generator=g) + 0.5).to(DEVICE)
    q = _rand(g, 2, 1, nheads, d).to(QDTYPE)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = fa_kvcache.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, cache_batch_idx=idx, k_descale=k_scale, v_descale=v_scale,
        return_softmax_lse=True,
    )  # fmt: skip
    c = dict(k_cache=kc, v_cache=vc, k_descale=k_scale, v_descale=v_scale, rows=[3, 1])
    check(out, lse, *reference(q, c, lens))


@pytest.mark.combination  # needs fa-compat (the flash_attn namespace) installed beside fa-kvcache
def test_flash_attn_namespace_passes_descales():
    from flash_attn import flash_attn_with_kvcache

    old = [25, 40]
    c = make_paged(old, 3, page=16, nheads_k=2, d=32, seed=8)
    q = _rand(_gen(8), 2, 1, 4, 32).to(QDTYPE)
    seqlens = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(
        q, c["k_cache"], c["v_cache"], cache_seqlens=seqlens, block_table=c["block_table"], causal=True,
        k_descale=c["k_descale"], v_descale=c["v_descale"],
    )  # fmt: skip
    torch.testing.assert_close(out.float(), reference(q, c, old, causal=True)[0], atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------ bad inputs


def _bad_args() -> dict:
    c = make_paged([10, 20], 2, page=16, nheads_k=2, d=32, seed=1)
    g = _gen(1)
    return dict(
        q=_rand(g, 2, 1, 4, 32).to(QDTYPE),
        k=_rand(g, 2, 1, 2, 32).to(QDTYPE),
        v=_rand(g, 2, 1, 2, 32).to(QDTYPE),
        cache_seqlens=torch.tensor([10, 20], dtype=torch.int32, device=DEVICE),
        **c,
    )


@pytest.mark.parametrize(
    "name,change,exc",
    [
        ("k_descale", lambda a: a.update(k_descale=None), FlashAttnValueError),
        ("v_descale", lambda a: a.update(v_descale=None), FlashAttnValueError),
        ("k_descale", lambda a: a.update(k_descale=a["k_descale"][:1]), FlashAttnValueError),
        ("v_descale", lambda a: a.update(v_descale=a["v_descale"].double()), TypeError),
        ("leftpad", lambda a: a.update(leftpad_k=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
         FlashAttnValueError),
        ("attention_chunk", lambda a: a.update(attention_chunk=16), FlashAttnValueError),
        ("cache_batch_idx", lambda a: a.update(cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
         FlashAttnValueError),
        ("alibi_slopes", lambda a: a.update(alibi_slopes=torch.ones(3, device=DEVICE)), FlashAttnValueError),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"].float()), TypeError),
        ("cache_seqlens", lambda a: a["cache_seqlens"].fill_(32), FlashAttnValueError),
        ("block_table", lambda a: a["block_table"].fill_(1000), FlashAttnValueError),
    ],
)  # fmt: skip
def test_errors_name_the_argument_and_write_nothing(name, change, exc):
    a = _bad_args()
    change(a)
    before = a["k_cache"].view(torch.uint8).clone(), a["v_cache"].view(torch.uint8).clone()
    with pytest.raises(exc, match=name):
        fa_kvcache.flash_attn_with_kvcache(**a)
    assert torch.equal(a["k_cache"].view(torch.uint8), before[0])
    if a["v_cache"].dtype == FP8:
        assert torch.equal(a["v_cache"].view(torch.uint8), before[1])


def test_descales_with_a_non_fp8_cache_are_refused():
    q = torch.randn(1, 1, 2, 32, device=DEVICE).to(QDTYPE)
    kc = torch.zeros(1, 16, 2, 32, device=DEVICE, dtype=QDTYPE)
    ones = torch.ones(1, 2, device=DEVICE)
    with pytest.raises(FlashAttnValueError, match="k_descale"):
        fa_kvcache.flash_attn_with_kvcache(q, kc, kc.clone(), k_descale=ones, v_descale=ones)


def test_contiguous_cache_length_not_divisible_by_16_is_refused():
    q = torch.randn(1, 1, 2, 32, device=DEVICE).to(QDTYPE)
    kc = torch.zeros(1, 24, 2, 32, device=DEVICE).to(FP8)
    ones = torch.ones(1, 2, device=DEVICE)
    with pytest.raises(FlashAttnValueError, match="seqlen_cache"):
        fa_kvcache.flash_attn_with_kvcache(q, kc, kc.clone(), k_descale=ones, v_descale=ones)
