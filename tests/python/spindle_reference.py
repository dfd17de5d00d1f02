"""A plain numpy reference of the compression math of cachemgr (SpindleKV paper, MISSION.md §4).

Written from the paper, not from the C++ code, in float64 and in the most literal form that is
still practical, so that test_reference.py can check `cachemgrctl` against it:

  * eq. 1-2 window scores (causal softmax over the observation-window queries, column sums,
    either divided by (l - a) as printed ("literal") or left as plain sums ("sum", SnapKV's
    code)), SnapKV's 1-D pooling, and eq. 3 (mean over the query heads of a KV head);
  * eq. 5-7 per-layer budgets with eq. 5 corrected so that the layers' mean is r_c;
  * top-k selection per KV head (ties to the lower token index), or under GQA repeat the query
    heads' rankings merged round-robin per KV head; window always kept;
  * Algorithm 1 exactly as printed: a dense graph G, `while G.any()`, degree = G.sum(1) of the
    remaining graph, argmax (first maximum), mask = outer(~G[i], ~G[i]), G &= mask.

Conventions that the paper leaves open follow MISSION.md / cachemgr's headers: query j of
num_queries sits at token T - num_queries + j; zero vectors have magnitude 0 and are similar to
nothing but themselves; with theta = 1 only vectors with identical unit vectors merge.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Scoring (eq. 1-3)


def softmax_rows(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def attention_column_sums(keys, queries):
    """keys [T, Hkv, D], queries [Nq, Hq, D] (post-RoPE) -> [Hq, T]: sum over the queries of the
    causal attention A[h, j, a] (eq. 1), query j at token T - Nq + j; KV head of query head h is
    h // (Hq / Hkv) (Hugging Face repeat_kv order)."""
    T, hkv, d = keys.shape
    nq, hq, _ = queries.shape
    group = hq // hkv
    positions = T - nq + np.arange(nq)
    future = np.arange(T)[None, :] > positions[:, None]
    sums = np.zeros((hq, T))
    for h in range(hq):
        k = keys[:, h // group, :].astype(np.float64)
        q = queries[:, h, :].astype(np.float64)
        logits = q @ k.T / math.sqrt(d)
        logits[future] = -np.inf
        sums[h] = softmax_rows(logits).sum(axis=0)
    return sums


def split_window(num_tokens, window):
    l_w = min(window, num_tokens)
    return l_w, num_tokens - l_w


def pool1d(rows, pooling, kernel):
    """SnapKV's pooling of [H, l_c] rows: stride 1, kernel//2 cells of padding each side; avg
    counts the zero padding in the divisor (torch avg_pool1d's count_include_pad), max pads with
    -inf."""
    if pooling == "none" or kernel <= 1:
        return rows.copy()
    half = kernel // 2
    n = rows.shape[1]
    fill = 0.0 if pooling == "avg" else -np.inf
    padded = np.full((rows.shape[0], n + 2 * half), fill)
    padded[:, half:half + n] = rows
    windows = np.stack([padded[:, j:j + n] for j in range(kernel)], axis=0)
    return windows.sum(axis=0) / kernel if pooling == "avg" else windows.max(axis=0)


def window_scores(sums, num_tokens, window, normalization, pooling, kernel, gqa, num_kv_heads):
    """Eq. 2 (+ pooling) per query head on the context tokens, then eq. 3 for gqa == "mean".
    sums [Hq, T] -> [Hq (repeat) or Hkv (mean), l_c]."""
    _, l_c = split_window(num_tokens, window)
    ctx = sums[:, :l_c].astype(np.float64)
    if normalization == "literal":
        ctx = ctx / (num_tokens - np.arange(l_c))[None, :]
    pooled = pool1d(ctx, pooling, kernel)
    return gqa_reduce(pooled, gqa, num_kv_heads)


def accumulated_scores(sums, num_tokens, window, gqa, num_kv_heads):
    """H2O: the column sums over every provided query, no divisor, no pooling."""
    _, l_c = split_window(num_tokens, window)
    return gqa_reduce(sums[:, :l_c].astype(np.float64), gqa, num_kv_heads)


def gqa_reduce(per_q_head, gqa, num_kv_heads):
    hq, l_c = per_q_head.shape
    group = hq // num_kv_heads
    if gqa == "repeat" or group == 1:
        return per_q_head
    return per_q_head.reshape(num_kv_heads, group, l_c).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Budgets (eq. 5-7)


def context_ratio(reserve_ratio, num_tokens, window):
    """r_c = (r * l - l_w) / l_c, clamped to [0, 1]; 1 when there is no context."""
    l_w, l_c = split_window(num_tokens, window)
    if l_c == 0:
        return 1.0
    kept = reserve_ratio * num_tokens - l_w
    if kept <= 0:
        return 0.0
    return min(max(kept / l_c, 0.0), 1.0)


def pyramid_ratios(rc, num_layers, beta):
    """Eq. 5-6, corrected: the mean of r_c(0) and r_c(m-1) is r_c."""
    if num_layers <= 1 or rc <= beta:
        return [rc] * num_layers
    alpha = 0.5 * (1.0 + beta)
    if rc <= alpha:
        first, last = 2.0 * rc - beta, beta
    else:
        first, last = 1.0, 2.0 * rc - 1.0
    step = (last - first) / (num_layers - 1)
    ratios = [min(max(first + step * lam, 0.0), 1.0) for lam in range(num_layers)]
    ratios[-1] = last
    return ratios


def head_minimum_budget(mass, tau):
    """ZigZagKV's LMBA of one head: fewest tokens, by decreasing mass, reaching tau * total."""
    m = np.where(mass > 0, mass, 0.0).astype(np.float64)
    need = tau * m.sum()
    if not need > 0:
        return 0
    cs = np.cumsum(np.sort(m)[::-1])
    return int(min(np.searchsorted(cs, need, side="left") + 1, len(m)))


def zigzag_ratios(rc, l_c, lmba, min_fraction):
    num_layers = len(lmba)
    if l_c == 0:
        return [1.0] * num_layers
    total = sum(max(v, 0.0) for v in lmba)
    if not total > 0:
        return [rc] * num_layers
    avg = rc * l_c
    b_min = min_fraction * avg
    budgets, excess, headroom = [], 0.0, 0.0
    for v in lmba:
        raw = b_min + (avg - b_min) * num_layers * (max(v, 0.0) / total)
        if raw > l_c:
            excess += raw - l_c
        b = min(max(raw, 0.0), l_c)
        if raw < l_c:
            headroom += l_c - b
        budgets.append(b)
    if excess > 0 and headroom > 0:
        share = min(1.0, excess / headroom)
        budgets = [min(l_c, b + share * (l_c - b)) if b < l_c else b for b in budgets]
    return [b / l_c for b in budgets]


def kept_context_count(ratio, l_c):
    """Eq. 7: floor(r_c(lambda) * l_c), with 1e-9 of slack for ratios like 0.29 * 100."""
    if not ratio > 0:
        return 0
    return int(min(math.floor(ratio * l_c + 1e-9), l_c))


# ---------------------------------------------------------------------------------------------
# Selection (eq. 7)


def top_k_with_window(scores, num_tokens, window, k):
    """scores [H, l_c] -> [H, k + l_w]: per head the k highest scores (ties to the lower index),
    ascending, then the window tokens."""
    l_w, l_c = split_window(num_tokens, window)
    rows = []
    for row in scores:
        order = np.lexsort((np.arange(l_c), -row))  # by score descending, then index
        chosen = np.sort(order[:k])
        rows.append(np.concatenate([chosen, np.arange(l_c, num_tokens)]))
    return np.array(rows, dtype=np.int64).reshape(len(scores), k + l_w)


def round_robin_last_rank(scores, group, k):
    """The rank at which the round-robin over `scores` [group, l_c] takes its k-th token."""
    l_c = scores.shape[1]
    rankings = [np.lexsort((np.arange(l_c), -scores[g])) for g in range(group)]
    seen = set()
    for rank in range(l_c):
        for g in range(group):
            seen.add(int(rankings[g][rank]))
            if len(seen) == k:
                return rank
    return l_c - 1


def round_robin_with_window(scores, num_kv_heads, num_tokens, window, k):
    """GQA repeat: scores [Hq, l_c] (query head h serves KV head h // (Hq / Hkv)) ->
    [Hkv, k + l_w]. Each query head ranks the context (score descending, ties to the lower
    index); a KV head takes rank 0 of each of its query heads in order, then rank 1, ...,
    skipping tokens already taken, until it holds k; ascending, then the window."""
    l_w, l_c = split_window(num_tokens, window)
    group = scores.shape[0] // num_kv_heads
    rows = []
    for h in range(num_kv_heads):
        rankings = [np.lexsort((np.arange(l_c), -scores[h * group + g])) for g in range(group)]
        taken = []
        seen = set()
        for rank in range(l_c):
            for g in range(group):
                if len(taken) == k:
                    break
                t = int(rankings[g][rank])
                if t not in seen:
                    seen.add(t)
                    taken.append(t)
            if len(taken) == k:
                break
        rows.append(np.concatenate([np.sort(np.array(taken, dtype=np.int64)),
                                    np.arange(l_c, num_tokens)]))
    return np.array(rows, dtype=np.int64).reshape(num_kv_heads, k + l_w)


def sinks_recent(num_heads, num_tokens, window, k, sinks):
    l_w, l_c = split_window(num_tokens, window)
    first = min(sinks, k)
    row = np.concatenate([np.arange(first), np.arange(l_c - (k - first), num_tokens)])
    return np.tile(row, (num_heads, 1))


# ---------------------------------------------------------------------------------------------
# One sequence under one policy (no codebook): per-layer kept tokens


def compress_kept(policy, keys, queries=None, scores=None, reserve_ratio=0.2):
    """policy: dict with schedule, beta, scoring, window, normalization, pooling, pool_kernel,
    sinks, gqa, zigzag_tau, zigzag_min_fraction. keys [L, T, Hkv, D]; queries [L, Nq, Hq, D] or
    scores [L, Hq, T]. Returns (context ratios, kept count k per layer, kept arrays)."""
    num_layers, num_tokens, num_kv_heads, _ = keys.shape
    window = policy["window"]
    l_w, l_c = split_window(num_tokens, window)
    uses_scores = policy["schedule"] != "full" and policy["scoring"] != "sinks_recent"
    num_q_heads = queries.shape[2] if queries is not None else (
        scores.shape[1] if scores is not None else num_kv_heads)

    layer_scores, lmba = [], []
    if uses_scores and l_c > 0:
        for lam in range(num_layers):
            if queries is not None:
                sums = attention_column_sums(keys[lam], queries[lam])
            else:
                sums = scores[lam].astype(np.float64)
            if policy["schedule"] == "zigzag":
                lmba.append(np.mean([head_minimum_budget(sums[h, :l_c], policy["zigzag_tau"])
                                     for h in range(num_q_heads)]))
            if policy["scoring"] == "window":
                layer_scores.append(window_scores(
                    sums, num_tokens, window, policy["normalization"], policy["pooling"],
                    policy["pool_kernel"], policy["gqa"], num_kv_heads))
            else:
                layer_scores.append(accumulated_scores(sums, num_tokens, window, policy["gqa"],
                                                       num_kv_heads))

    rc = context_ratio(reserve_ratio, num_tokens, window)
    schedule = policy["schedule"]
    if schedule == "full":
        ratios = [1.0] * num_layers
    elif schedule == "uniform":
        ratios = [rc] * num_layers
    elif schedule == "pyramid":
        ratios = pyramid_ratios(rc, num_layers, policy["beta"])
    else:
        ratios = zigzag_ratios(rc, l_c, lmba, policy["zigzag_min_fraction"])

    counts, kept = [], []
    for lam in range(num_layers):
        k = l_c if schedule == "full" else kept_context_count(ratios[lam], l_c)
        counts.append(k)
        if k == l_c:
            kept.append(np.tile(np.arange(num_tokens), (num_kv_heads, 1)))
        elif policy["scoring"] == "sinks_recent":
            kept.append(sinks_recent(num_kv_heads, num_tokens, window, k, policy["sinks"]))
        elif layer_scores[lam].shape[0] > num_kv_heads:  # repeat: one row per query head
            kept.append(round_robin_with_window(layer_scores[lam], num_kv_heads, num_tokens,
                                                window, k))
        else:
            kept.append(top_k_with_window(layer_scores[lam], num_tokens, window, k))
    return ratios, counts, kept


def boundary_gaps(policy, keys, queries=None, scores=None, reserve_ratio=0.2):
    """For every scored (layer, head): the relative gap between the k-th and (k+1)-th highest
    score, where float rounding could flip the selection; under GQA repeat, per query head, the
    gaps around the rank R at which the round-robin stops (R-1 | R and R | R+1: the union of the
    top-R sets and the rank-R tokens decide the choice). Returns the smallest (inf if none)."""
    num_layers, num_tokens, num_kv_heads, _ = keys.shape
    window = policy["window"]
    _, l_c = split_window(num_tokens, window)
    ratios, counts, _ = compress_kept(policy, keys, queries, scores, reserve_ratio)
    smallest = math.inf
    for lam in range(num_layers):
        k = counts[lam]
        if k == 0 or k >= l_c or policy["scoring"] == "sinks_recent":
            continue
        sums = (attention_column_sums(keys[lam], queries[lam]) if queries is not None
                else scores[lam].astype(np.float64))
        if policy["scoring"] == "window":
            s = window_scores(sums, num_tokens, window, policy["normalization"],
                              policy["pooling"], policy["pool_kernel"], policy["gqa"],
                              num_kv_heads)
        else:
            s = accumulated_scores(sums, num_tokens, window, policy["gqa"], num_kv_heads)
        group = s.shape[0] // num_kv_heads
        for h, row in enumerate(s):
            ordered = np.sort(row)[::-1]
            scale = max(abs(ordered[0]), 1e-30)
            if group == 1:
                smallest = min(smallest, (ordered[k - 1] - ordered[k]) / scale)
                continue
            g0 = (h // group) * group
            last = round_robin_last_rank(s[g0:g0 + group], group, k)
            for a in (last - 1, last):
                if 0 <= a and a + 1 < len(ordered):
                    smallest = min(smallest, (ordered[a] - ordered[a + 1]) / scale)
    return smallest


# ---------------------------------------------------------------------------------------------
# RoPE (to un-rotate keys as the codebook stage does)


def unrotate(keys, positions, style, theta=10000.0, scaling=1.0, rotary_dim=0):
    """keys [T, H, D] post-RoPE at `positions` -> pre-RoPE (float64)."""
    x = keys.astype(np.float64).copy()
    if style == "none":
        return x
    d = x.shape[-1]
    r = rotary_dim or d
    inv_freq = theta ** (-2.0 * np.arange(r // 2) / r)
    angle = (np.asarray(positions, dtype=np.float64)[:, None] / scaling) * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if style == "interleaved":
        a, b = x[..., 0:r:2].copy(), x[..., 1:r:2].copy()
        x[..., 0:r:2] = a * cos + b * sin
        x[..., 1:r:2] = -a * sin + b * cos
    else:  # half_split
        a, b = x[..., :r // 2].copy(), x[..., r // 2:r].copy()
        x[..., :r // 2] = a * cos + b * sin
        x[..., r // 2:r] = -a * sin + b * cos
    return x


def rotate(keys, positions, style, theta=10000.0, scaling=1.0, rotary_dim=0):
    """Inverse of unrotate (applies RoPE)."""
    x = keys.astype(np.float64).copy()
    if style == "none":
        return x
    d = x.shape[-1]
    r = rotary_dim or d
    inv_freq = theta ** (-2.0 * np.arange(r // 2) / r)
    angle = (np.asarray(positions, dtype=np.float64)[:, None] / scaling) * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if style == "interleaved":
        a, b = x[..., 0:r:2].copy(), x[..., 1:r:2].copy()
        x[..., 0:r:2] = a * cos - b * sin
        x[..., 1:r:2] = a * sin + b * cos
    else:
        a, b = x[..., :r // 2].copy(), x[..., r // 2:r].copy()
        x[..., :r // 2] = a * cos - b * sin
        x[..., r // 2:r] = a * sin + b * cos
    return x


# ---------------------------------------------------------------------------------------------
# Codebook (eq. 8-13, Algorithm 1)


def unit_vectors(x):
    """Eq. 8: magnitudes (float64) and unit vectors x / m rounded to float32 (zero rows stay 0)."""
    x64 = x.astype(np.float64)
    m = np.sqrt((x64 * x64).sum(axis=1))
    u = np.zeros_like(x64)
    nz = m > 0
    u[nz] = x64[nz] / m[nz, None]
    return m, u.astype(np.float32)


def similarity_graph(x, theta):
    """Eq. 9 as a dense boolean matrix, with self-loops; also returns the cosines S (float64)
    for the caller's margin checks."""
    n = x.shape[0]
    m, u = unit_vectors(x)
    u64 = u.astype(np.float64)
    s = u64 @ u64.T
    g = (s > theta) if theta < 1.0 else np.zeros((n, n), dtype=bool)
    # Identical unit vectors (-0.0 == 0.0) are similar at any theta; zero vectors only to
    # themselves.
    nonzero = m > 0
    _, group = np.unique(u + np.float32(0.0), axis=0, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    g |= (group[:, None] == group[None, :]) & nonzero[:, None] & nonzero[None, :]
    g[np.arange(n), np.arange(n)] = True
    g[~nonzero, :] = False
    g[:, ~nonzero] = False
    g[np.arange(n), np.arange(n)] = True
    return g, s


def codebook_algorithm1(x, theta):
    """Algorithm 1 as printed. x [n, d] -> (entries [C, d] float32, refs [n] int64, magnitudes
    [n] float32)."""
    n, d = x.shape
    m, u = unit_vectors(x)
    g, _ = similarity_graph(x, theta)
    entries = []
    refs = np.full(n, -1, dtype=np.int64)
    while g.any():
        s = g.sum(axis=1)  # the degree in the remaining graph (the paper's "sum(S)")
        i = int(np.argmax(s))  # first maximum: ties go to the lowest index
        entries.append(u[i])
        eta = np.argwhere(g[i]).ravel()
        refs[eta] = len(entries) - 1
        mask = np.outer(~g[i], ~g[i])
        g &= mask
    out = np.array(entries, dtype=np.float32).reshape(len(entries), d)
    return out, refs, m.astype(np.float32)


def codebook_margin(x, theta):
    """Smallest |cos - theta| over pairs that are not identical unit vectors (inf if none):
    how close the input comes to an edge float rounding could decide."""
    g, s = similarity_graph(x, theta)
    m, u = unit_vectors(x)
    n = x.shape[0]
    _, group = np.unique(u + np.float32(0.0), axis=0, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    consider = (group[:, None] != group[None, :]) & (m[:, None] > 0) & (m[None, :] > 0)
    if not consider.any():
        return math.inf
    return float(np.abs(s[consider] - theta).min())
