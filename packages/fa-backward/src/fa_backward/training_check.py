"""A small causal language model for comparing training with our attention and with SDPA's flash backend.

Used by the GPU test ``tests/test_gpu.py::test_gpu_training_matches_sdpa`` and by ``bench/train_compare.py``
(which records the loss curves). Three pre-norm blocks (attention + MLP) over a byte vocabulary; the attention
runs in bf16 either through :func:`fa_backward.flash_attn_func` or through
``F.scaled_dot_product_attention`` restricted to the flash backend; everything else is fp32.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fa_backward.interface import flash_attn_func

__all__ = [
    "ATTENTIONS",
    "GAP_FLOOR",
    "TinyLM",
    "TrainingComparison",
    "compare_training",
    "corpus",
    "max_relative_gap",
    "smooth",
    "train_losses",
]

#: the two attention implementations the comparison trains with
ATTENTIONS = ("ours", "sdpa")

#: curves closer than this (relative, 20-step smoothed) agree whatever the reference's own spread
GAP_FLOOR = 0.05

_WARMUP_STEPS = 10


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


def corpus(seed: int = 123, device: str = "cuda") -> torch.Tensor:
    """The fixed token corpus of the comparison: 8 batches of 8 x 512 (+1) random byte ids from ``seed``,
    ``(8, 8, 513)`` int64 (the model memorises them)."""
    torch.manual_seed(seed)
    return torch.randint(0, 256, (8, 8, 513), device=device)


def train_losses(
    attn: str,
    steps: int,
    data: torch.Tensor,
    seed: int = 0,
    wrap: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
    timings: list[float] | None = None,
) -> list[float]:
    """Train a :class:`TinyLM` from seed ``seed`` for ``steps`` AdamW steps (lr 1e-3) on ``data (n_batches,
    batch, seqlen + 1)`` token ids, cycling through its batches (next-token loss); return the loss of every
    step. ``wrap`` may add a progress bar around the step range; ``timings``, when given, receives the mean ms
    per step after the first ``_WARMUP_STEPS`` (compilation and autotuning happen there)."""
    torch.manual_seed(seed)
    model = TinyLM(attn).to(data.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in wrap(range(steps)):
        if step == _WARMUP_STEPS and timings is not None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        tokens = data[step % data.shape[0]]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    if timings is not None and steps > _WARMUP_STEPS:
        torch.cuda.synchronize()
        timings.append((time.perf_counter() - t0) * 1e3 / (steps - _WARMUP_STEPS))
    return losses


def smooth(xs: Sequence[float], w: int = 20) -> list[float]:
    """Trailing mean over ``w`` steps (the first steps average what exists)."""
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def max_relative_gap(ours: Sequence[float], ref: Sequence[float], w: int = 20) -> float:
    """Largest relative difference between the two ``w``-step smoothed loss curves."""
    return max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(smooth(ours, w), smooth(ref, w)))


@dataclass
class TrainingComparison:
    """Loss curves of repeated runs with each attention, and the verdict.

    SDPA's flash backend (FA2) accumulates dQ with atomics, so two SDPA runs from the same seed and data drift
    apart in bf16; late in memorisation the losses are small and chaotic, and that drift reaches several percent.
    ``noise`` is the largest gap between two SDPA runs; ``gap`` the largest gap between one of our runs and one
    SDPA run. The curves agree when ``gap <= max(GAP_FLOOR, 2 * noise)``: ours is no further from SDPA than
    SDPA is from itself, up to the factor 2 the accuracy rule of the kernels uses.
    """

    curves: dict[str, list[list[float]]]
    ms_per_step: dict[str, float]
    gap: float
    noise: float
    bar: float = field(init=False)
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.bar = max(GAP_FLOOR, 2 * self.noise)
        self.ok = self.gap <= self.bar


def _named(
    wrap: Callable[[Iterable[int], str], Iterable[int]], name: str, it: Iterable[int]
) -> Iterable[int]:
    return wrap(it, name)


def compare_training(
    steps: int,
    data: torch.Tensor,
    repeats: dict[str, int] | None = None,
    wrap: Callable[[Iterable[int], str], Iterable[int]] = lambda it, name: it,
) -> TrainingComparison:
    """Train :class:`TinyLM` with each attention ``repeats[attn]`` times from the same seed on ``data (n_batches,
    batch, seqlen + 1)`` and compare the curves (see :class:`TrainingComparison`). Default: ours once (our
    backward has no atomics, so a second run is bitwise the same), sdpa three times."""
    repeats = repeats or {"ours": 1, "sdpa": 3}
    if repeats.get("sdpa", 0) < 2 or repeats.get("ours", 0) < 1:
        raise ValueError(f"repeats needs sdpa >= 2 and ours >= 1, got {repeats}")
    curves: dict[str, list[list[float]]] = {a: [] for a in ATTENTIONS}
    ms: dict[str, list[float]] = {a: [] for a in ATTENTIONS}
    for attn in ATTENTIONS:
        for r in range(repeats[attn]):
            curves[attn].append(
                train_losses(
                    attn,
                    steps,
                    data,
                    wrap=functools.partial(_named, wrap, f"{attn} #{r + 1}"),
                    timings=ms[attn],
                )
            )
    noise = max(max_relative_gap(a, b) for a, b in itertools.combinations(curves["sdpa"], 2))
    gap = max(max_relative_gap(a, b) for a in curves["ours"] for b in curves["sdpa"])
    return TrainingComparison(curves, {a: min(v) for a, v in ms.items() if v}, gap, noise)
