"""A small causal language model for comparing training with our attention and with SDPA's flash backend.

Used by the GPU test ``tests/test_gpu.py::test_gpu_training_matches_sdpa`` and by ``bench/train_compare.py``
(which records the loss curves). Three pre-norm blocks (attention + MLP) over a byte vocabulary; the attention
runs in bf16 either through :func:`fa_backward.flash_attn_func` or through
``F.scaled_dot_product_attention`` restricted to the flash backend; everything else is fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from fa_backward.interface import flash_attn_func

__all__ = ["ATTENTIONS", "TinyLM", "max_relative_gap", "smooth", "train_losses"]

#: the two attention implementations the comparison trains with
ATTENTIONS = ("ours", "sdpa")


class _Block(torch.nn.Module):
    def __init__(self, dim: int, nheads: int, attn: str) -> None:
        super().__init__()
        if attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")
        self.nheads, self.attn = nheads, attn
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, self.nheads, dim // self.nheads).to(torch.bfloat16)
        q, k, v = qkv.unbind(2)
        if self.attn == "ours":
            a = flash_attn_func(q, k, v, causal=True)
        else:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                a = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                ).transpose(1, 2)
        x = x + self.proj(a.reshape(b, s, dim).float())
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    """``tokens (batch, seqlen) int64 -> logits (batch, seqlen, vocab)``."""

    def __init__(self, attn: str, vocab: int = 256, dim: int = 256, nheads: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, nheads, attn) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def train_losses(
    attn: str,
    steps: int,
    data: torch.Tensor,
    seed: int = 0,
    wrap: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> list[float]:
    """Train a :class:`TinyLM` from seed ``seed`` for ``steps`` AdamW steps (lr 1e-3) on ``data (n_batches,
    batch, seqlen + 1)`` token ids, cycling through its batches (next-token loss); return the loss of every
    step. ``wrap`` may add a progress bar around the step range."""
    torch.manual_seed(seed)
    model = TinyLM(attn).to(data.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in wrap(range(steps)):
        tokens = data[step % data.shape[0]]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return losses


def smooth(xs: Sequence[float], w: int = 20) -> list[float]:
    """Trailing mean over ``w`` steps (the first steps average what exists)."""
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def max_relative_gap(ours: Sequence[float], ref: Sequence[float], w: int = 20) -> float:
    """Largest relative difference between the two ``w``-step smoothed loss curves."""
    return max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(smooth(ours, w), smooth(ref, w)))
