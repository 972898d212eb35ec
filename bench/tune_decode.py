"""Sweep the split-KV decode kernel's tiles and split counts at the decode benchmark's points (GPU only).

For every (batch, context, page) of ``bench_decode.SHAPES`` x pages {0, 16, 256} (seqlen_q 1, 32 / 8 heads,
d128, bf16): phase 1 times every tile ``(BLOCK_N, num_warps, num_stages)`` of ``TILES`` at the heuristic's
split count; phase 2 times the best tiles (``--top``) at split counts around it. Every time is a CUDA-graph median
(``do_bench_cudagraph``), beside SDPA on the contiguous cache in the same run. Prints one line per point with
the best choice and its ratio to SDPA, and writes bench/results/<device>-decode-tune.json; the table in
``fa_kvcache.decode_configs._key_tile`` / ``num_splits_heuristic`` is set from it. Tiles are imposed with
``fa_kvcache.decode_configs.force_tile``.

    python bench/tune_decode.py [--quick]
    python bench/tune_decode.py --shapes 64x32768 --pages 16,64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import HEADDIM, NHEADS, NHEADS_K, SHAPES, _paged  # noqa: E402
from common import install_sigterm_handler, write_json  # noqa: E402

TILES = [(bn, w, st) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)] + [(32, 4, 3), (256, 8, 2)]


def _ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def _sweep_point(q, kc, vc, lens, page, ref, sd_ms, nbytes, t0, top: int = 3) -> dict | None:
    """Phase 1 (tiles at the heuristic's splits) and phase 2 (split counts for the ``top`` best tiles: a tile
    that loses at the heuristic's count may win at another, e.g. 32-key tiles with fewer splits) at one point."""
    import fa_kvcache.decode_configs as fi
    from fa_kvcache import flash_attn_with_kvcache

    batch, ctx = kc.shape[:2]
    if page:
        kp, vp, bt = _paged(kc, vc, page)

        def call(splits: int) -> torch.Tensor:
            return flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=bt, num_splits=splits)
    else:

        def call(splits: int) -> torch.Tensor:
            return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits)

    heur = fi.num_splits_heuristic(
        batch * NHEADS_K, -(-ctx // 64), fi._sm_count(q.device), paged=page > 0, page=page
    )
    results: dict = {}
    for tile in TILES:
        try:
            with fi.force_tile(tile):
                err = float((call(heur).float() - ref).abs().max() / ref.abs().max())
                if not err < 2e-2:
                    raise RuntimeError(f"wrong result (rel err {err:.2e})")
                results[(tile, heur)] = _ms(lambda: call(heur))
        except Exception as exc:  # a tile that does not fit is a line, not a lost sweep
            print(f"  tile {tile} failed: {type(exc).__name__}: {str(exc)[:100]}")
    if not results:
        return None
    ranked = [t for (t, _), _ms_ in sorted(results.items(), key=lambda kv: kv[1])]
    best_tile = ranked[0]
    for cand in ranked[: max(1, top)]:
        for s in sorted({1, max(1, heur // 2), heur * 2, heur * 3 // 2, 16, 32, 64, 128} - {heur}):
            if s > 128:
                continue
            try:
                with fi.force_tile(cand):
                    results[(cand, s)] = _ms(lambda s=s: call(s))
            except Exception as exc:
                print(f"  tile {cand} splits {s} failed: {type(exc).__name__}: {str(exc)[:100]}")
    (tile, splits), ms = min(results.items(), key=lambda kv: kv[1])

    def gbps(m: float) -> float:
        return nbytes / (m * 1e-3) / 1e9

    heur_ms = results.get((best_tile, heur))
    print(
        f"b{batch} ctx{ctx} page{page}: best tile {tile} splits {splits} {gbps(ms):.0f} GB/s "
        f"({ms and sd_ms / ms:.2f}x sdpa {gbps(sd_ms):.0f}); heuristic splits {heur} "
        f"{gbps(heur_ms) if heur_ms else 0:.0f} GB/s  [{time.time() - t0:.0f}s]",
        flush=True,
    )
    return {
        "batch": batch,
        "context": ctx,
        "page": page,
        "sdpa_gbps": round(gbps(sd_ms), 1),
        "best": {"tile": list(tile), "splits": splits, "gbps": round(gbps(ms), 1)},
        "heuristic_splits": heur,
        "all": [
            {"tile": list(t), "splits": s, "gbps": round(gbps(m), 1)}
            for (t, s), m in sorted(results.items(), key=lambda kv: kv[1])
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two shapes, pages 0 and 256")
    ap.add_argument("--shapes", default=None, help="comma list of BATCHxCONTEXT (default: all of SHAPES)")
    ap.add_argument("--pages", default=None, help="comma list of page sizes (default 0,16,256)")
    ap.add_argument("--top", type=int, default=3, help="tiles whose split counts phase 2 sweeps")
    ap.add_argument(
        "--tiles",
        default=None,
        help="'/'-separated BLOCK_N,warps,stages tiles for phase 1 instead of TILES, e.g. 64,4,4/64,4,7",
    )
    args = ap.parse_args()
    install_sigterm_handler()
    if args.tiles:
        TILES[:] = [tuple(int(x) for x in t.split(",")) for t in args.tiles.split("/")]
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    pages: tuple[int, ...] = (0, 256) if args.quick else (0, 16, 256)
    if args.pages:
        pages = tuple(int(p) for p in args.pages.split(","))
    out_rows = []
    t0 = time.time()
    for batch, ctx in shapes:
        torch.manual_seed(0)
        q = torch.randn(batch, 1, NHEADS, HEADDIM, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(batch, ctx, NHEADS_K, HEADDIM, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        nbytes = 2 * kc.numel() * kc.element_size()
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kc, vc))
        sd_ms = _ms(lambda qt=qt, kt=kt, vt=vt: sdpa(qt, kt, vt, enable_gqa=True))
        ref = sdpa(*(t.float().transpose(1, 2) for t in (q, kc, vc)), enable_gqa=True).transpose(1, 2)
        for page in pages:
            row = _sweep_point(q, kc, vc, lens, page, ref, sd_ms, nbytes, t0, args.top)
            if row:
                out_rows.append(row)
        torch.cuda.empty_cache()
    path = write_json("decode-tune", out_rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
