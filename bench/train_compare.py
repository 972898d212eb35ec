"""Training with our attention vs SDPA's flash backend: the loss curves of a small causal LM (GPU only).

The model and loop are :mod:`fa_backward.training_check` (the same as the GPU test
``test_gpu_training_matches_sdpa``): 3 pre-norm blocks (dim 256, 4 heads of 64, bf16 attention), AdamW, 300 steps
on 8 fixed batches of 8 x 512 random byte tokens (the model memorises them), the same seed for both runs. Writes
bench/results/<device>-training.json (both loss curves, final losses, the largest relative gap between the
20-step smoothed curves, ms per step), a .md summary and a .png plot of the curves.

    python bench/train_compare.py              # ~30 s on an H200
    python bench/train_compare.py --steps 1000

Exit status 0 when the curves agree (gap < 5%, as the test asks), 1 otherwise, 3 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_slug, progress, results_path, versions  # noqa: E402

BAR = 0.05


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=123, help="seed of the token corpus")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_compare: no CUDA GPU; nothing to train", file=sys.stderr)
        return 3
    from fa_backward.training_check import ATTENTIONS, max_relative_gap, smooth, train_losses

    torch.manual_seed(args.seed)
    data = torch.randint(0, 256, (8, 8, 513), device="cuda")
    curves, ms = {}, {}
    for attn in ATTENTIONS:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        curves[attn] = train_losses(
            attn, args.steps, data, wrap=lambda it, a=attn: progress(it, total=args.steps, desc=f"train {a}")
        )
        torch.cuda.synchronize()
        ms[attn] = (time.perf_counter() - t0) * 1e3 / args.steps
    gap = max_relative_gap(curves["ours"], curves["sdpa"])
    doc = {
        "device": device_slug(),
        **versions(),
        "steps": args.steps,
        "model": "TinyLM: 3 blocks, dim 256, 4 heads x 64, seqlen 512, batch 8, AdamW lr 1e-3, bf16 attention",
        "final_loss": {a: round(c[-1], 5) for a, c in curves.items()},
        "first_loss": {a: round(c[0], 5) for a, c in curves.items()},
        "max_relative_gap_smoothed_20": round(gap, 5),
        "ms_per_step": {a: round(v, 3) for a, v in ms.items()},
        "losses": {a: [round(x, 5) for x in c] for a, c in curves.items()},
    }
    path = results_path("training")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    ok = gap < BAR
    lines = [
        f"# training: ours vs SDPA flash ({torch.cuda.get_device_name()})",
        "",
        f"{doc['model']}; {args.steps} steps, same seed and data for both.",
        "",
        "| attention | first loss | final loss | ms / step |",
        "|---|---|---|---|",
        *(f"| {a} | {curves[a][0]:.4f} | {curves[a][-1]:.4f} | {ms[a]:.2f} |" for a in ATTENTIONS),
        "",
        f"Largest relative gap between the 20-step smoothed curves: {gap:.4f} ({'ok' if ok else 'MISS'}, bar {BAR}).",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for a in ATTENTIONS:
            ax.plot(curves[a], alpha=0.3, lw=0.8)
            ax.plot(smooth(curves[a]), label=f"{a} (20-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except Exception as exc:  # matplotlib missing: the table and JSON are the record
        print(f"[train_compare] no plot: {exc}")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
