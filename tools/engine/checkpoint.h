// A Llama-architecture checkpoint in memory (float32), loaded from llama2.c files or GGUF.
//
// Weights are row-major [out, in] (a matmul computes y = W x), as llama2.c stores them and as
// GGUF's ne = {in, out} denotes. The attention projections' rows are in the order the
// checkpoint's RoPE style expects: llama2.c and GGUF "llama" files rotate interleaved pairs
// (x[2i], x[2i+1]) (llama.cpp permutes Hugging Face's q/k rows into that order when it
// converts); `ToHalfSplit` permutes them back, for engines that rotate halves (x[i], x[i+d/2]).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace cachemgr::engine {

enum class RopeStyle { kInterleaved, kHalfSplit };

struct LlamaConfig {
  uint32_t dim = 0;         // embedding width
  uint32_t hidden_dim = 0;  // SwiGLU width
  uint32_t num_layers = 0;
  uint32_t num_heads = 0;     // query heads
  uint32_t num_kv_heads = 0;  // GQA: num_heads % num_kv_heads == 0
  uint32_t vocab_size = 0;
  uint32_t max_seq_len = 0;  // the context it was trained for
  uint32_t head_dim() const { return num_heads == 0 ? 0 : dim / num_heads; }
  double rope_theta = 10000.0;
  float rms_eps = 1e-5f;
  RopeStyle rope_style = RopeStyle::kInterleaved;
};

struct LayerWeights {
  std::vector<float> attn_norm;  // [dim]
  std::vector<float> wq;         // [num_heads * head_dim, dim]
  std::vector<float> wk;         // [num_kv_heads * head_dim, dim]
  std::vector<float> wv;         // [num_kv_heads * head_dim, dim]
  std::vector<float> wo;         // [dim, num_heads * head_dim]
  std::vector<float> ffn_norm;   // [dim]
  std::vector<float> w_gate;     // [hidden_dim, dim] (llama2.c w1)
  std::vector<float> w_down;     // [dim, hidden_dim] (w2)
  std::vector<float> w_up;       // [hidden_dim, dim] (w3)
};

struct LlamaWeights {
  std::vector<float> token_embedding;  // [vocab_size, dim]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [dim]
  std::vector<float> output;      // [vocab_size, dim]; empty when tied to token_embedding
  const std::vector<float>& classifier() const {
    return output.empty() ? token_embedding : output;
  }
};

struct Checkpoint {
  LlamaConfig config;
  LlamaWeights weights;
  std::string source;  // path, for messages
};

// llama2.c's legacy (v0) format: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size (negative: the classifier is stored separately), seq_len), then float32 weights in
// llama2.c's order. INVALID_ARGUMENT for a bad header or a file of the wrong size.
absl::StatusOr<Checkpoint> LoadLlama2c(const std::string& path);

// A GGUF file of general.architecture "llama" (F32, F16, BF16, Q4_0, Q4_1 or Q8_0 tensors,
// dequantized here). `output.weight` absent means tied embeddings.
absl::StatusOr<Checkpoint> LoadGguf(const std::string& path);

// Permutes every layer's wq / wk rows from the interleaved-pair order to the half-split order
// and sets config.rope_style: the same model, for an engine whose RoPE rotates halves.
void ToHalfSplit(Checkpoint& checkpoint);

}  // namespace cachemgr::engine
