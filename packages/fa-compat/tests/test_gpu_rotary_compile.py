"""GPU: rotary under ``torch.compile(fullgraph=True)`` with inductor, and the kernel's compile count.

* Every case of ``rotary_cases.NAMES`` (every public function: ``apply_rotary_emb`` / ``_func``,
  ``apply_rotary_emb_qkv_`` (packed and GQA, separate K tables), ``apply_rotary_emb_kv_``,
  ``RotaryEmbedding`` (qkv and q + kv, XPos), ``flash_attn.ops.triton.rotary.apply_rotary`` (conjugate);
  offsets 0 / int / (batch,) tensor; interleaved or not; full or partial rotary dim; in place or not; varlen)
  compiles with inductor, forward and backward, in bf16 (a subset in fp16), and gives the eager bits and the
  2x rule against the float64 reference. A subset also without a gradient (in place: the caller's tensor is
  rotated) and with ``dynamic=True``.
* The reported form: bf16 packed qkv (32, 512, 3, 4, 128) with (32,) int32 offsets.
* ``rotary_kernel`` compiles once per dtype / constexpr class: sweeping batch in {1, 2, 3, 5, 8} and seqlen in
  {17, 64, 100, 513}, eager and compiled, forward and backward, adds one cache entry for the forward and one
  for the backward (conjugate), then one each for tensor offsets.

Run alone: ``python -m pytest packages/fa-compat/tests/test_gpu_rotary_compile.py -m gpu -q``.
"""

from __future__ import annotations

import pytest
import torch
from rotary_cases import NAMES, Dims, build, check

