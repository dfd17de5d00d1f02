// Fuzzes the GGUF reader and what the engine builds from a GGUF file (tools/engine): the input
// is the file. GgufFile::Open, every metadata getter and tensor read, the Llama checkpoint
// loader (LoadGguf, then the half-split permutation) and the tokenizer (TokenizerFromGguf, then
// encoding and decoding). Oracles besides the sanitizers: a tensor reads back as exactly its
// element count of floats; a loaded checkpoint's weights have the sizes its config implies.
#include <cstddef>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/tokenizer_check.h"
#include "tools/engine/checkpoint.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {
namespace {

using engine::Checkpoint;
using engine::GgufFile;

void CheckCheckpoint(const Checkpoint& ck) {
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
  static MemoryFile* input = new MemoryFile("fuzz-gguf");
  const std::string& path = input->Write(data, size);
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::Open(path);
  if (!file.ok()) return;
  const GgufFile& f = **file;
  for (const char* key : {"general.architecture", "general.alignment", "llama.block_count",
                          "tokenizer.ggml.tokens", "tokenizer.ggml.scores"}) {
    (void)f.GetNumber(key);
    (void)f.GetString(key);
    (void)f.GetNumbers(key);
    (void)f.GetStrings(key);
  }
  for (const GgufFile::Tensor& t : f.tensors()) {
    absl::StatusOr<std::vector<float>> values = f.ReadFloat(t.name, t.dims);
    if (values.ok()) {
      Check(values->size() == t.elements(),
            absl::StrCat("tensor ", t.name, " read ", values->size(), " of ", t.elements()));
    }
  }
  if (absl::StatusOr<Checkpoint> ck = engine::LoadGguf(path); ck.ok()) {
    CheckCheckpoint(*ck);
    engine::ToHalfSplit(*ck);
    CheckCheckpoint(*ck);
  }
  if (auto tokenizer = engine::TokenizerFromGguf(f); tokenizer.ok()) {
    ExerciseTokenizer(**tokenizer);
  }
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
