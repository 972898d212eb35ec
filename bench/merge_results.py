"""Merge the results of parallel GPU lanes into bench/results, then redraw each file's table and plot.

Each lane of a GPU run starts from a copy of bench/results and writes its own rows into it. A lane's row is taken
only when it is new or differs from the row of the same key (``common.row_key``) in bench/results (the base all
lanes started from), so a lane's untouched copy of the base never undoes another lane's measurement; lanes are
applied in the order given (a later lane wins). Only whole rows move: every row keeps all of its providers'
numbers from one run only where the lane measured them together (the bench scripts time all providers of a
configuration back to back).

    python bench/merge_results.py /tmp/laneA/results /tmp/laneB/results            # forward and backward
    python bench/merge_results.py --kinds forward /tmp/laneA/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, Row, markdown_table, plot, result_layout, row_key  # noqa: E402


def _rows(path: Path) -> tuple[dict[str, Any], list[Row]]:
    doc = json.loads(path.read_text())
    return doc, list(doc.get("rows", []))


def changed_rows(base: list[Row], lane: list[Row]) -> list[Row]:
    """The rows of ``lane`` that are new or differ from ``base``'s row of the same key."""
    by_key = {row_key(r): r for r in base}
    return [r for r in lane if by_key.get(row_key(r)) != r]


def merge_file(base_path: Path, lane_paths: list[Path], dtype: str = "bfloat16") -> int:
    """Apply the lanes' new/changed rows to ``base_path`` in order; rewrite its JSON, table and plot. Returns the
    number of rows taken from the lanes."""
    doc, base = _rows(base_path)
    merged = {row_key(r): r for r in base}
    taken = 0
    for lane_path in lane_paths:
        if not lane_path.exists():
            continue
        lane_doc, lane = _rows(lane_path)
        for r in changed_rows(base, lane):
            merged[row_key(r)] = r
            taken += 1
        for field in ("device", "torch", "triton"):  # the versions of the newest run
            if field in lane_doc:
                doc[field] = lane_doc[field]
    rows = list(merged.values())
    doc["rows"] = rows
    base_path.write_text(json.dumps(doc, indent=1) + "\n")
    kind = base_path.stem.split("-", 1)[1]
    if kind == "decode":
        # GB/s, not TFLOP/s: the decode script's own table, bar checks and plot
        from bench_decode import render

        render(rows, base_path)
        return taken
    plot_kw, table_kw = result_layout(kind, dtype)
    base_path.with_suffix(".md").write_text(markdown_table(rows, **table_kw))
    title = f"{plot_kw.get('bench', kind)} ({doc.get('device', '')}, torch {doc.get('torch', '')})"
    plot(rows, base_path.with_suffix(".png"), title=title, **plot_kw)
    return taken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lanes", nargs="+", help="results folders of the lanes, in the order to apply")
    ap.add_argument("--kinds", default="forward,backward", help="comma list of result kinds (file suffixes)")
    ap.add_argument("--device", default="h200")
    args = ap.parse_args(argv)
    for kind in filter(None, args.kinds.split(",")):
        name = f"{args.device}-{kind}.json"
        base = RESULTS_DIR / name
        if not base.exists():
            print(f"[merge] no {base}; skipped", file=sys.stderr)
            continue
        n = merge_file(base, [Path(d) / name for d in args.lanes])
        print(f"[merge] {name}: {n} rows from the lanes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
