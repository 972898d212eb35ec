"""Tests for fa_core.cross_entropy against torch.nn.functional.cross_entropy (fp32) and the plain-PyTorch
reference, through Triton's interpreter on CPU.

Small vocabularies (7, 100, 1000) with forced small column blocks run the kernels' multi-block paths. The
tensor-parallel path runs in two processes (gloo) and is compared with the single-process result on the full
vocabulary.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fa_core.cross_entropy import (  # noqa: E402
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_loss,
    cross_entropy_loss_ref,
    override_block_sizes,
)
from fa_core.errors import FlashAttnValueError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# flash-attn's tolerances for the gradient (the fp32 reference's gradient rounded to the input dtype); bf16 takes
# those of its tensor-parallel test: with a small vocabulary the probabilities are large and one bf16 ulp
# (2**-8 relative) exceeds 1e-3
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1e-2, 3e-3)}
# (label_smoothing, logit_scale, lse_square_scale)
OPTIONS = [(0.0, 1.0, 0.0), (0.9, 1.0, 0.0), (0.0, 0.7, 1e-2), (0.9, 0.7, 1e-2)]
# vocab -> (forward block, backward block): several blocks per row for the larger vocabularies
BLOCKS = {7: (None, None), 100: (32, 16), 1000: (128, 256)}


def _inputs(rows: int, vocab: int, dtype: torch.dtype, n_ignored: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE, dtype)
    y = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    y[torch.randperm(rows, generator=g)[:n_ignored]] = -100
    return x, y


def _torch_loss(x: torch.Tensor, y: torch.Tensor, smoothing: float, scale: float, z: float, reduction="none"):
    """torch's fp32 cross entropy (+ z-loss) of the scaled logits."""
    xs = x.float() * scale
    loss = F.cross_entropy(xs, y, label_smoothing=smoothing, reduction="none")
    lse = torch.logsumexp(xs, dim=-1)
    z_loss = torch.where(y != -100, z * lse.square(), 0.0)
    loss = loss + z_loss
    if reduction == "mean":
        n = (y != -100).sum()
        return loss.sum() / n, z_loss.sum() / n
    return loss, z_loss


