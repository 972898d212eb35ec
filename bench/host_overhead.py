"""Host (CPU) time per call of the public API, against SDPA's flash backend and FlagGems, in one process.

Short sequences are launch-bound: what the host spends per call decides the speed there. This script times,
on tiny inputs (GPU work far below the host time, so the queue never backs up), the wall time per call of a
loop of calls with no synchronisation inside it (``common.host_ms_per_call``), for

* ``fwd``: the forward, inputs that do not require grad (``flash_attn.flash_attn_func``);
* ``fwd_bwd``: inputs that require grad, forward + ``torch.autograd.grad`` (flash_attn_func);
* ``decode``: one query token over a KV cache, eager (``flash_attn.flash_attn_with_kvcache``; SDPA and
  FlagGems: their dense forward of one query over the cache's keys).

Providers: ``fa-plus`` (the public ``flash_attn`` functions, as users call them), ``sdpa-flash``
(``torch.nn.functional.scaled_dot_product_attention`` under ``sdpa_kernel(FLASH_ATTENTION)``), ``flaggems``
(``flag_gems.ops.flash_attention_forward``, imported lazily; forward and decode only; a row with ``error``
says why when it is absent or there is no GPU). Rounds are interleaved (every provider once per round) and the
median is kept. Rows ``{"bench": "host", "provider", "call", "headdim", "causal", "seqlen", "batch", "nheads",
"host_us"}`` go to ``bench/results/<gpu>-host.{json,md,png}``.

Without a GPU the kernels would run in Triton's interpreter; ``--nop`` (the default on CPU) replaces every
launch with a no-op instead, so what is timed is the Python of the call path (a CPU-side proxy, fa-plus only:
SDPA's CPU kernel says nothing of its GPU host cost). Nothing is written on CPU.

    python bench/host_overhead.py                 # GPU: all providers, results file
    python bench/host_overhead.py --nop           # our Python only (launches are no-ops), printed
    python bench/host_overhead.py --profile       # cProfile of fa-plus fwd_bwd (top functions)
    python bench/host_overhead.py --split         # where fwd_bwd's host time goes (printed)

On a GPU the autograd engine runs a backward on its device thread, not on the caller's: ``--profile`` profiles
the caller's thread and, separately, every backward call inside the engine's thread. ``--split`` times, in one
process, SDPA's and our forward alone and forward + backward, an autograd Function that does nothing (the
engine's own cost for a Python backward, on the device and on CPU tensors), and the mean time inside our
backward and inside its launch step, so the gap to SDPA can be assigned to the engine, our backward's Python
or the launches.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import host_ms_per_call, install_sigterm_handler, write_results  # noqa: E402

CALLS = ("fwd", "fwd_bwd", "decode")
PROVIDERS = ("fa-plus", "sdpa-flash", "flaggems")
#: (batch, seqlen, nheads) of the fwd / fwd_bwd calls; decode: (batch, cache length, nheads), one query
SHAPE = (2, 128, 4)
DECODE_SHAPE = (2, 256, 4)
HEADDIMS = (64, 128)


def _nop(*args: Any, **kwargs: Any) -> None:
    return None


def patch_nop() -> None:
    """Replace every Triton launch of the call paths with a no-op (the Python around it is what remains)."""
    import fa_backward.launch as bl
    import fa_core.forward_launch as fl

    patches = [(fl, ("fwd_launch",)), (bl, ("dq_launch", "dkdv_launch"))]
    try:
        import fa_kvcache.checks as kc
        import fa_kvcache.interface as ki

        patches.append((ki, ("append_launch", "split_kv_launch", "combine_launch")))
        patches.append((kc, ("value_check_launch",)))
    except ImportError:
        pass
    for module, names in patches:
        for name in names:
            setattr(module, name, _nop)


def _inputs(device: str, dtype: torch.dtype, d: int, grad: bool) -> tuple[torch.Tensor, ...]:
    b, s, h = SHAPE
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(4))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, do


def _decode_inputs(device: str, dtype: torch.dtype, d: int) -> tuple[torch.Tensor, ...]:
    b, cache, h = DECODE_SHAPE
    torch.manual_seed(1)
    q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
    kc, vc = (torch.randn(b, cache, h, d, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), cache - 1, dtype=torch.int32, device=device)
    return q, kc, vc, seqlens


def _fa_plus(call: str, device: str, dtype: torch.dtype, d: int, causal: bool) -> Callable[[], Any]:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache

    if call == "decode":
        q, kc, vc, seqlens = _decode_inputs(device, dtype, d)
        return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=causal)
    q, k, v, do = _inputs(device, dtype, d, call == "fwd_bwd")
    if call == "fwd":
        return lambda: flash_attn_func(q, k, v, causal=causal)
    return lambda: torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), do)


def _sdpa(call: str, device: str, dtype: torch.dtype, d: int, causal: bool) -> Callable[[], Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH
    if call == "decode":
        q, kc, vc, _ = _decode_inputs(device, dtype, d)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, kc[:, :-1], vc[:, :-1]))  # layouts built once

        def decode() -> Any:
            with sdpa_kernel(backend):
                return sdpa(qt, kt, vt)

        return decode
    q, k, v, do = _inputs(device, dtype, d, call == "fwd_bwd")
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    if call == "fwd":

        def fwd() -> Any:
            with sdpa_kernel(backend):
                return sdpa(qt, kt, vt, is_causal=causal)

        return fwd

    def fwd_bwd() -> Any:
        with sdpa_kernel(backend):
            return torch.autograd.grad(sdpa(qt, kt, vt, is_causal=causal), (q, k, v), dot)

    return fwd_bwd


def _flaggems(call: str, device: str, dtype: torch.dtype, d: int, causal: bool) -> Callable[[], Any]:
    if device != "cuda":
        raise RuntimeError("FlagGems needs a CUDA GPU")
    if call == "fwd_bwd":
        raise NotImplementedError("FlagGems provides no attention backward")
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()  # raises with the reason when FlagGems cannot be used
    if call == "decode":
        q, kc, vc, _ = _decode_inputs(device, dtype, d)
        k, v = kc[:, :-1], vc[:, :-1]
        causal = False
    else:
        q, k, v, _ = _inputs(device, dtype, d, False)
    sq, sk, scale = q.shape[1], k.shape[1], d**-0.5
    return lambda: fg.ops.flash_attention_forward(
        q, k, v, None, None, sq, sk, 0.0, causal, False, scale=scale
    )


MAKERS: dict[str, Callable[..., Callable[[], Any]]] = {
    "fa-plus": _fa_plus,
    "sdpa-flash": _sdpa,
    "flaggems": _flaggems,
}


def measure(
    device: str,
    providers: tuple[str, ...] = PROVIDERS,
    rounds: int = 5,
    n: int = 200,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of every (headdim, causal, call) point, appended to ``rows`` as they are measured (a caller
    stopped midway still has the finished points)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    rows = [] if rows is None else rows
    for d in HEADDIMS:
        for causal in (False, True):
            for call in CALLS:
                fns: dict[str, Callable[[], Any]] = {}
                errors: dict[str, str] = {}
                for prov in providers:
                    try:
                        fns[prov] = MAKERS[prov](call, device, dtype, d, causal)
                        fns[prov]()  # compiles / autotunes outside the timing
                    except Exception as exc:  # absent provider, unsupported call: a row that says why
                        errors[prov] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                        fns.pop(prov, None)
                times: dict[str, list[float]] = {p: [] for p in fns}
                for _ in range(rounds):  # interleaved: every provider once per round
                    for prov, fn in fns.items():
                        times[prov].append(host_ms_per_call(fn, n=n, warmup=20) * 1e3)
                b, s, h = DECODE_SHAPE if call == "decode" else SHAPE
                for prov in providers:
                    row: dict[str, Any] = dict(
                        bench="host", provider=prov, call=call, headdim=d, causal=causal, seqlen=s, batch=b,
                        nheads=h,
                    )  # fmt: skip
                    if prov in times:
                        row["host_us"] = round(statistics.median(times[prov]), 1)
                    else:
                        row.update(host_us=None, error=errors.get(prov, "not run"))
                    rows.append(row)
                    print(row, flush=True)
    return rows


def _fwd_bwd_inputs(device: str) -> tuple[torch.dtype, Callable[[], Any]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    return dtype, _fa_plus("fwd_bwd", device, dtype, 64, True)


def _stats(prof: Any, title: str, top: int) -> None:
    import pstats

    print(title)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def profile(device: str, n: int = 300, top: int = 30) -> None:
    """Where the host time of one fa-plus fwd_bwd call goes, by function (self time first): the caller's
    thread, then our backward alone (on a GPU it runs on the autograd engine's device thread, which a profiler
    enabled on the caller's thread does not see)."""
    import cProfile

    import fa_backward.autograd as ag

    _, fn = _fwd_bwd_inputs(device)
    for _ in range(20):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    _stats(prof, f"cProfile of {n} calls, caller's thread (times include the profiler's own overhead):", top)

    inner = cProfile.Profile()
    backward = ag.backward

    def profiled(ctx: Any, *grads: Any) -> Any:
        inner.enable()
        try:
            return backward(ctx, *grads)
        finally:
            inner.disable()

    ag.backward = profiled
    try:
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        ag.backward = backward
    _stats(inner, f"cProfile of {n} backward calls (the thread that runs them):", top)


class _Empty(torch.autograd.Function):
    """Saves its inputs and returns empty tensors: the autograd engine's cost of a Python Function."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def split(device: str, n: int = 300) -> None:
    """Print the pieces of fwd_bwd's host time (us per call, median of 5 rounds) as they are measured; on a GPU
    also write them, rows ``{"bench": "host_split", "provider", "call", ..., "host_us"}``, to
    ``bench/results/<gpu>-host-split.*``."""
    import time

    import fa_backward.autograd as ag
    import fa_backward.backward as bw

    dtype, ours_fb = _fwd_bwd_inputs(device)
    q, k, v, do = _inputs(device, dtype, 64, True)
    qc, kc, vc, doc = _inputs("cpu", torch.float32, 64, True)
    # (printed name, (row "call", row "provider"), function)
    points: list[tuple[str, tuple[str, str], Callable[[], Any]]] = [
        ("ours fwd (inputs requiring grad)", ("fwd", "fa-plus"), _fa_plus("fwd", device, dtype, 64, True)),
        ("ours fwd_bwd", ("fwd_bwd", "fa-plus"), ours_fb),
        ("empty Function fwd_bwd", ("fwd_bwd", "empty-function"), lambda: torch.autograd.grad(_Empty.apply(q, k, v), (q, k, v), do)),
        ("empty Function fwd_bwd, CPU tensors", ("fwd_bwd, CPU tensors", "empty-function"), lambda: torch.autograd.grad(_Empty.apply(qc, kc, vc), (qc, kc, vc), doc)),
    ]  # fmt: skip
    if device == "cuda":
        points[:0] = [("sdpa fwd", ("fwd", "sdpa-flash"), _sdpa("fwd", device, dtype, 64, True)), ("sdpa fwd_bwd", ("fwd_bwd", "sdpa-flash"), _sdpa("fwd_bwd", device, dtype, 64, True))]  # fmt: skip
    rows: list[dict[str, Any]] = []

    def add(call: str, provider: str, us: float) -> None:
        b, s, h = SHAPE
        rows.append({"bench": "host_split", "provider": provider, "call": call, "headdim": 64, "causal": True,
                     "seqlen": s, "batch": b, "nheads": h, "host_us": round(us, 1)})  # fmt: skip

    def med(fn: Callable[[], Any]) -> float:
        for _ in range(30):
            fn()
        return statistics.median(host_ms_per_call(fn, n=n, warmup=10) * 1e3 for _ in range(5))

    for name, (call, provider), fn in points:
        us = med(fn)
        add(call, provider, us)
        print(f"{name:42s} {us:8.1f} us", flush=True)
    # time inside our backward and inside its launch step (on a GPU: in the engine's device thread)
    spent = {"backward": [0.0, 0], "launch": [0.0, 0]}

    def timed(key: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[key][0] += time.perf_counter() - t0
                spent[key][1] += 1

        return wrapper

    backward, launch = ag.backward, bw._LAUNCH[0] if bw._LAUNCH else bw._launcher()
    ag.backward, bw._LAUNCH[0] = timed("backward", backward), timed("launch", launch)
    try:
        total = med(ours_fb)
    finally:
        ag.backward, bw._LAUNCH[0] = backward, launch
    print(f"{'ours fwd_bwd, pieces timed':42s} {total:8.1f} us", flush=True)
    add("fwd_bwd, pieces timed", "fa-plus", total)
    for key, (secs, calls) in spent.items():
        us = secs / max(calls, 1) * 1e6
        add(f"inside our {key}", "fa-plus", us)
        print(f"  inside our {key:10s} {us:8.1f} us per call", flush=True)
    if device == "cuda":
        path = write_results(
            "host-split", rows, merge=False,
            plot_kw={"bench": "host_split", "metric": "host_us", "x": "headdim", "panels": ("call",)},
            table_kw={"metric": "host_us", "title": "pieces of forward+backward host time (us, lower is better)"},
        )  # fmt: skip
        print(f"wrote {path}")


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = sys.argv[1:]
    nop = "--nop" in args or device == "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if nop:
        patch_nop()
    if "--profile" in args:
        profile(device)
        return 0
    if "--split" in args:
        split(device)
        return 0
    # on CPU, SDPA runs its CPU kernel (milliseconds per call, nothing like the GPU's host cost): ours only
    rows: list[dict[str, Any]] = []
    if nop:
        measure(device, ("fa-plus",), rows=rows)
        print("launches replaced by no-ops: a CPU-side proxy of our Python, not written to bench/results")
        return 0
    install_sigterm_handler()  # a time limit still writes the points measured so far
    try:
        measure(device, PROVIDERS, rows=rows)
    finally:
        if rows:
            path = write_results(
                "host", rows,
                plot_kw={"bench": "host", "metric": "host_us", "x": "headdim", "panels": ("call", "causal")},
                table_kw={"metric": "host_us", "title": "host time per call (us, lower is better)"},
            )  # fmt: skip
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
