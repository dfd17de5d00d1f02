#!/usr/bin/python3
"""Which policy is best at each honest byte ratio, from cachemgr-eval summaries.

  scripts/best_policy.py [--grid=0.15,0.2,0.3,0.4,0.5] summary.json [summary.json ...]
  scripts/best_policy.py --ranks [--grid=...] summary.json[,summary.json] [...]

Pools the summaries (one model; all byte-ratio targets, or all reserve-ratio targets) per policy
and target, weighting by trials. Byte-target runs are compared at their targets. Reserve-target
runs hold different bytes per policy (a codebook shrinks what is kept), so each policy's metric
is interpolated linearly in honest bytes at the grid points between two of its measured
targets at most 0.2 apart (no extrapolation, no bridging of a wide gap such as reserve 0.5 to
1.0) and policies are compared there. Prints a markdown table: per byte ratio the
best policy by mean ΔNLL (lower is better), by greedy agreement with FullKV (higher), and by
exact match when the data has it, each with the runner-up. * marks a policy that failed on
some samples (ranked over the samples it reached). Codebook-only has no ratio: it joins the
comparison at the bytes it held (reserve runs: a cell at those bytes, the others interpolated
there; byte runs: the nearest target's cell when within 0.02).

--ranks treats every argument separately (different models or datasets; A.json,B.json pools
two runs of one dataset into one argument) and prints each
policy's mean rank (1 = best) over all (summary, byte ratio) cells where it was measured, by
ΔNLL and by greedy agreement, with the number of cells and how often it was best, and its ΔNLL
regret (its ΔNLL minus the cell's best, in nats) as a mean and a maximum over its cells: the
measurement behind the daemon's default policy (docs/QUALITY.md).
"""

import json
import sys
from collections import defaultdict

METRICS = ("delta_nll", "greedy_agreement", "exact_match", "honest_ratio")


def pooled(paths):
    acc = defaultdict(lambda: defaultdict(float))
    kinds = set()
    for path in paths:
        summary = json.load(open(path))
        kinds.add(summary["target_kind"])
        for r in summary["results"]:
            if r["policy"] in ("fullkv", "fullkv-reference") or r["trials"] == 0:
                continue
            a = acc[(r["policy"], r["target"])]
            w = r["trials"]
            a["w"] += w
            a["failed"] += r["failed"]
            for key in METRICS:
                a[key] += w * r[key]
    if len(kinds) != 1:
        sys.exit(f"mixed target kinds {sorted(kinds)}")
    points = defaultdict(list)  # policy -> [(target, metrics)]
    for (policy, target), a in acc.items():
        m = {k: a[k] / a["w"] for k in METRICS}
        m["failed"] = a["failed"]
        points[policy].append((target, m))
    return kinds.pop(), points


def at_grid(points, grid):
    """{byte ratio: {policy: metrics}} by linear interpolation in honest bytes."""
    out = defaultdict(dict)
    for policy, pts in points.items():
        pts = sorted(pts, key=lambda p: p[0])  # by target: bytes rise with the reserve ratio
        for g in grid:
            for (t0, lo), (t1, hi) in zip(pts, pts[1:]):
                x0, x1 = lo["honest_ratio"], hi["honest_ratio"]
                if t1 - t0 <= 0.2 + 1e-9 and x0 <= g <= x1 and x1 > x0:
                    t = (g - x0) / (x1 - x0)
                    m = {k: lo[k] + t * (hi[k] - lo[k]) for k in METRICS}
                    m["failed"] = lo["failed"] + hi["failed"]
                    out[g][policy] = m
                    break
    return out


def ratio_free(points):
    """{policy: metrics} of policies measured only without a ratio (target 1) that still held
    fewer bytes than FullKV (codebook-only: its bytes follow from the data, not a target)."""
    out = {}
    for policy, pts in points.items():
        if len(pts) == 1 and pts[0][0] >= 1.0 and pts[0][1]["honest_ratio"] < 0.99:
            out[policy] = pts[0][1]
    return out


