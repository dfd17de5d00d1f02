// Fuzzes the llama2.c checkpoint loader (tools/engine/checkpoint.h, LoadLlama2c): the input is
// the file. Oracle besides the sanitizers: a loaded checkpoint's weights have the sizes its
// header implies, before and after the half-split permutation.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "tools/engine/checkpoint.h"

namespace cachemgr::fuzz {
namespace {

void CheckSizes(const engine::Checkpoint& ck) {
  const engine::LlamaConfig& c = ck.config;
  const uint64_t d = c.dim, hd = c.head_dim(), h = c.hidden_dim;
  const uint64_t q = uint64_t{c.num_heads} * hd, kv = uint64_t{c.num_kv_heads} * hd;
  const engine::LlamaWeights& w = ck.weights;
  Check(w.token_embedding.size() == uint64_t{c.vocab_size} * d, "token_embedding size");
  Check(w.final_norm.size() == d, "final_norm size");
  Check(w.output.empty() || w.output.size() == uint64_t{c.vocab_size} * d, "output size");
  Check(w.layers.size() == c.num_layers, "layer count");
  for (const engine::LayerWeights& l : w.layers) {
    Check(l.attn_norm.size() == d && l.ffn_norm.size() == d, "norm sizes");
    Check(l.wq.size() == q * d && l.wo.size() == d * q, "wq/wo sizes");
    Check(l.wk.size() == kv * d && l.wv.size() == kv * d, "wk/wv sizes");
    Check(l.w_gate.size() == h * d && l.w_up.size() == h * d && l.w_down.size() == d * h,
          "ffn sizes");
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  static MemoryFile* input = new MemoryFile("fuzz-llama2c");
  absl::StatusOr<engine::Checkpoint> ck = engine::LoadLlama2c(input->Write(data, size));
  if (!ck.ok()) return;
  CheckSizes(*ck);
  engine::ToHalfSplit(*ck);
  CheckSizes(*ck);
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
