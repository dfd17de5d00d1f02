#!/usr/bin/python3
"""Plots cachemgr-eval results (Debian's python3-matplotlib).

  scripts/plot_quality.py quality OUT.png TITLE summary.json [summary.json ...]
      quality vs honest byte ratio, one line per policy (the paper's Figure 5): the change in
      mean next-token NLL against FullKV, and greedy agreement with FullKV (several summaries
      of the same model are pooled per policy and target; all must be of one target kind).
  scripts/plot_quality.py observations OUT.png TITLE observations.json
      per layer: the share of token pairs with cosine above the codebook thresholds (K before
      RoPE, V) and how concentrated the window's attention is (the paper's Figure 3).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "spindlekv": dict(color="black", linewidth=2.4, marker="o"),
    "snapkv": dict(color="tab:blue", marker="s"),
    "pyramidkv": dict(color="tab:orange", marker="^"),
    "pyramidinfer": dict(color="tab:green", marker="v"),
    "zigzagkv": dict(color="tab:red", marker="D"),
    "h2o": dict(color="tab:purple", marker="P"),
    "streamingllm": dict(color="tab:brown", marker="X"),
    "codebook": dict(color="tab:pink", marker="*", markersize=12, linestyle="none"),
    "snapkv+codebook": dict(color="tab:blue", linestyle="--", marker="o"),
    "zigzagkv+codebook": dict(color="tab:red", linestyle="--", marker="o"),
    "spindlekv+mean": dict(color="gray", linestyle=":", marker="o"),
    "spindlekv+literal": dict(color="gray", linestyle="-.", marker="o"),
    "spindlekv+headcb": dict(color="olive", linestyle=":", marker="o"),
}


def pooled(paths):
    runs = [json.load(open(p)) for p in paths]
    acc = {}
    for run in runs:
        for r in run["results"]:
            if r["trials"] == 0 or r["policy"] in ("fullkv-reference", "fullkv"):
                continue
            key = (r["policy"], r["target"])
            a = acc.setdefault(key, dict(w=0, x=0, y=0, g=0))
            w = r["trials"]
            a["w"] += w
            a["x"] += w * r["honest_ratio"]
            a["y"] += w * r["delta_nll"]
            a["g"] += w * r["greedy_agreement"]
    lines = {}
    for (policy, _), a in acc.items():
        lines.setdefault(policy, []).append((a["x"] / a["w"], a["y"] / a["w"], a["g"] / a["w"]))
    return runs, {p: sorted(v) for p, v in lines.items()}


def plot_quality(out, title, paths):
    runs, lines = pooled(paths)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for policy, pts in lines.items():
        style = dict(STYLE.get(policy, {}))
        style.setdefault("linewidth", 1.4)
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], label=policy, **style)
        ax2.plot(xs, [p[2] for p in pts], label=policy, **style)
    for ax in (ax1, ax2):
        ax.set_xlabel("honest byte ratio (bytes held / FullKV bytes)")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1.05)
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_ylabel("Δ mean next-token NLL vs FullKV (nats; lower is better)")
    ax2.set_ylabel("greedy agreement with FullKV (share of positions)")
    ax2.axhline(1, color="black", linewidth=0.8)
    n = sum(r["samples"] for r in runs)
    datasets = ", ".join(sorted({r["dataset"] for r in runs}))
    fig.suptitle(f"{title} — {datasets}, {n} samples, {runs[0]['target_kind'].replace('_', ' ')} "
                 "targets")
    ax2.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_observations(out, title, path):
    obs = json.load(open(path))
    layers = [l["layer"] for l in obs["layers"]]
    th = obs["thresholds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {0.8: "tab:gray", 0.9: "tab:blue", 0.95: "tab:orange", 0.98: "tab:red"}
    for t_index, t in enumerate(th):
        ax1.plot(layers, [l["key_similar"][t_index] for l in obs["layers"]], marker="o",
                 color=colors.get(t), label=f"K (pre-RoPE), cos > {t}")
        ax1.plot(layers, [l["value_similar"][t_index] for l in obs["layers"]], marker="s",
                 color=colors.get(t), linestyle="--", label=f"V, cos > {t}")
    step = max(1, len(layers) // 15)
    for ax in (ax1, ax2):
        ax.set_xticks(layers[::step])
    ax1.set_xlabel("layer")
    ax1.set_ylabel("share of token pairs (per KV head)")
    floor = 1e-5  # shares of zero are drawn at the floor
    for line in ax1.get_lines():
        line.set_ydata([max(y, floor) for y in line.get_ydata()])
    ax1.set_yscale("log")
    ax1.set_ylim(floor, 1.5)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.plot(layers, [l["mass90_share"] for l in obs["layers"]], marker="o",
             label="tokens holding 90% of window attention / context")
    ax2.plot(layers, [l["top10_mass"] for l in obs["layers"]], marker="s",
             label="attention mass on the top 10% tokens")
    ax2.set_xlabel("layer")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{title} — {obs['sequences']} prompts")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv):
    if len(argv) < 5 or argv[1] not in ("quality", "observations"):
        sys.exit(__doc__)
    if argv[1] == "quality":
        plot_quality(argv[2], argv[3], argv[4:])
    else:
        plot_observations(argv[2], argv[3], argv[4])


if __name__ == "__main__":
    main(sys.argv)