def table_of(paths, grid):
    """{byte ratio: {policy: metrics}}. A ratio-free policy joins the cell at its own bytes:
    reserve-ratio runs get that cell added (the others interpolated there); byte-ratio runs
    put it in the cell of the nearest target when within 0.02 of it."""
    kind, points = pooled(paths)
    free = ratio_free(points)
    if kind == "byte_ratio":
        table = defaultdict(dict)
        for policy, pts in points.items():
            for target, m in pts:
                if target < 1.0:
                    table[target][policy] = m
        for policy, m in free.items():
            near = min(table, key=lambda t: abs(t - m["honest_ratio"]), default=None)
            if near is not None and abs(near - m["honest_ratio"]) <= 0.02:
                table[near][policy] = m
        return table
    table = at_grid(points, sorted(set(grid) | {round(m["honest_ratio"], 3)
                                                for m in free.values()}))
    for policy, m in free.items():
        table[round(m["honest_ratio"], 3)][policy] = m
    return table


def ranks(paths, grid):
    stats = defaultdict(lambda: defaultdict(float))
    for group in paths:
        for target, rows in table_of(group.split(","), grid).items():
            if len(rows) < 2:
                continue
            best_nll = min(m["delta_nll"] for m in rows.values())
            for policy, m in rows.items():
                regret = m["delta_nll"] - best_nll
                stats[policy]["regret_sum"] += regret
                stats[policy]["regret_max"] = max(stats[policy]["regret_max"], regret)
            for key, reverse in (("delta_nll", False), ("greedy_agreement", True)):
                ranked = sorted(rows, key=lambda p: rows[p][key], reverse=reverse)
                for i, policy in enumerate(ranked):
                    stats[policy][key + "_rank"] += i + 1
                    stats[policy][key + "_best"] += i == 0
                    stats[policy][key + "_cells"] += 1
    print("| policy | mean rank ΔNLL | best ΔNLL | mean rank agreement | best agreement | cells "
          "| mean ΔNLL regret | max ΔNLL regret |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    order = sorted(stats, key=lambda p: (stats[p]["delta_nll_rank"] / stats[p]["delta_nll_cells"]
                                         + stats[p]["greedy_agreement_rank"]
                                         / stats[p]["greedy_agreement_cells"]))
    for p in order:
        s = stats[p]
        print(f"| {p} | {s['delta_nll_rank'] / s['delta_nll_cells']:.2f} | "
              f"{int(s['delta_nll_best'])} | "
              f"{s['greedy_agreement_rank'] / s['greedy_agreement_cells']:.2f} | "
              f"{int(s['greedy_agreement_best'])} | {int(s['delta_nll_cells'])} | "
              f"{s['regret_sum'] / s['delta_nll_cells']:.3f} | {s['regret_max']:.3f} |")


def main(argv):
    grid = [0.15, 0.2, 0.3, 0.4, 0.5]
    paths = []
    rank_mode = False
    for arg in argv:
        if arg.startswith("--grid="):
            grid = [float(x) for x in arg[7:].split(",")]
        elif arg == "--ranks":
            rank_mode = True
        else:
            paths.append(arg)
    if rank_mode:
        ranks(paths, grid)
        return
    table = table_of(paths, grid)
    has_em = any(m["exact_match"] > 0 for rows in table.values() for m in rows.values())

    def best(rows, key, reverse):
        ranked = sorted(rows.items(), key=lambda kv: kv[1][key], reverse=reverse)

        def cell(i):
            if i >= len(ranked):
                return "-"
            p, v = ranked[i]
            mark = "*" if v["failed"] else ""
            return f"{p}{mark} {v[key]:+.4f}" if key == "delta_nll" else f"{p}{mark} {v[key]:.3f}"
        return cell(0), cell(1)

    header = "| bytes | best ΔNLL | runner-up | best greedy agreement | runner-up |"
    sep = "|---:|---|---|---|---|"
    if has_em:
        header += " best exact match | runner-up |"
        sep += "---|---|"
    print(header)
    print(sep)
    for target in sorted(table):
        rows = table[target]
        cells = [*best(rows, "delta_nll", False), *best(rows, "greedy_agreement", True)]
        if has_em:
            cells += best(rows, "exact_match", True)
        print(f"| {target:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
