#include "tools/eval/observations.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/codebook_lsh.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/rope.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/ops.h"

namespace cachemgr::eval {
namespace {

// Share of pairs i < j of `rows` unit vectors (dim d) with cosine above each threshold.
std::vector<double> SimilarShare(const std::vector<float>& unit, size_t rows, uint32_t d,
                                 const std::vector<double>& thresholds) {
  std::vector<double> counts(thresholds.size(), 0);
  size_t pairs = 0;
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = i + 1; j < rows; ++j) {
      const double c = engine::Dot(&unit[i * d], &unit[j * d], d);
      for (size_t k = 0; k < thresholds.size(); ++k) counts[k] += c > thresholds[k] ? 1 : 0;
      ++pairs;
    }
  }
  for (double& c : counts) c = pairs == 0 ? 0 : c / pairs;
  return counts;
}

// Pairs i < j that the exact pass and the hashed search find among `vectors` [n, d] (the
// codebook's eq. 8 unit vectors), as BuildCodebook would for one graph of them all (hashing
// forced even where BuildCodebook would run the exact pass on so few vectors).
absl::Status SearchPairs(const std::vector<float>& vectors, uint32_t d, float theta,
                         uint64_t* exact_pairs, uint64_t* lsh_pairs) {
  const size_t n = vectors.size() / d;
  std::vector<float> unit(vectors.size());
  std::vector<uint8_t> nonzero(n);
  for (size_t i = 0; i < n; ++i) {
    float magnitude = 0;
    compress::NormalizeVector(&vectors[i * d], d, &unit[i * d], &magnitude);
    nonzero[i] = magnitude > 0;
  }
  const size_t words = (n + 63) / 64;
  std::vector<uint64_t> adjacency(n * words, 0);
  compress::SimilarityAdjacency(unit.data(), nonzero.data(), n, d, theta, adjacency.data());
  uint64_t bits = 0;
  for (uint64_t w : adjacency) bits += std::popcount(w);
  *exact_pairs = (bits - n) / 2;
  std::fill(adjacency.begin(), adjacency.end(), 0);
  compress::LshParams params;
  params.exact_below = 0;
  compress::LshStats stats;
  RETURN_IF_ERROR(compress::LshSimilarityAdjacency(unit.data(), nonzero.data(), n, d, theta,
                                                   adjacency.data(), params, &stats));
  *lsh_pairs = stats.edges;
  return absl::OkStatus();
}

void Normalize(float* v, uint32_t d) {
  double n = 0;
  for (uint32_t i = 0; i < d; ++i) n += double{v[i]} * v[i];
  const float inv = n > 0 ? static_cast<float>(1 / std::sqrt(n)) : 0.0f;
  for (uint32_t i = 0; i < d; ++i) v[i] *= inv;
}

}  // namespace

Observations::Observations(uint32_t max_tokens)
    : thresholds_{0.8, 0.9, 0.95, 0.98}, max_tokens_(max_tokens) {}

