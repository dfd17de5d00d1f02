#include "fuzz/model_check.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_util.h"

namespace cachemgr::fuzz {

void ExerciseTokenizer(const engine::Tokenizer& tokenizer) {
  // Letters, digits, contractions, spaces, UTF-8 of 2-4 bytes, an invalid byte, specials.
  static const char* const kTexts[] = {
      "Once upon a time, there was 1 cat.",
      "  it's 2024\n\tdon't\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xff",
      "<|im_start|>user\nhi<|im_end|></s><s>",
  };
  for (const char* text : kTexts) {
    for (int mode = 0; mode < 4; ++mode) {
      const std::vector<uint32_t> ids = tokenizer.Encode(text, mode & 1, mode & 2);
      uint32_t previous = tokenizer.bos_id();
      for (size_t i = 0; i < ids.size(); ++i) {
        const uint32_t id = ids[i];
        Check(id < tokenizer.vocab_size(),
              absl::StrCat("Encode produced id ", id, " of a vocabulary of ",
                           tokenizer.vocab_size()));
        tokenizer.Decode(previous, id);
        previous = id;
      }
    }
  }
  const uint32_t n = std::min<uint32_t>(tokenizer.vocab_size(), 4096);
  for (uint32_t id = 0; id <= n; ++id) tokenizer.Decode(tokenizer.bos_id(), id);
}

void CheckCheckpointSizes(const engine::Checkpoint& ck) {
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

}  // namespace cachemgr::fuzz
