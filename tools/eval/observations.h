// The paper's preliminary observations (§3.2, Figure 3, Appendix B), measured on a prefilled
// FullKV sequence of the real model:
//   similarity: per layer, the share of token pairs (of one KV head) whose cosine similarity
//     exceeds a threshold, for K before RoPE (what the codebook is built on) and for V;
//   codebook search: per layer, the similar pairs of the layer's codebook inputs (every token of
//     every KV head, K before RoPE at theta_K 0.98, V at theta_V 0.95) that the hashed search
//     (CodebookSearch::kLsh, codebook_lsh.h) finds, against the exact pass's;
//   attention concentration: per layer, from the observation window's attention (eq. 2 sums
//     over the last `window` queries) on the context tokens, the fewest tokens holding 90% of
//     the mass as a share of the context, and the mass on the top 10% of tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tools/engine/llama.h"
#include "tools/engine/sidecar_cache.h"

namespace cachemgr::eval {

struct LayerObservation {
  std::vector<double> key_similar;    // per threshold, share of pairs
  std::vector<double> value_similar;  // per threshold
  // Codebook search, summed over the sequences (not averaged): pairs i < j with cos > theta
  // found by the exact pass and by hashing (a subset).
  uint64_t key_pairs_exact = 0, key_pairs_lsh = 0;
  uint64_t value_pairs_exact = 0, value_pairs_lsh = 0;
  double mass90_share = 0;            // tokens for 90% of the window attention / context
  double top10_mass = 0;              // window attention on the top 10% of the context
};

class Observations {
 public:
  // Thresholds 0.8, 0.9, 0.95, 0.98; at most `max_tokens` tokens (seeded sample) per sequence
  // for the pair counts.
  explicit Observations(uint32_t max_tokens = 512);

  // Adds one prefilled sequence (`seq`, every layer holding its prompt) whose prefill recorded
  // `prefill.window_queries`.
  absl::Status Add(const engine::SidecarCache& cache, const std::string& seq,
                   const engine::ForwardResult& prefill, uint64_t seed);

  const std::vector<double>& thresholds() const { return thresholds_; }
  uint32_t sequences() const { return sequences_; }
  // Means over the sequences added.
  std::vector<LayerObservation> Layers() const;
  // JSON: {"thresholds": [...], "sequences": n, "layers": [{...}, ...]}.
  std::string Json() const;

 private:
  std::vector<double> thresholds_;
  uint32_t max_tokens_;
  uint32_t sequences_ = 0;
  std::vector<LayerObservation> sums_;
};

}  // namespace cachemgr::eval