absl::Status Observations::Add(const engine::SidecarCache& cache, const std::string& seq,
                               const engine::ForwardResult& prefill, uint64_t seed) {
  const engine::LlamaConfig& c = cache.config();
  const uint32_t L = c.num_layers, H = c.num_heads, KV = c.num_kv_heads, d = c.head_dim();
  const size_t q_width = size_t{H} * d, kv_width = size_t{KV} * d;
  const uint32_t window = static_cast<uint32_t>(prefill.window_queries.size() / (L * q_width));
  if (sums_.empty()) {
    sums_.resize(L);
    for (LayerObservation& o : sums_) {
      o.key_similar.assign(thresholds_.size(), 0);
      o.value_similar.assign(thresholds_.size(), 0);
    }
  }
  compress::RopeParams rope;
  rope.style = c.rope_style == engine::RopeStyle::kInterleaved ? compress::RopeStyle::kInterleaved
                                                               : compress::RopeStyle::kHalfSplit;
  rope.theta = c.rope_theta;
  rope.head_dim = d;
  std::vector<float> keys, values;
  for (uint32_t l = 0; l < L; ++l) {
    const uint32_t n = cache.Read(seq, l, &keys, &values);
    if (n <= window) return absl::InvalidArgumentError("the sequence is no longer than its window");
    // Pair similarity on a seeded subset of tokens, K un-rotated first.
    std::vector<uint32_t> pick(n);
    std::iota(pick.begin(), pick.end(), 0);
    std::mt19937_64 rng(seed * 131 + l);
    std::shuffle(pick.begin(), pick.end(), rng);
    pick.resize(std::min<size_t>(pick.size(), max_tokens_));
    std::sort(pick.begin(), pick.end());
    std::vector<float> k(pick.size() * kv_width), v(k.size());
    for (size_t i = 0; i < pick.size(); ++i) {
      std::copy_n(&keys[pick[i] * kv_width], kv_width, &k[i * kv_width]);
      std::copy_n(&values[pick[i] * kv_width], kv_width, &v[i * kv_width]);
    }
    RETURN_IF_ERROR(compress::UnapplyRope(rope, pick, KV, absl::MakeSpan(k)));
    LayerObservation& o = sums_[l];
    for (uint32_t g = 0; g < KV; ++g) {
      std::vector<float> uk(pick.size() * d), uv(pick.size() * d);
      for (size_t i = 0; i < pick.size(); ++i) {
        std::copy_n(&k[i * kv_width + g * d], d, &uk[i * d]);
        std::copy_n(&v[i * kv_width + g * d], d, &uv[i * d]);
        Normalize(&uk[i * d], d);
        Normalize(&uv[i * d], d);
      }
      const std::vector<double> ks = SimilarShare(uk, pick.size(), d, thresholds_);
      const std::vector<double> vs = SimilarShare(uv, pick.size(), d, thresholds_);
      for (size_t t = 0; t < thresholds_.size(); ++t) {
        o.key_similar[t] += ks[t] / KV;
        o.value_similar[t] += vs[t] / KV;
      }
    }
    // Codebook search recall on the layer's codebook inputs (layer scope: every KV head's rows).
    {
      std::vector<float> all_k(keys.begin(), keys.begin() + size_t{n} * kv_width);
      std::vector<uint32_t> tokens(n);
      std::iota(tokens.begin(), tokens.end(), 0);
      RETURN_IF_ERROR(compress::UnapplyRope(rope, tokens, KV, absl::MakeSpan(all_k)));
      const std::vector<float> all_v(values.begin(), values.begin() + size_t{n} * kv_width);
      const compress::PolicyConfig defaults;
      uint64_t ke = 0, kl = 0, ve = 0, vl = 0;
      RETURN_IF_ERROR(SearchPairs(all_k, d, defaults.theta_k, &ke, &kl));
      RETURN_IF_ERROR(SearchPairs(all_v, d, defaults.theta_v, &ve, &vl));
      o.key_pairs_exact += ke;
      o.key_pairs_lsh += kl;
      o.value_pairs_exact += ve;
      o.value_pairs_lsh += vl;
    }
    // Window attention on the context tokens [0, n - window).
    const uint32_t context = n - window;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    double mass90 = 0, top10 = 0;
    std::vector<float> scores(n);
    for (uint32_t h = 0; h < H; ++h) {
      std::vector<double> sums(context, 0.0);
      for (uint32_t w = 0; w < window; ++w) {
        const float* q = &prefill.window_queries[(size_t{l} * window + w) * q_width + h * d];
        const uint32_t visible = context + w + 1;
        for (uint32_t j = 0; j < visible; ++j) {
          scores[j] = engine::Dot(q, &keys[j * kv_width + (h / (H / KV)) * d], d) * scale;
        }
        engine::Softmax(scores.data(), visible);
        for (uint32_t j = 0; j < context; ++j) sums[j] += scores[j];
      }
      std::sort(sums.begin(), sums.end(), std::greater<double>());
      const double total = std::accumulate(sums.begin(), sums.end(), 0.0);
      double acc = 0;
      uint32_t needed = context;
      for (uint32_t j = 0; j < context; ++j) {
        acc += sums[j];
        if (acc >= 0.9 * total) {
          needed = j + 1;
          break;
        }
      }
      const uint32_t top = std::max<uint32_t>(1, (context + 9) / 10);
      mass90 += static_cast<double>(needed) / context;
      top10 += std::accumulate(sums.begin(), sums.begin() + top, 0.0) / total;
    }
    o.mass90_share += mass90 / H;
    o.top10_mass += top10 / H;
  }
  ++sequences_;
  return absl::OkStatus();
}

std::vector<LayerObservation> Observations::Layers() const {
  std::vector<LayerObservation> out = sums_;
  if (sequences_ == 0) return out;
  for (LayerObservation& o : out) {
    for (double& x : o.key_similar) x /= sequences_;
    for (double& x : o.value_similar) x /= sequences_;
    o.mass90_share /= sequences_;
    o.top10_mass /= sequences_;
  }
  return out;
}

std::string Observations::Json() const {
  auto list = [](const std::vector<double>& v) {
    return absl::StrCat("[",
                        absl::StrJoin(v, ", ",
                                      [](std::string* out, double x) {
                                        absl::StrAppend(out, absl::StrFormat("%.6f", x));
                                      }),
                        "]");
  };
  std::string out = absl::StrCat("{\"thresholds\": ", list(thresholds_),
                                 ", \"sequences\": ", sequences_, ", \"layers\": [");
  const std::vector<LayerObservation> layers = Layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    absl::StrAppend(&out, l ? ", " : "", "{\"layer\": ", l,
                    ", \"key_similar\": ", list(layers[l].key_similar),
                    ", \"value_similar\": ", list(layers[l].value_similar),
                    absl::StrFormat(", \"key_pairs_exact\": %d, \"key_pairs_lsh\": %d"
                                    ", \"value_pairs_exact\": %d, \"value_pairs_lsh\": %d",
                                    layers[l].key_pairs_exact, layers[l].key_pairs_lsh,
                                    layers[l].value_pairs_exact, layers[l].value_pairs_lsh),
                    absl::StrFormat(", \"mass90_share\": %.6f, \"top10_mass\": %.6f}",
                                    layers[l].mass90_share, layers[l].top10_mass));
  }
  out += "]}\n";
  return out;
}

}  // namespace cachemgr::eval
