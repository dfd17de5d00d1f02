// SmolLM2-135M-Instruct (GGUF Q4_1 with a Q8_0 embedding, GPT-2 BPE vocabulary, 30 layers, GQA
// 9/3, RoPE base 100000) through a real cachemgrd. Registered only when CMake knows the model's
// path (CACHEMGR_SMOLLM2_GGUF, which scripts/test.sh fetches): see tests/CMakeLists.txt.
#include <catch2/catch.hpp>
#include <cstdlib>

#include "tests/support/daemon_process.h"
#include "tools/engine/generate.h"
#include "tools/engine/model_files.h"

namespace cachemgr::engine {
namespace {

std::string ModelPath() {
  const char* path = std::getenv("CACHEMGR_SMOLLM2_GGUF");
  REQUIRE(path != nullptr);
  return path;
}

TEST_CASE("SmolLM2-135M loads, tokenizes and answers through the sidecar", "[service]") {
  auto m = LoadModel(ModelPath(), "");
  REQUIRE(m.ok());
  const LlamaConfig& c = m->checkpoint.config;
  CHECK(c.num_layers == 30);
  CHECK(c.num_heads == 9);
  CHECK(c.num_kv_heads == 3);
  CHECK(c.head_dim() == 64);
  CHECK(c.vocab_size == 49152);
  CHECK(c.rope_theta == 100000.0);
  CHECK(m->checkpoint.weights.output.empty());  // tied embeddings
  CHECK_FALSE(m->tokenizer->adds_bos());

  auto daemon = cachemgr::testing::DaemonProcess::Start({"--memory_budget=1G"});
  REQUIRE(daemon.ok());
  SidecarOptions o;
  o.socket_path = (*daemon)->socket_path();
  o.model_name = "smollm2";
  o.dtype = client::DType::kBf16;
  o.num_blocks = 256;
  auto cache = SidecarCache::Attach(o, c);
  REQUIRE(cache.ok());
  ThreadPool pool(2);
  LlamaEngine engine(m->checkpoint, cache->get(), &pool);
  const std::vector<uint32_t> prompt = m->tokenizer->Encode("The capital of France is", true);
  GenerateOptions go;
  go.steps = 3;
  auto out = GenerateGreedy(engine, **cache, *m->tokenizer, "q", prompt, go);
  REQUIRE(out.ok());
  CHECK(out->text.rfind(" Paris", 0) == 0);
  // Compressed with SpindleKV at half the bytes, it still answers.
  client::CompressOptions co;
  co.policy.preset = "spindlekv";
  co.policy.window = 4;
  co.target_kind = client::CompressTargetKind::kByteRatio;
  co.target = 0.5;
  co.input = client::CompressInputSource::kWindowQueries;
  go.compress = co;
  const std::vector<uint32_t> long_prompt = m->tokenizer->Encode(
      "Paris is the capital and largest city of France. It is known for the Eiffel Tower. "
      "The capital of France is",
      true);
  auto compressed = GenerateGreedy(engine, **cache, *m->tokenizer, "c", long_prompt, go);
  REQUIRE(compressed.ok());
  REQUIRE(compressed->compressed.has_value());
  CHECK(std::abs(compressed->compressed->honest_ratio / 0.5 - 1) <= 0.01);
  CHECK(compressed->text.find("Paris") != std::string::npos);
}

}  // namespace
}  // namespace cachemgr::engine
