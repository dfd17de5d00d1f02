// The llama2.c and GGUF loaders on stories260K: the same model either way; the half-split
// permutation; bad files refused.
#include "tools/engine/checkpoint.h"

#include <catch2/catch.hpp>
#include <fstream>

#include "tests/support/allocation_cap.h"
#include "tests/support/temp_dir.h"
#include "tests/support/testdata.h"
#include "tests/tools/engine/gguf_writer.h"

namespace cachemgr::engine {
namespace {

TEST_CASE("llama2.c and GGUF loaders read the same stories260K", "[cpu]") {
  auto bin = LoadLlama2c(cachemgr::testing::StoriesBin());
  REQUIRE(bin.ok());
  auto gguf = LoadGguf(cachemgr::testing::StoriesGguf());
  REQUIRE(gguf.ok());
  const LlamaConfig& a = bin->config;
  const LlamaConfig& b = gguf->config;
  CHECK(a.dim == 64);
  CHECK(a.hidden_dim == 172);
  CHECK(a.num_layers == 5);
  CHECK(a.num_heads == 8);
  CHECK(a.num_kv_heads == 4);
  CHECK(a.vocab_size == 512);
  CHECK(a.max_seq_len == 512);
  CHECK(a.head_dim() == 8);
  CHECK(b.dim == a.dim);
  CHECK(b.hidden_dim == a.hidden_dim);
  CHECK(b.num_layers == a.num_layers);
  CHECK(b.num_heads == a.num_heads);
  CHECK(b.num_kv_heads == a.num_kv_heads);
  CHECK(b.vocab_size == a.vocab_size);
  CHECK(b.rope_theta == a.rope_theta);
  // Both store F32: every weight is bit-identical.
  CHECK(gguf->weights.token_embedding == bin->weights.token_embedding);
  CHECK(gguf->weights.final_norm == bin->weights.final_norm);
  CHECK(gguf->weights.classifier() == bin->weights.classifier());
  for (uint32_t l = 0; l < a.num_layers; ++l) {
    const LayerWeights& x = bin->weights.layers[l];
    const LayerWeights& y = gguf->weights.layers[l];
    INFO("layer " << l);
    CHECK(x.wq == y.wq);
    CHECK(x.wk == y.wk);
    CHECK(x.wv == y.wv);
    CHECK(x.wo == y.wo);
    CHECK(x.w_gate == y.w_gate);
    CHECK(x.w_down == y.w_down);
    CHECK(x.w_up == y.w_up);
    CHECK(x.attn_norm == y.attn_norm);
    CHECK(x.ffn_norm == y.ffn_norm);
  }
}

TEST_CASE("half-split permutes each head's q and k rows", "[cpu]") {
  auto ck = LoadLlama2c(cachemgr::testing::StoriesBin());
  REQUIRE(ck.ok());
  const Checkpoint before = *ck;
  ToHalfSplit(*ck);
  CHECK(ck->config.rope_style == RopeStyle::kHalfSplit);
  const uint32_t d = 64, hd = 8;
  for (uint32_t h = 0; h < 4; ++h) {  // KV heads
    for (uint32_t i = 0; i < hd / 2; ++i) {
      for (uint32_t c = 0; c < d; ++c) {
        const auto& wk = ck->weights.layers[2].wk;
        const auto& old = before.weights.layers[2].wk;
        CHECK(wk[(h * hd + i) * d + c] == old[(h * hd + 2 * i) * d + c]);
        CHECK(wk[(h * hd + hd / 2 + i) * d + c] == old[(h * hd + 2 * i + 1) * d + c]);
      }
    }
  }
  CHECK(ck->weights.layers[2].wv == before.weights.layers[2].wv);
  ToHalfSplit(*ck);  // idempotent
  CHECK(ck->weights.layers[0].wq != before.weights.layers[0].wq);
}

TEST_CASE("bad checkpoints are refused", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("bad.bin");
  {
    std::ifstream in(cachemgr::testing::StoriesBin(), std::ios::binary);
    std::ofstream out(path, std::ios::binary);
    std::string head(28 + 400, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    out.write(head.data(), static_cast<std::streamsize>(head.size()));  // header, few weights
  }
  auto short_file = LoadLlama2c(path);
  CHECK(short_file.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(short_file.status().message()), Catch::Contains("describes"));
  std::ofstream(path) << "garbage";
  CHECK(LoadLlama2c(path).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(LoadGguf(path).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(LoadLlama2c(dir.file("missing")).status().code() == absl::StatusCode::kNotFound);
}

// Found while writing fuzz/llama2c_checkpoint_fuzzer.cc and fuzz/gguf_fuzzer.cc (inputs in
// fuzz/corpus/): counts in a header are checked, with their products, before anything is
// allocated from them.

// A llama2.c file of the header and `floats` float32 zeros.
void WriteLlama2c(const std::string& path, const std::vector<int32_t>& header, size_t floats) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()),
            static_cast<std::streamsize>(header.size() * 4));
  const std::string zeros(floats * 4, '\0');
  out.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
}

TEST_CASE("llama2.c headers whose size arithmetic wraps are refused", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("wrap.bin");
  cachemgr::testing::AllocationCap cap(uint64_t{64} << 20);
  // Valid-looking counts (dim 2^24, 2^22 heads, 4681 layers, ...) whose byte size is 2^64 * k +
  // 44: a 44-byte file matched it, and the loader then asked for 2^48 floats.
  WriteLlama2c(path, {1 << 24, 1 << 24, 4681, 1 << 22, 1 << 22, 16767853, 1}, 4);
  auto positive = LoadLlama2c(path);
  CHECK(positive.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(positive.status().message()), Catch::Contains("2^64"));
  // Negative counts (only vocab_size may be negative) read as ~2^32 and wrapped the same way.
  WriteLlama2c(path, {-(1 << 24), -(1 << 24), 9399, 1 << 23, 1 << 23, 16758417, 1}, 510);
  auto negative = LoadLlama2c(path);
  CHECK(negative.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(negative.status().message()), Catch::Contains("header"));
}

// A GGUF Llama of dim 8 (2 heads, 1 KV head, hidden 16) with its embeddings and final norm, and
// `layers` stated layers of which none is present.
testing::GgufWriter GgufLlamaHead(uint32_t layers) {
  testing::GgufWriter w;
  w.String("general.architecture", "llama");
  w.Uint32("llama.embedding_length", 8);
  w.Uint32("llama.feed_forward_length", 16);
  w.Uint32("llama.block_count", layers);
  w.Uint32("llama.attention.head_count", 2);
  w.Uint32("llama.attention.head_count_kv", 1);
  w.Uint32("llama.context_length", 16);
  w.Tensor("token_embd.weight", {8, 4}, 0, std::vector<uint8_t>(8 * 4 * 4));
  w.Tensor("output_norm.weight", {8}, 0, std::vector<uint8_t>(8 * 4));
  return w;
}

TEST_CASE("GGUF hyperparameters must be counts, and layers the file holds", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("llama.gguf");
  cachemgr::testing::AllocationCap cap(uint64_t{64} << 20);
  GgufLlamaHead(4000000000u).Write(path);  // 4e9 layers: ~900 GB of layer tables
  auto layers = LoadGguf(path);
  CHECK(layers.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(layers.status().message()),
             Catch::Contains("llama.block_count 4000000000 but only 2 tensors"));
  for (float bad : {-1.0f, 1e20f, 8.5f}) {
    INFO("embedding_length " << bad);
    testing::GgufWriter w = GgufLlamaHead(1);
    w.Float32("llama.embedding_length", bad);  // the later key wins
    w.Write(path);
    auto loaded = LoadGguf(path);
    CHECK(loaded.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(loaded.status().message()),
               Catch::Contains("llama.embedding_length is"));
  }
}

}  // namespace
}  // namespace cachemgr::engine
