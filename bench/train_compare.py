"""Training with our attention vs SDPA's flash backend: the loss curves of a small causal LM (GPU only).

The model and loop are :mod:`fa_backward.training_check` (the same as the GPU test
``test_gpu_training_matches_sdpa``): 3 pre-norm blocks (dim 256, 4 heads of 64, bf16 attention), AdamW, 300 steps
on 8 fixed batches of 8 x 512 random byte tokens (the model memorises them), the same seed for both runs. Writes
bench/results/<device>-training.json (both loss curves, final losses, the largest relative gap between the
20-step smoothed curves, SDPA's own spread, ms per step), a .md summary and a .png plot of the curves.

    python bench/train_compare.py              # ~30 s on an H200
    python bench/train_compare.py --steps 1000

SDPA is trained several times (its flash backward is not deterministic); the curves agree when ours is within
max(5 %, 2 x the largest gap between two SDPA runs) of every SDPA run, as the GPU test asks
(fa_backward.training_check.TrainingComparison). Exit status 0 when they agree, 1 otherwise, 3 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_slug, progress, results_path, versions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=123, help="seed of the token corpus")
    ap.add_argument("--sdpa-runs", type=int, default=3, help="SDPA runs that measure its run-to-run spread")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_compare: no CUDA GPU; nothing to train", file=sys.stderr)
        return 3
    from fa_backward.training_check import GAP_FLOOR, compare_training, corpus, smooth

    data = corpus(args.seed)
    cmp = compare_training(
        args.steps,
        data,
        repeats={"ours": 1, "sdpa": args.sdpa_runs},
        wrap=lambda it, name: progress(it, total=args.steps, desc=f"train {name}"),
    )
    doc = {
        "device": device_slug(),
        **versions(),
        "steps": args.steps,
        "model": "TinyLM: 3 blocks, dim 256, 4 heads x 64, seqlen 512, batch 8, AdamW lr 1e-3, bf16 attention",
        "runs": {a: len(c) for a, c in cmp.curves.items()},
        "final_loss": {a: [round(c[-1], 5) for c in cs] for a, cs in cmp.curves.items()},
        "first_loss": {a: [round(c[0], 5) for c in cs] for a, cs in cmp.curves.items()},
        "max_relative_gap_smoothed_20": round(cmp.gap, 5),
        "sdpa_run_to_run_gap_smoothed_20": round(cmp.noise, 5),
        "bar": round(cmp.bar, 5),
        "ok": cmp.ok,
        "ms_per_step_after_warmup": {a: round(v, 3) for a, v in cmp.ms_per_step.items()},
        "losses": {a: [[round(x, 5) for x in c] for c in cs] for a, cs in cmp.curves.items()},
    }
    path = results_path("training")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    rows = [(f"{a} #{i + 1}", c) for a, cs in cmp.curves.items() for i, c in enumerate(cs)]
    lines = [
        f"# training: ours vs SDPA flash ({torch.cuda.get_device_name()})",
        "",
        f"{doc['model']}; {args.steps} steps, same seed and data for every run. SDPA's flash backward accumulates"
        " dQ with atomics, so its runs differ from one another; ours is deterministic (one run).",
        "",
        "| run | first loss | final loss | ms / step (after warm-up) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {c[0]:.4f} | {c[-1]:.4f} | {cmp.ms_per_step[name.split()[0]]:.2f} |"
            for name, c in rows
        ),
        "",
        f"Largest relative gap between the 20-step smoothed curves, ours vs any SDPA run: {cmp.gap:.4f}; between"
        f" two SDPA runs: {cmp.noise:.4f}. Bar max({GAP_FLOOR}, 2 x SDPA's spread) = {cmp.bar:.4f}:"
        f" {'ok' if cmp.ok else 'MISS'}.",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, c in rows:
            ax.plot(smooth(c), label=f"{name} (20-step mean)", lw=1.6 if name.startswith("ours") else 0.9)
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
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
