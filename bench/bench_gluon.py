"""Correctness and speed of the Gluon Hopper forward (fa_core.gluon) against SDPA and our Triton forward.

Run on an sm_90 GPU with Triton 3.6, from the repository root::

    PYTHONPATH=packages/fa-core/src python bench/bench_gluon.py --out bench/results

1. Correctness: every Gluon kernel kind on ragged shapes (lengths not multiples of the tiles), causal
   (bottom-right, seqlen_q < seqlen_k and > seqlen_k, i.e. rows with no key), GQA, d64/d128, bf16 and fp16,
   strided views; error vs the float32 reference <= 2 x the error of the reference run in the input dtype
   + slack (fa_core.testing.slack_for), lse within 1e-3 on finite rows and +inf on empty rows, out never NaN (poisoned buffer).
2. Speed: FlashAttention-paper shapes (batch * seqlen = 16k tokens, hidden 2048, nheads = 2048 / headdim,
   headdim 64/128, seqlen 2k/8k/16k, causal and not, bf16); ``triton.testing.do_bench`` median; TFLOP/s =
   4 * b * h * s^2 * d (/2 causal) / t. Providers: ``gluon-<kind>``, ``fa-plus`` (fa_core.flash_attn_forward,
   Triton tl kernels; autotuned unless ``--no-autotune``), SDPA's flash and cuDNN backends.
3. Tile sweep of the Gluon kernels at seqlen 16k.

Writes ``<out>/<gpu>-gluon-forward.json`` (``{"device", "torch", "triton", "correctness", "rows", "sweep"}``)
after every section, and prints tables.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import triton

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # older torch
    SDPBackend = sdpa_kernel = None  # type: ignore[misc,assignment]

import fa_core
from fa_core import gluon as fg
from fa_core import settings as fa_settings
from fa_core.reference import attention_ref, attention_varlen_ref
from fa_core.testing import slack_for


def gpu_slug(name: str) -> str:
    low = name.lower()
    for tag in ("h200", "h100", "h800", "h20", "gh200"):
        if tag in low:
            return tag
    return re.sub(r"[^a-z0-9]+", "-", low.replace("nvidia", "")).strip("-") or "gpu"


# ------------------------------------------------------------------------------------------ correctness


def _check_one(kind, b, sq, sk, h, hk, d, causal, dtype, extra) -> dict[str, Any]:
    scale, strided = extra.get("scale"), extra.get("strided", False)
    window, softcap = extra.get("window_size", (-1, -1)), extra.get("softcap", 0.0)
    torch.manual_seed(sq * 7 + sk + d)
    if extra.get("varlen"):
        return _check_varlen(kind, h, hk, d, causal, dtype, extra)
    if strided:  # q, k, v as views into one packed buffer (non-contiguous batch/seq strides)
        assert sq == sk and h == hk
        qkv = torch.randn(b, sq, 3, h, d, device="cuda", dtype=dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    out = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=dtype)
    row = dict(kind=kind, b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, causal=causal, dtype=str(dtype), **extra)
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, softcap=softcap)
    try:
        o, lse = fg.forward(q, k, v, out=out, kind=kind, **kw)
        torch.cuda.synchronize()
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        return row
    ref_o, ref_lse = attention_ref(q, k, v, **kw)
    low_o, _ = attention_ref(q, k, v, upcast=False, **kw)
    err = (o.float() - ref_o.float()).abs().max().item()
    err_low = (low_o.float() - ref_o.float()).abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    inf_ok = bool(torch.equal(torch.isinf(lse), ~finite)) and bool((lse[~finite] > 0).all())
    nan_free = not bool(torch.isnan(o).any())
    ok = nan_free and err <= 2 * err_low + slack_for(dtype) and lse_err <= 1e-3 and inf_ok
    row.update(ok=ok, err=err, err_lowp=err_low, lse_err=lse_err, inf_rows_ok=inf_ok, nan_free=nan_free)
    return row


def _check_varlen(kind, h, hk, d, causal, dtype, extra) -> dict[str, Any]:
    lens = extra["varlen"]
    window, softcap = extra.get("window_size", (-1, -1)), extra.get("softcap", 0.0)
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(c for _, c in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    q = torch.randn(int(cu_q[-1]), h, d, device="cuda", dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hk, d, device="cuda", dtype=dtype)
    out = torch.full_like(q, float("nan"))
    row = dict(kind=kind, h=h, hk=hk, d=d, causal=causal, dtype=str(dtype), **extra)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    mq, mk = max(a for a, _ in lens), max(c for _, c in lens)
    try:
        o, lse = fg.forward_varlen(q, k, v, cu_q, cu_k, mq, mk, out=out, kind=kind, **kw)
        torch.cuda.synchronize()
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        return row
    ref_o, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **kw)
    low_o, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    err = (o.float() - ref_o.float()).abs().max().item()
    err_low = (low_o.float() - ref_o.float()).abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    inf_ok = bool(torch.equal(torch.isinf(lse), ~finite)) and bool((lse[~finite] > 0).all())
    nan_free = not bool(torch.isnan(o).any())
    ok = nan_free and err <= 2 * err_low + slack_for(dtype) and lse_err <= 1e-3 and inf_ok
    row.update(ok=ok, err=err, err_lowp=err_low, lse_err=lse_err, inf_rows_ok=inf_ok, nan_free=nan_free)
    return row


BF, FP = torch.bfloat16, torch.float16
CASES = [
    # b, sq, sk, h, hk, d, causal, dtype, extra (scale, strided, window_size, softcap)
    (2, 1000, 1000, 4, 2, 64, False, BF, {}),
    (2, 1000, 1000, 4, 2, 64, True, BF, {}),
    (2, 1000, 1000, 4, 2, 128, False, BF, {}),
    (2, 1000, 1000, 4, 2, 128, True, BF, {}),
    (1, 300, 777, 8, 1, 128, True, BF, {}),
    (1, 300, 777, 8, 1, 64, False, FP, {"scale": 0.3}),
    (1, 777, 300, 2, 2, 64, True, BF, {}),
    (1, 777, 300, 2, 2, 128, True, FP, {}),
    (3, 128, 128, 2, 1, 128, True, FP, {}),
    (1, 256, 256, 2, 2, 64, True, BF, {}),
    (2, 1, 1000, 4, 4, 128, False, BF, {}),
    (2, 1, 1000, 4, 4, 64, True, BF, {}),
    (2, 517, 517, 3, 3, 128, True, BF, {"strided": True}),
    (2, 517, 517, 3, 3, 64, False, BF, {"strided": True}),
    (1, 4096, 4096, 2, 1, 128, True, BF, {}),
    # sliding windows and softcap
    (2, 1000, 1000, 4, 2, 128, False, BF, {"window_size": (100, 50)}),
    (2, 1000, 1000, 4, 2, 64, False, FP, {"window_size": (100, 50)}),
    (1, 300, 777, 4, 1, 64, True, BF, {"window_size": (64, -1)}),
    (1, 777, 300, 2, 2, 128, False, BF, {"window_size": (-1, 0)}),
    (1, 777, 300, 2, 2, 64, False, BF, {"window_size": (10, 10)}),
    (1, 300, 700, 2, 2, 128, False, FP, {"window_size": (0, 0)}),
    (1, 4096, 4096, 2, 1, 128, False, BF, {"window_size": (512, 512)}),
    (1, 1000, 1000, 2, 2, 128, True, BF, {"window_size": (255, 0), "softcap": 10.0}),
    (2, 517, 517, 3, 3, 64, False, BF, {"softcap": 30.0}),
    (2, 1000, 1500, 4, 2, 128, True, FP, {"softcap": 5.0, "scale": 0.2}),
    # packed variable-length sequences (b, sq, sk unused): (seqlen_q, seqlen_k) per sequence
    (0, 0, 0, 4, 2, 128, True, BF, {"varlen": [(300, 300), (1, 77), (1000, 1000), (129, 513), (64, 64)]}),
    (0, 0, 0, 4, 2, 128, False, BF, {"varlen": [(513, 257), (77, 1), (0, 100), (200, 200)]}),
    (0, 0, 0, 4, 4, 64, True, FP, {"varlen": [(777, 300), (128, 128), (5, 1000)]}),
    (0, 0, 0, 4, 1, 64, False, BF, {"varlen": [(1000, 1000), (1, 1), (333, 444)]}),
    (
        0,
        0,
        0,
        2,
        2,
        128,
        True,
        BF,
        {"varlen": [(700, 900), (256, 256)], "window_size": (64, 0), "softcap": 5.0},
    ),
]


def _is_feature(case) -> bool:
    return bool(case[8].get("window_size") or case[8].get("softcap") or case[8].get("varlen"))


def correctness(kinds, sink, verbose: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for case in CASES:
            if case[5] not in fg.head_dims(kind):
                continue
            row = _check_one(kind, *case)
            row["feature"] = _is_feature(case)
            rows.append(row)
            sink(rows)
            if row["ok"] and not verbose:
                continue
            status = "ok " if row["ok"] else "BAD"
            detail = row.get("error") or (
                f"err {row['err']:.2e} (lowp {row['err_lowp']:.2e}) lse {row['lse_err']:.1e} "
                f"inf_ok {row['inf_rows_ok']} nan_free {row['nan_free']}"
            )
            print(f"[{status}] {kind:9s} {case[:7]} {str(case[7])[6:]} {case[8]} {detail}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ speed


def tflops(b, h, s, d, causal, ms):
    f = 4 * b * h * s * s * d / (2 if causal else 1)
    return f / ms / 1e9


def _bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=80)


def providers(q, k, v, causal, autotune: bool, kinds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        if q.shape[-1] in fg.head_dims(kind):
            out[f"gluon-{kind}"] = lambda kind=kind: fg.forward(q, k, v, causal=causal, kind=kind)

    def fa_plus():
        if autotune:
            return fa_core.flash_attn_forward(q, k, v, causal=causal)
        with fa_settings.override(autotune=False):
            return fa_core.flash_attn_forward(q, k, v, causal=causal)

    out["fa-plus" if autotune else "fa-plus-fixed-tile"] = fa_plus
    if sdpa_kernel is not None:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (b, h, s, d) views, as SDPA takes them
        for name, backend in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            out[name] = run
    return out


def speed(kinds, seqlens, autotune: bool, deadline: float, sink) -> list[dict[str, Any]]:
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for s in seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                for name, fn in providers(q, k, v, causal, autotune, kinds).items():
                    row = dict(provider=name, headdim=d, causal=causal, seqlen=s, batch=b, nheads=h)
                    if time.time() > deadline:
                        row.update(tflops=None, error="skipped: time budget")
                    else:
                        try:
                            ms = _bench(fn)
                            row.update(ms=ms, tflops=tflops(b, h, s, d, causal, ms))
                        except Exception as exc:
                            row.update(tflops=None, error=f"{type(exc).__name__}: {exc}"[:500])
                    rows.append(row)
                    t = f"{row['tflops']:.1f}" if row.get("tflops") else row.get("error", "")[:60]
                    print(f"d{d} causal={causal!s:5} s={s:5} {name:20s} {t}", flush=True)
                    sink(rows)
                del q, k, v
    return rows


_WS = dict(num_warps=4, CONSUMER_REGS=232, PRODUCER_REGS=40, BLOCK_M=64, PINGPONG=1, NCONS=2)
_WS3 = dict(num_warps=4, CONSUMER_REGS=160, PRODUCER_REGS=24, BLOCK_M=64, PINGPONG=1, NCONS=3)
# tiles other than the defaults (fa_core.gluon._launch.CONFIGS, timed in the speed section); the first sweep
# (8-warp pipelined tiles, 2-stage and no-ping-pong ws) is in bench/results/h100-gluon-forward-sweep.json
SWEEP = {
    ("ws", 128): [dict(_WS, CONSUMER_REGS=240, PRODUCER_REGS=24, BLOCK_N=128, STAGES=3)],
    ("ws3", 64): [dict(_WS3, BLOCK_N=128, STAGES=3), dict(_WS3, BLOCK_N=64, STAGES=4)],
}


FEATURES = [
    # headdim, causal, seqlen, window_size, softcap
    (128, True, 8192, (1024, 0), 0.0),
    (128, False, 8192, (-1, -1), 30.0),
    (64, True, 8192, (1024, 0), 0.0),
]
#: packed sequences of 16k tokens in all (hidden 2048): (headdim, causal, lengths)
VARLEN_SPEED = [
    (128, True, [2048] * 8),
    (128, False, [4096, 2048, 1024, 1024, 512, 512, 4096, 3072]),
]


def features_speed(deadline: float, sink, windows: bool = True, varlen: bool = True) -> list[dict[str, Any]]:
    """Sliding window and softcap at 8k tokens x 2: Gluon (default kind) against our Triton forward; TFLOP/s
    count only visible (window) score entries."""
    rows: list[dict[str, Any]] = []
    for d, causal, s, window, softcap in FEATURES if windows else []:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        left = window[0] if window[0] >= 0 else s
        right = 0 if causal else (window[1] if window[1] >= 0 else s)
        rows_i = torch.arange(s, device="cuda")[:, None]
        cols = torch.arange(s, device="cuda")[None, :]
        visible = int(((cols >= rows_i - left) & (cols <= rows_i + right)).sum())
        flops = 4 * b * h * visible * d
        kw = dict(causal=causal, window_size=window, softcap=softcap)

        def fa_plus(q=q, k=k, v=v, kw=kw):
            with fa_settings.override(autotune=False):
                return fa_core.flash_attn_forward(q, k, v, **kw)

        for name, fn in (
            ("gluon", lambda q=q, k=k, v=v, kw=kw: fg.forward(q, k, v, **kw)),
            ("fa-plus", fa_plus),
        ):
            row: dict[str, Any] = dict(provider=name, headdim=d, causal=causal, seqlen=s, batch=b, nheads=h, window_size=window,
                       softcap=softcap)  # fmt: skip
            if time.time() > deadline:
                row.update(tflops=None, error="skipped: time budget")
            else:
                try:
                    ms = _bench(fn)
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                except Exception as exc:
                    row.update(tflops=None, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            t = f"{row['tflops']:.1f}" if row.get("tflops") else row.get("error", "")[:60]
            print(
                f"features d{d} causal={causal!s:5} window={window} softcap={softcap} {name:8s} {t}",
                flush=True,
            )
            sink(rows)
        del q, k, v
    for d, causal, lens in VARLEN_SPEED if varlen else []:
        h = 2048 // d
        cu = torch.tensor(
            [0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda"
        )
        q, k, v = (torch.randn(int(cu[-1]), h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        varlen_flops = sum((4.0 * h * n * n * d / (2 if causal else 1) for n in lens), 0.0)
        mx = max(lens)

        def fa_plus_varlen(q=q, k=k, v=v, cu=cu, mx=mx, causal=causal):
            with fa_settings.override(autotune=False):
                return fa_core.flash_attn_varlen_forward(q, k, v, cu, cu, mx, mx, causal=causal)

        def gluon_varlen(q=q, k=k, v=v, cu=cu, mx=mx, causal=causal):
            return fg.forward_varlen(q, k, v, cu, cu, mx, mx, causal=causal)

        for name, fn in (("gluon", gluon_varlen), ("fa-plus", fa_plus_varlen)):
            row = dict(provider=name, headdim=d, causal=causal, varlen=lens, nheads=h)
            if time.time() > deadline:
                row.update(tflops=None, error="skipped: time budget")
            else:
                try:
                    ms = _bench(fn)
                    row.update(ms=ms, tflops=varlen_flops / ms / 1e9)
                except Exception as exc:
                    row.update(tflops=None, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            t = f"{row['tflops']:.1f}" if row.get("tflops") else row.get("error", "")[:60]
            print(f"varlen d{d} causal={causal!s:5} {lens} {name:8s} {t}", flush=True)
            sink(rows)
        del q, k, v
    return rows


def _forward_call(q, k, v, causal, kind, cfg):
    return lambda: fg.forward(q, k, v, causal=causal, kind=kind, config=cfg)


def sweep(kinds, deadline: float, sink) -> list[dict[str, Any]]:
    rows = []
    s = 16384
    for d in (64, 128):
        for causal in (False, True):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for kind in kinds:
                for cfg in SWEEP.get((kind, d), []):
                    row = dict(kind=kind, headdim=d, causal=causal, seqlen=s, config=cfg)
                    if time.time() > deadline:
                        row.update(tflops=None, error="skipped: time budget")
                    else:
                        try:
                            ref, _ = fg.forward(
                                q[:, :2048], k[:, :2048], v[:, :2048], causal=causal, kind=kind
                            )
                            ours, _ = fg.forward(
                                q[:, :2048], k[:, :2048], v[:, :2048], causal=causal, kind=kind, config=cfg
                            )
                            row["max_diff_vs_default"] = (ours.float() - ref.float()).abs().max().item()
                            ms = _bench(_forward_call(q, k, v, causal, kind, cfg))
                            row.update(ms=ms, tflops=tflops(b, h, s, d, causal, ms))
                        except Exception as exc:
                            row.update(tflops=None, error=f"{type(exc).__name__}: {exc}"[:500])
                    rows.append(row)
                    t = f"{row['tflops']:.1f}" if row.get("tflops") else row.get("error", "")[:60]
                    print(f"sweep d{d} causal={causal!s:5} {kind:9s} {cfg} {t}", flush=True)
                    sink(rows)
            del q, k, v
    return rows


def table(rows) -> str:
    keys = sorted({(r["headdim"], r["causal"], r["seqlen"]) for r in rows})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| headdim | causal | seqlen | " + " | ".join(provs) + " |", "|" + "---|" * (3 + len(provs))]
    for key in keys:
        cells = []
        for p in provs:
            r = next(
                (r for r in rows if (r["headdim"], r["causal"], r["seqlen"]) == key and r["provider"] == p),
                None,
            )
            cells.append(f"{r['tflops']:.1f}" if r and r.get("tflops") else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_children(kinds, out_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """Each kind's correctness in its own process, all at once, with a timeout: a hang (a barrier bug) must
    not stop the run. A child writes its rows after every case, so a timeout keeps the cases done before it."""
    procs = {}
    for kind in kinds:
        tmp = out_dir / f".correctness-{kind}.json"
        tmp.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--kinds", kind, "--correctness-json", str(tmp)]
        procs[kind] = (subprocess.Popen(cmd), tmp)
    deadline = time.time() + timeout
    rows: list[dict[str, Any]] = []
    for kind, (proc, tmp) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            hung = True
        try:
            rows_k = json.loads(tmp.read_text()) if tmp.exists() else []
        except Exception as exc:
            rows_k = [dict(kind=kind, ok=False, error=f"{type(exc).__name__}: {exc}"[:500])]
        if hung:
            print(f"correctness of {kind}: timed out after {timeout:.0f} s (hang)", flush=True)
            # a hang after every dense case passed counts against the window / softcap features only
            n_dense = sum(1 for c in CASES if c[5] in fg.head_dims(kind) and not _is_feature(c))
            dense_done = sum(1 for r in rows_k if not r.get("feature"))
            rows_k.append(
                dict(
                    kind=kind,
                    ok=False,
                    feature=dense_done >= n_dense,
                    error=f"timed out after {timeout:.0f} s",
                )
            )
        elif proc.returncode != 0 and not rows_k:
            rows_k.append(dict(kind=kind, ok=False, error=f"exit code {proc.returncode}"))
        tmp.unlink(missing_ok=True)
        rows += rows_k
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--kinds", default=",".join(fg.KINDS))
    ap.add_argument("--seqlens", default="2048,8192,16384")
    ap.add_argument("--no-autotune", action="store_true", help="time fa-plus with one fixed tile per shape")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later measurements are skipped")
    ap.add_argument(
        "--skip", default="", help="comma list of sections to skip: correctness,speed,features,sweep"
    )
    ap.add_argument("--check-timeout", type=float, default=150.0, help="seconds for the correctness runs")
    ap.add_argument("--correctness-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget
    kinds = [k for k in args.kinds.split(",") if k]
    skip = set(args.skip.split(","))
    name = torch.cuda.get_device_name()
    result: dict[str, Any] = dict(
        device=name,
        capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__,
        triton=triton.__version__,
        gluon_available=fg.available(),
        default_kinds={
            f"d{d}-{'causal' if c else 'full'}-s{n}": fg.default_kind(d, bool(c), n)
            for d in (64, 128)
            for c in (0, 1)
            for n in (2048, 16384)
        },
        correctness=[],
        rows=[],
        features=[],
        sweep=[],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{gpu_slug(name)}-gluon-forward.json"

    def dump(section=None, rows=None):
        if section is not None:
            result[section] = rows
        result["elapsed_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(result, indent=1))

    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, gluon {fg.available()}")
    if not fg.available():
        dump()
        sys.exit("fa_core.gluon is not available on this machine")
    if args.correctness_json is not None:  # child process: one kind's correctness only
        correctness(kinds, lambda rows: args.correctness_json.write_text(json.dumps(rows)))
        return
    from fa_core.gluon import _launch

    result["configs"] = {f"{k}-d{d}": c for (k, d), c in _launch.CONFIGS.items()}
    try:
        if "correctness" not in skip:
            rows = _check_children(kinds, args.out, args.check_timeout)
            dump("correctness", rows)
            # a kind is timed when every dense case (no window / softcap) ran and passed
            dense = {k: [r for r in rows if r["kind"] == k and not r.get("feature")] for k in kinds}
            passing = [k for k in kinds if dense[k] and all(r["ok"] for r in dense[k])]
            features_ok = {k: all(r["ok"] for r in rows if r["kind"] == k) for k in kinds}
            result["timed_kinds"], result["all_cases_ok"] = passing, features_ok
            bad = [r for r in rows if not r["ok"]]
            print(
                f"correctness: {len(rows) - len(bad)} ok, {len(bad)} bad; timed kinds {passing}", flush=True
            )
            print(f"all cases (windows, softcap included) ok: {features_ok}", flush=True)
            kinds = passing
            dump()
        if "speed" not in skip:
            seqlens = [int(x) for x in args.seqlens.split(",")]
            speed(kinds, seqlens, not args.no_autotune, deadline, lambda rows: dump("rows", rows))
            print(table(result["rows"]))
        if "features" not in skip:
            checked = result["correctness"]

            def passed(pred) -> bool:
                return all(r["ok"] for r in checked if pred(r))

            def default(r) -> bool:  # the rows of the kind forward() picks for that head dim and mask
                n = r.get("sq") or max((a for a, _ in r.get("varlen") or [(0, 0)]), default=0)
                kind = (
                    fg.default_kind(r["d"], r["causal"], n, varlen=bool(r.get("varlen")))
                    if r.get("d")
                    else None
                )
                return kind is None or r["kind"] == kind

            win_ok = passed(
                lambda r: default(r) and (r.get("window_size") or r.get("softcap")) and not r.get("varlen")
            )
            var_ok = passed(lambda r: default(r) and r.get("varlen"))
            features_speed(deadline, lambda rows: dump("features", rows), windows=win_ok, varlen=var_ok)
        if "sweep" not in skip and kinds:
            sweep(kinds, deadline, lambda rows: dump("sweep", rows))
    except Exception:
        traceback.print_exc()
        result["fatal"] = traceback.format_exc()[-3000:]
    dump()
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