from flash_attn.layers.rotary import apply_rotary_emb, apply_rotary_emb_qkv_
from flash_attn.ops.triton.rotary import rotary_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DIMS = Dims(batch=3, seqlen=100, nheads=4, headdim=128, varlen=(17, 100, 1, 64))
FP16_NAMES = [
    "emb,off=tensor,il=0,rd=full,inplace=0",
    "emb,varlen=1,off=tensor,il=1,rd=half,inplace=1",
    "qkv,gqa=1,off=tensor,il=1,rd=half",
    "kv,off=int,il=1,rd=half",
    "module,off=tensor,il=1,rd=full,xpos=1",
    "ops,off=int,il=1,rd=half,inplace=0",
]
NO_GRAD_NAMES = [
    "emb,off=tensor,il=1,rd=half,inplace=1",
    "qkv,gqa=0,off=tensor,il=0,rd=full",
    "qkv,gqa=1,off=int,il=1,rd=half",
    "kv,off=tensor,il=0,rd=full",
    "module,off=int,il=0,rd=half",
    "ops,varlen=1,off=tensor,il=0,rd=full",
]
DYNAMIC_NAMES = [
    "emb,off=int,il=0,rd=full,inplace=0",
    "emb,varlen=1,off=tensor,il=1,rd=half,inplace=1",
    "qkv,gqa=1,off=tensor,il=0,rd=full",
    "kv,off=int,il=1,rd=half",
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inductor(case, dynamic: bool | None = None):
    return torch.compile(case.make_fn(), backend="inductor", fullgraph=True, dynamic=dynamic)


@pytest.mark.parametrize(
    "name, dtype",
    [(n, torch.bfloat16) for n in NAMES] + [(n, torch.float16) for n in FP16_NAMES],
)
def test_inductor_fwd_bwd(name, dtype):
    torch.manual_seed(0)
    case = build(name, DEVICE, dtype, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _inductor(case), grad=True, eager=eager)


@pytest.mark.parametrize("name", NO_GRAD_NAMES)
def test_inductor_no_grad_in_place(name):
    torch.manual_seed(1)
    case = build(name, DEVICE, torch.bfloat16, DIMS)
    eager = check(case, case.make_fn(), grad=False)
    check(case, _inductor(case), grad=False, eager=eager)


@pytest.mark.parametrize("name", DYNAMIC_NAMES)
def test_inductor_dynamic_shapes(name):
    torch.manual_seed(2)
    case = build(name, DEVICE, torch.bfloat16, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _inductor(case, dynamic=True), grad=True, eager=eager)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_reported_packed_qkv_tensor_offsets(gqa, interleaved):
    # bf16 qkv (32, 512, 3, 4, 128), (32,) int32 offsets, torch.compile(apply_rotary_emb_qkv_), fwd + bwd
    from fa_core.rotary_ref import apply_rotary_ref
    from fa_core.testing import assert_close_2x

    torch.manual_seed(3)
    batch, seqlen, nheads, headdim = 32, 512, 4, 128
    hk = nheads // 2
    shape = (batch, seqlen, nheads + 2 * hk, headdim) if gqa else (batch, seqlen, 3, nheads, headdim)
    qkv0 = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    angle = torch.rand(2 * seqlen, headdim // 2, device=DEVICE) * 2 * torch.pi
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    offsets = torch.randint(0, seqlen, (batch,), dtype=torch.int32, device=DEVICE)
    kw = dict(seqlen_offsets=offsets, interleaved=interleaved, num_heads_q=nheads if gqa else None)
    fn = torch.compile(apply_rotary_emb_qkv_, fullgraph=True)
    g = torch.randn_like(qkv0)
    results = []
    for f in (apply_rotary_emb_qkv_, fn):
        qkv = qkv0.clone().requires_grad_()
        out = f(qkv, cos, sin, **kw)
        out.backward(g)
        results.append((out.detach().clone(), qkv.grad))
    (out_e, grad_e), (out_c, grad_c) = results
    assert torch.equal(out_c, out_e) and torch.equal(grad_c, grad_e)

    def ref(x, c, s, conj=False):
        if gqa:
            q, k, v = x[:, :, :nheads], x[:, :, nheads : nheads + hk], x[:, :, nheads + hk :]
            rot = [
                apply_rotary_ref(t, c, s, offsets, interleaved=interleaved, conjugate=conj) for t in (q, k)
            ]
            return torch.cat([*rot, v], dim=2)
        q, k, v = x.unbind(2)
        rot = [apply_rotary_ref(t, c, s, offsets, interleaved=interleaved, conjugate=conj) for t in (q, k)]
        return torch.stack([*rot, v], dim=2)

    assert_close_2x(out_c, ref(qkv0.double(), cos.double(), sin.double()), ref(qkv0, cos, sin), "out")
    # the gradient of a rotation is the conjugate rotation of the incoming gradient
    truth = ref(g.double(), cos.double(), sin.double(), conj=True)
    assert_close_2x(grad_c, truth, ref(g, cos, sin, conj=True), "grad")


# ------------------------------------------------------------------------------------ compile count
def _kernel_cache(device: int) -> dict:
    """The compiled-kernel cache of ``rotary_kernel`` on ``device`` (Triton >= 3.3: ``device_caches[device][0]``,
    older: ``cache[device]``)."""
    if hasattr(rotary_kernel, "device_caches"):
        return rotary_kernel.device_caches[device][0]
    return rotary_kernel.cache[device]


def _sweep(fn_emb, fn_qkv, dtype, tensor_offsets: bool) -> None:
    nheads, headdim = 4, 128
    for batch in (1, 2, 3, 5, 8):
        for seqlen in (17, 64, 100, 513):
            angle = torch.rand(seqlen + 8, headdim // 2, device=DEVICE) * 2 * torch.pi
            cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
            offsets = (
                torch.randint(0, 8, (batch,), dtype=torch.int32, device=DEVICE)
                if tensor_offsets
                else seqlen % 7
            )
            x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
            out = fn_emb(x, cos, sin, seqlen_offsets=offsets)
            out.backward(torch.randn_like(out))
            qkv = torch.randn(
                batch, seqlen, 3, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True
            )
            out = fn_qkv(qkv, cos, sin, seqlen_offsets=offsets)
            out.backward(torch.randn_like(out))
            with torch.no_grad():
                fn_qkv(qkv.detach().clone(), cos, sin, seqlen_offsets=offsets)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compilation_count(dtype):
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old_limit = getattr(cfg, limit)
    setattr(cfg, limit, 2**31)  # recompiles of the graph for new shapes are not the subject here
    try:
        device = torch.cuda.current_device()
        cache = _kernel_cache(device)
        cache.clear()
        _sweep(apply_rotary_emb, apply_rotary_emb_qkv_, dtype, tensor_offsets=False)
        # one forward (conjugate=False) and one backward (conjugate=True) kernel, like flash-attn's count
        assert len(cache) == 2, f"{len(cache)} compilations for int offsets"
        compiled_emb = torch.compile(apply_rotary_emb, fullgraph=True)
        compiled_qkv = torch.compile(apply_rotary_emb_qkv_, fullgraph=True)
        _sweep(compiled_emb, compiled_qkv, dtype, tensor_offsets=False)
        assert len(cache) == 2, f"{len(cache)} compilations after the compiled sweep"
        _sweep(apply_rotary_emb, apply_rotary_emb_qkv_, dtype, tensor_offsets=True)
        _sweep(compiled_emb, compiled_qkv, dtype, tensor_offsets=True)
        assert len(cache) == 4, f"{len(cache)} compilations with tensor offsets too"
    finally:
        setattr(cfg, limit, old_limit)
