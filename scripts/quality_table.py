#!/usr/bin/env python3
"""One markdown table per model from cachemgr-eval summaries: a row per policy, a column per
target, each cell "ΔNLL / greedy agreement", plus the honest byte ratio held for reserve-ratio
targets (byte-ratio targets are met within 1%, so the column header is the byte ratio).

  scripts/quality_table.py summary.json [summary.json ...]

Several summaries of one model and target kind are pooled per policy and target, weighted by
trials (scripts/best_policy.py's pooling). A policy that failed on some samples is marked
"(k failed)"; a target no sample reached shows "–".
"""

import sys

from best_policy import pooled

ORDER = ["streamingllm", "h2o", "snapkv", "pyramidkv", "pyramidinfer", "zigzagkv", "codebook",
         "spindlekv"]  # the presets; composed variants follow, by name


def main(paths):
    if not paths:
        sys.exit(__doc__)
    kind, points = pooled(paths)
    targets = sorted({t for pts in points.values() for t, _ in pts if t < 1.0})
    reserve = kind != "byte_ratio"
    head = "reserve" if reserve else "bytes"
    print("| policy | " + " | ".join(f"{head} {t:.2f}" for t in targets) + " | ratio-free |")
    print("|---|" + "---:|" * (len(targets) + 1))
    for policy in sorted(points, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p)):
        by_target = dict(points[policy])
        cells = []
        for t in targets + [1.0]:
            m = by_target.get(t)
            if m is None or (t == 1.0 and policy != "codebook"):
                cells.append("–" if t < 1.0 else "")
                continue
            cell = f"{m['delta_nll']:+.3f} / {m['greedy_agreement']:.2f}"
            if reserve or t == 1.0:
                cell += f" ({m['honest_ratio']:.2f} B)"
            if m["failed"]:
                cell += f" ({int(m['failed'])} failed)"
            cells.append(cell)
        print(f"| {policy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