def _run(x, y, blocks=(None, None), g=None, **kw):
    """Loss, z-loss and gradient (for the upstream gradient ``g``, random by default) of cross_entropy_loss."""
    xk = x.detach().clone().requires_grad_()
    with override_block_sizes(*blocks):
        loss, z_loss = cross_entropy_loss(xk, y, **kw)
    if g is None:
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss.backward(g)
    return loss, z_loss, xk.grad, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 100, 1000])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch(dtype, vocab, options):
    smoothing, scale, z = options
    x, y = _inputs(12 if vocab < 1000 else 6, vocab, dtype, n_ignored=2 if vocab < 1000 else 1)
    loss, z_loss, grad, g = _run(
        x, y, BLOCKS[vocab], label_smoothing=smoothing, logit_scale=scale, lse_square_scale=z
    )
    assert loss.dtype == z_loss.dtype == torch.float32 and loss.shape == z_loss.shape == y.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    x_pt = x.detach().clone().requires_grad_()
    loss_pt, z_pt = _torch_loss(x_pt, y, smoothing, scale, z)
    torch.testing.assert_close(loss, loss_pt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_loss, z_pt, rtol=1e-5, atol=1e-6)
    mean, mean_pt = loss.sum() / (y != -100).sum(), loss_pt.sum() / (y != -100).sum()
    assert torch.allclose(mean, mean_pt, rtol=1e-5, atol=1e-6)
    loss_pt.backward(g)
    rtol, atol = GRAD_TOL[dtype]
    assert torch.allclose(grad, x_pt.grad, rtol=rtol, atol=atol), (
        (grad.float() - x_pt.grad.float()).abs().max()
    )
    # the plain-PyTorch reference agrees
    ref, ref_z = cross_entropy_loss_ref(x, y, smoothing, scale, z)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_loss, ref_z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_block_equals_single_block(dtype):
    x, y = _inputs(8, 1000, dtype)
    kw = {"label_smoothing": 0.1, "logit_scale": 0.5, "lse_square_scale": 1e-3}
    one = _run(x, y, (1024, 1024), **kw)
    for blocks in [(32, 128), (128, 512)]:
        many = _run(x, y, blocks, **kw)
        torch.testing.assert_close(many[0], one[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many[2], one[2], rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_precomputed_lse(dtype):
    x, y = _inputs(10, 100, dtype)
    lse = torch.logsumexp(x.float(), dim=-1)
    base = _run(x, y, (32, 32), lse_square_scale=1e-2)
    pre = _run(x, y, (32, 32), precomputed_lse=lse, lse_square_scale=1e-2)
    for a, b in zip(pre[:3], base[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-3)
    # the given lse is what the loss uses (no lse pass): shifting it shifts every kept row's loss
    shifted = _run(x, y, (32, 32), precomputed_lse=lse + 1.0)[0]
    plain = _run(x, y, (32, 32))[0]
    keep = y != -100
    torch.testing.assert_close(shifted[keep], plain[keep] + 1.0, rtol=1e-5, atol=1e-5)
    # with smoothing or a logit scale it is ignored (it would be inexact), as in flash-attn
    for kw in ({"label_smoothing": 0.2}, {"logit_scale": 0.5}):
        a = _run(x, y, precomputed_lse=lse + 1.0, **kw)[0]
        b = _run(x, y, **kw)[0]
        torch.testing.assert_close(a, b)


def _grad_pointers(t: torch.Tensor) -> list[int]:
    """Storage addresses of the gradients that reach ``t`` (before any accumulation into ``t.grad``)."""
    seen: list[int] = []
    t.register_hook(lambda grad: seen.append(grad.data_ptr()))
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_reuses_the_logits_storage(dtype):
    x, y = _inputs(8, 100, dtype)
    kw = {"label_smoothing": 0.3, "lse_square_scale": 1e-2}
    expected = _run(x, y, (32, 32), **kw)[2]
    xk = x.clone().requires_grad_()
    seen = _grad_pointers(xk)
    with override_block_sizes(32, 32):
        loss, _ = cross_entropy_loss(xk, y, inplace_backward=True, **kw)
    loss.backward(torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    assert seen == [xk.data_ptr()], "the gradient must be written into the logits' storage"
    torch.testing.assert_close(xk.grad, expected)
    torch.testing.assert_close(xk.detach(), expected)  # the logits now hold their gradient
    # out of place, the logits are left alone
    xk = x.clone().requires_grad_()
    seen = _grad_pointers(xk)
    cross_entropy_loss(xk, y, **kw)[0].sum().backward()
    assert seen != [xk.data_ptr()] and torch.equal(xk.detach(), x)
    # a non-leaf logits tensor (an LM head's output): its gradient reaches the matmul in the logits' storage
    w = torch.randn(16, 100, device=DEVICE, dtype=dtype).requires_grad_()
    h = torch.randn(8, 16, device=DEVICE).to(dtype)
    logits = h @ w
    seen = _grad_pointers(logits)
    loss, _ = cross_entropy_loss(logits, y, inplace_backward=True)
    loss.sum().backward()
    w_pt = w.detach().float().requires_grad_()
    F.cross_entropy(h.float() @ w_pt, y, reduction="sum").backward()
    assert seen == [logits.data_ptr()]
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(w.grad.float(), w_pt.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignored_rows_have_zero_loss_and_grad(ignore_index):
    x, y = _inputs(10, 100, torch.float32, n_ignored=0)
    y[[1, 4, 7]] = ignore_index
    loss, z_loss, grad, _ = _run(
        x, y, (32, 16), label_smoothing=0.5, lse_square_scale=1e-2, logit_scale=0.8, ignore_index=ignore_index
    )
    ignored = y == ignore_index
    assert (loss[ignored] == 0).all() and (z_loss[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    assert (loss[~ignored] != 0).all() and (grad[~ignored] != 0).any(dim=-1).all()
    # every row ignored: zero losses and gradient
    all_ignored = torch.full_like(y, ignore_index)
    loss, z_loss, grad, _ = _run(x, all_ignored, lse_square_scale=1e-2, ignore_index=ignore_index)
    assert not loss.any() and not z_loss.any() and not grad.any()


def test_strides_labels_and_expanded_grad():
    x, y = _inputs(6, 100, torch.float32)
    expected_loss, _, expected_grad, g = _run(x, y, label_smoothing=0.1)
    # rows inside a wider buffer (row stride > vocab), and a column-strided view (copied)
    wide = torch.zeros(6, 130, device=DEVICE)
    wide[:, :100] = x
    cols = torch.zeros(100, 6, device=DEVICE)
    cols.copy_(x.t())
    for view in (wide[:, :100], cols.t()):
        loss, _, grad, _ = _run(view, y.to(torch.int32), label_smoothing=0.1)
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)
    # loss.sum().backward() hands the backward an expanded (stride 0) gradient
    xk = x.clone().requires_grad_()
    cross_entropy_loss(xk, y)[0].sum().backward()
    xp = x.clone().requires_grad_()
    F.cross_entropy(xp, y, reduction="sum").backward()
    torch.testing.assert_close(xk.grad, xp.grad)


def test_z_loss_is_not_differentiable_and_empty_batch():
    x, y = _inputs(4, 7, torch.float32)
    xk = x.clone().requires_grad_()
    loss, z_loss = cross_entropy_loss(xk, y, lse_square_scale=0.1)
    assert loss.requires_grad and not z_loss.requires_grad
    empty = torch.zeros(0, 7, device=DEVICE, requires_grad=True)
    loss, z_loss = cross_entropy_loss(empty, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert loss.shape == z_loss.shape == (0,)
    loss.sum().backward()
    assert empty.grad is not None and empty.grad.shape == (0, 7)


def test_invalid_arguments():
    x, y = _inputs(4, 7, torch.float32)
    with pytest.raises(FlashAttnValueError):
        cross_entropy_loss(x, y[:3])
    with pytest.raises(FlashAttnValueError):
        cross_entropy_loss(x, y, logit_scale=0.0)
    with pytest.raises(FlashAttnValueError):
        cross_entropy_loss(x[None], y)
    with pytest.raises(TypeError):
        cross_entropy_loss(x, y.float())
    with pytest.raises(FlashAttnValueError):
        cross_entropy_loss(x, y, precomputed_lse=torch.zeros(3, device=DEVICE))
    with pytest.raises(FlashAttnValueError), override_block_sizes(forward=24):
        pass


def test_checks_catch_a_wrong_implementation():
    """The comparisons above have teeth: a forward that smooths over the wrong class count and a backward that
    drops the z-loss term are both caught at the tolerances used."""
    x, y = _inputs(8, 100, torch.float32)
    y = y.clamp_min(0).contiguous()
    smoothing, z = 0.9, 1e-2
    loss_pt, _ = _torch_loss(x, y, smoothing, 1.0, z)
    args = (smoothing, 1.0, z, -100)
    loss, lse, _ = cross_entropy_fwd(x, y, None, *args, total_classes=101, class_start_idx=0, split=False)
    assert not torch.allclose(loss, loss_pt, rtol=1e-5, atol=1e-5)
    loss, lse, _ = cross_entropy_fwd(x, y, None, *args, total_classes=100, class_start_idx=0, split=False)
    torch.testing.assert_close(loss, loss_pt, rtol=1e-5, atol=1e-5)
    x_pt = x.clone().requires_grad_()
    _torch_loss(x_pt, y, smoothing, 1.0, z)[0].sum().backward()
    dloss = torch.ones(8, device=DEVICE)
    wrong = cross_entropy_bwd(torch.empty_like(x), dloss, x, lse, y, smoothing, 1.0, 0.0, -100, 100, 0)
    assert not torch.allclose(wrong, x_pt.grad, rtol=1e-5, atol=1e-6)
    right = cross_entropy_bwd(torch.empty_like(x), dloss, x, lse, y, smoothing, 1.0, z, -100, 100, 0)
    assert torch.allclose(right, x_pt.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- tensor parallel (gloo)
WORLD = 2
TP_ROWS, TP_VOCAB = 8, 200  # 100 columns per rank
# (dtype, label_smoothing, logit_scale, lse_square_scale, precompute_lse, inplace_backward)
TP_CASES = [
    ("float32", 0.0, 1.0, 0.0, False, False),
    ("float32", 0.9, 0.7, 1e-2, False, True),
    ("float16", 0.0, 1.0, 1e-2, True, True),
    ("bfloat16", 0.2, 0.7, 0.0, False, False),
]


def _tp_inputs(case):
    dtype = getattr(torch, case[0])
    x, y = _inputs(TP_ROWS, TP_VOCAB, dtype, n_ignored=2, seed=5)
    g = torch.randn(TP_ROWS, generator=torch.Generator().manual_seed(6))
    return x, y, g


def _tp_worker(rank: int, store_dir: str) -> None:
    """One rank: every case on its vocab shard; results saved to store_dir/rank{rank}.pt."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD)
    try:
        shard = TP_VOCAB // WORLD
        results = []
        for case in TP_CASES:
            _, smoothing, scale, z, precompute, inplace = case
            x, y, g = _tp_inputs(case)
            xk = x[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
            lse = torch.logsumexp(xk.detach().float(), dim=-1) if precompute else None
            with override_block_sizes(32, 64):
                loss, z_loss = cross_entropy_loss(
                    xk,
                    y,
                    precomputed_lse=lse,
                    label_smoothing=smoothing,
                    logit_scale=scale,
                    lse_square_scale=z,
                    inplace_backward=inplace,
                    process_group=dist.group.WORLD,
                )
            seen = _grad_pointers(xk)
            loss.backward(g)
            assert seen == [xk.data_ptr()] if inplace else seen != [xk.data_ptr()]
            results.append((loss.detach(), z_loss, xk.grad))
        torch.save(results, os.path.join(store_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_tp_workers(store_dir: str) -> list:
    """Run :func:`_tp_worker` on WORLD spawned processes; per rank, the results of every case."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    # spawned processes import the worker by module name (they inherit sys.path at spawn time): make this file
    # importable as a top-level module for the duration of the spawn
    here = os.path.dirname(os.path.abspath(__file__))
    name = os.path.splitext(os.path.basename(__file__))[0]
    sys.path.insert(0, here)
    try:
        module = importlib.import_module(name)
        assert os.path.samefile(module.__file__, __file__), f"{name} resolves to {module.__file__}"
        mp.spawn(module._tp_worker, args=(store_dir,), nprocs=WORLD, join=True)
    finally:
        sys.path.remove(here)
    return [torch.load(os.path.join(store_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_tensor_parallel_matches_full_vocab(tmp_path):
    # one test (one spawn) for every case: under pytest-xdist the processes start once, on one worker
    tp_results = _spawn_tp_workers(str(tmp_path))
    for index, case in enumerate(TP_CASES):
        _check_tp_case(case, [results[index] for results in tp_results])


def _check_tp_case(case, rank_results) -> None:
    dtype_name, smoothing, scale, z, _, _ = case
    x, y, g = _tp_inputs(case)
    loss, z_loss, grad, _ = _run(x, y, g=g, label_smoothing=smoothing, logit_scale=scale, lse_square_scale=z)
    x_pt = x.clone().requires_grad_()
    loss_pt, _ = _torch_loss(x_pt, y, smoothing, scale, z)
    loss_pt.backward(g)
    shard = TP_VOCAB // WORLD
    grad_tol = {"float32": (1e-5, 2e-5), "float16": (1e-3, 1e-4), "bfloat16": (1e-2, 3e-3)}[dtype_name]
    for rank, (r_loss, r_z, r_grad) in enumerate(rank_results):
        where = f"case {case}, rank {rank}"
        assert torch.allclose(r_loss, loss, rtol=1e-5, atol=1e-5), where
        assert torch.allclose(r_loss, loss_pt, rtol=1e-5, atol=1e-5), where
        assert torch.allclose(r_z, z_loss, rtol=1e-5, atol=1e-6), where
        cols = slice(rank * shard, (rank + 1) * shard)
        assert torch.allclose(r_grad, x_pt.grad[:, cols], rtol=grad_tol[0], atol=grad_tol[1]), where
        assert torch.allclose(r_grad.float(), grad[:, cols].float(), rtol=1e-3, atol=grad_tol[1]), where
