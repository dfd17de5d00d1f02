// The engine on the real stories260K through a real cachemgrd: the golden greedy output with
// FullKV, the same logits from both loaders and both RoPE styles, and compressed caches that the
// model still decodes from.
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tests/support/daemon_process.h"
#include "tests/support/testdata.h"
#include "tools/engine/generate.h"
#include "tools/engine/llama.h"
#include "tools/engine/model_files.h"
#include "tools/engine/ops.h"

namespace cachemgr::engine {
namespace {

struct Reference {
  std::string text;
  std::vector<uint32_t> first_ids;
};

// The golden file: a comment, the text, an empty line, a comment, "ids: [...]", the text again.
Reference ReadReference() {
  std::ifstream in(cachemgr::testing::GreedyReference());
  std::string line;
  Reference r;
  std::getline(in, line);  // "# run.c ..."
  std::vector<std::string> text_lines;
  while (std::getline(in, line) && !line.empty()) text_lines.push_back(line);
  r.text = absl::StrJoin(text_lines, "\n");
  while (std::getline(in, line)) {
    if (line.rfind("ids: [", 0) != 0) continue;
    for (absl::string_view id : absl::StrSplit(line.substr(6, line.size() - 7), ", ")) {
      uint32_t v = 0;
      REQUIRE(absl::SimpleAtoi(id, &v));
      r.first_ids.push_back(v);
    }
  }
  return r;
}

// |a - b|_1 / |b|_1.
double RelativeL1(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += std::abs(a[i] - b[i]);
    norm += std::abs(b[i]);
  }
  return diff / norm;
}

struct Setup {
  explicit Setup(const std::string& model, const std::string& tokenizer, bool half_split = false,
                 client::DType dtype = client::DType::kFp32, const std::string& name = "") {
    auto d = cachemgr::testing::DaemonProcess::Start();
    REQUIRE(d.ok());
    daemon = std::move(*d);
    auto m = LoadModel(model, tokenizer, half_split);
    REQUIRE(m.ok());
    loaded = std::move(*m);
    SidecarOptions o;
    o.socket_path = daemon->socket_path();
    o.model_name = name.empty() ? loaded.name : name;
    o.dtype = dtype;
    o.num_blocks = 256;
    auto c = SidecarCache::Attach(o, loaded.checkpoint.config);
    REQUIRE(c.ok());
    cache = std::move(*c);
    engine = std::make_unique<LlamaEngine>(loaded.checkpoint, cache.get(), &pool);
  }
  std::unique_ptr<cachemgr::testing::DaemonProcess> daemon;
  LoadedModel loaded;
  std::unique_ptr<SidecarCache> cache;
  ThreadPool pool{2};
  std::unique_ptr<LlamaEngine> engine;
};

TEST_CASE("FullKV through the sidecar reproduces llama2.c's greedy output", "[service]") {
  const std::string model = GENERATE(std::string("bin"), std::string("gguf"));
  INFO("model " << model);
  Setup s(model == "bin" ? cachemgr::testing::StoriesBin() : cachemgr::testing::StoriesGguf(),
          model == "bin" ? cachemgr::testing::Tok512() : "");
  const Reference ref = ReadReference();
  REQUIRE(ref.first_ids.size() == 60);
  GenerateOptions go;
  go.steps = 256;
  go.stop_tokens = {1};  // run.c stops at BOS
  auto out = GenerateGreedy(*s.engine, *s.cache, *s.loaded.tokenizer, "golden", {1}, go);
  REQUIRE(out.ok());
  REQUIRE(out->tokens.size() >= 60);
  CHECK(std::vector<uint32_t>(out->tokens.begin(), out->tokens.begin() + 60) == ref.first_ids);
  CHECK(out->text == ref.text);
  // The KV lived in the daemon: 257 rows per layer (BOS + 256 tokens, the last not yet written).
  CHECK(s.cache->rows("golden", 0) == 256);
  // Its appends (one Step each) went through the fast path.
  CHECK(s.cache->session().fast_path_calls() >= 256);
  REQUIRE(s.cache->Free("golden").ok());
}

std::vector<uint32_t> Prompt(const Tokenizer& t) {
  return t.Encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
      "Lily's mom said, \"Lily, let's go to the park.\"",
      true);
}

TEST_CASE("both loaders and both RoPE styles give the same logits", "[service]") {
  Setup bin(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512());
  Setup gguf(cachemgr::testing::StoriesGguf(), "");
  Setup half(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512(), /*half_split=*/true);
  const std::vector<uint32_t> prompt = Prompt(*bin.loaded.tokenizer);
  ForwardOptions all;
  all.all_logits = true;
  all.chunk = 17;  // several Allocates, a partial block each
  auto a = bin.engine->Forward("s", prompt, all);
  auto b = gguf.engine->Forward("s", prompt, all);
  auto c = half.engine->Forward("s", prompt, all);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(c.ok());
  REQUIRE(a->logits.size() == prompt.size() * 512);
  CHECK(a->logits == b->logits);  // identical weights, identical arithmetic
  double worst = 0;
  for (size_t i = 0; i < a->logits.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(a->logits[i] - c->logits[i])));
  }
  CHECK(worst < 1e-3);  // same math, rows permuted: only the summation order differs
  // One chunk or many: the same logits (allocation in pieces is invisible to the model).
  ForwardOptions one = all;
  one.chunk = 1024;
  auto whole = bin.engine->Forward("t", prompt, one);
  REQUIRE(whole.ok());
  for (size_t i = 0; i < a->logits.size(); ++i)
    CHECK(whole->logits[i] == Approx(a->logits[i]).margin(1e-4));
}

TEST_CASE("a compressed cache: kept tokens decode on, fullkv at ratio 1 changes nothing",
          "[service]") {
  Setup s(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512());
  const std::vector<uint32_t> prompt = Prompt(*s.loaded.tokenizer);
  const std::vector<uint32_t> next = {403, 407, 261, 378};  // some continuation
  ForwardOptions capture;
  capture.window_queries = 8;
  capture.attention_sums = true;
  auto base = s.engine->Forward("p", prompt, capture);
  REQUIRE(base.ok());
  REQUIRE(base->window_queries.size() == size_t{5} * 8 * 8 * 8);
  REQUIRE(base->attention_sums.size() == size_t{5} * 8 * prompt.size());
  // Each query's attention sums to 1: the sums over all rows add up to the token count.
  double total = 0;
  for (size_t r = 0; r < prompt.size(); ++r) total += base->attention_sums[r];
  CHECK(total == Approx(static_cast<double>(prompt.size())).epsilon(1e-4));

  ForwardOptions all;
  all.all_logits = true;
  REQUIRE(s.cache->Fork("p", "full").ok());
  auto full = s.engine->Forward("full", next, all);
  REQUIRE(full.ok());

  for (const std::string policy : {"fullkv", "snapkv", "h2o", "spindlekv"}) {
    INFO("policy " << policy);
    const std::string id = "c-" + policy;
    REQUIRE(s.cache->Fork("p", id).ok());
    client::CompressOptions co;
    co.policy.preset = policy;
    co.policy.window = 8;
    co.target = policy == "fullkv" ? 1.0 : 0.5;
    co.input = policy == "h2o"      ? client::CompressInputSource::kScores
               : policy == "fullkv" ? client::CompressInputSource::kNone
                                    : client::CompressInputSource::kWindowQueries;
    auto r = CompressPrefilled(*s.cache, id, *base, co);
    REQUIRE(r.ok());
    auto cont = s.engine->Forward(id, next, all);
    REQUIRE(cont.ok());
    REQUIRE(cont->logits.size() == full->logits.size());
    if (policy == "fullkv") {
      CHECK(cont->logits == full->logits);
      CHECK(r->honest_ratio == 1.0);
    } else {
      CHECK(r->honest_ratio < 0.75);
      CHECK(s.cache->rows(id, 0) < prompt.size() + next.size());
      // Still a language model: the continuation's logits stay close to FullKV's.
      const double distance = RelativeL1(cont->logits, full->logits);
      CHECK(distance > 0);
      CHECK(distance < 0.5);
    }
    // The new rows continue the positions after the whole prompt.
    CHECK(s.cache->positions(id) == prompt.size() + next.size());
    REQUIRE(s.cache->Free(id).ok());
  }
}

TEST_CASE("a background compression: decoding goes on, the tokens decoded meanwhile stay",
          "[service]") {
  Setup s(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512());
  const std::vector<uint32_t> prompt = Prompt(*s.loaded.tokenizer);
  const std::vector<uint32_t> next = {403, 407, 261, 378};
  ForwardOptions capture;
  capture.window_queries = 8;
  auto base = s.engine->Forward("p", prompt, capture);
  REQUIRE(base.ok());
  ForwardOptions all;
  all.all_logits = true;
  REQUIRE(s.cache->Fork("p", "full").ok());
  REQUIRE(s.cache->Fork("p", "bg").ok());
  client::CompressOptions co;
  co.policy.preset = "snapkv";
  co.policy.window = 8;
  co.target = 0.5;
  co.input = client::CompressInputSource::kWindowQueries;
  co.background = true;
  auto started = CompressPrefilled(*s.cache, "bg", *base, co);
  REQUIRE(started.ok());
  REQUIRE(started->pending);
  // Two tokens decoded on the whole prompt while the daemon works; the same two on "full".
  REQUIRE(s.engine->Forward("bg", {next.data(), 2}).ok());
  REQUIRE(s.engine->Forward("full", {next.data(), 2}).ok());
  std::optional<client::CompressResult> compressed = *started;
  REQUIRE(ApplyBackgroundCompress(*s.cache, "bg", /*wait=*/true, &compressed).ok());
  REQUIRE_FALSE(compressed->pending);
  CHECK(compressed->rows_appended == 2);
  CHECK(compressed->honest_ratio < 0.75);
  for (uint32_t l = 0; l < 5; ++l) {
    CHECK(s.cache->rows("bg", l) == compressed->layers[l].kept_per_head + 2);
  }
  auto cont = s.engine->Forward("bg", {next.data() + 2, 2}, all);
  REQUIRE(cont.ok());
  auto reference = s.engine->Forward("full", {next.data() + 2, 2}, all);
  REQUIRE(reference.ok());
  const double distance = RelativeL1(cont->logits, reference->logits);
  CHECK(distance > 0);
  CHECK(distance < 0.5);
  CHECK(s.cache->positions("bg") == prompt.size() + next.size());

  // GenerateGreedy with a background compression ends with the sequence compressed.
  GenerateOptions go;
  go.steps = 12;
  go.compress = co;
  auto out = GenerateGreedy(*s.engine, *s.cache, *s.loaded.tokenizer, "gen", prompt, go);
  REQUIRE(out.ok());
  CHECK(out->tokens.size() == 12);
  REQUIRE(out->compressed.has_value());
  CHECK_FALSE(out->compressed->pending);
  CHECK(out->compressed->rows_appended <= 12);
  auto info = s.cache->session().GetSequence("gen");
  REQUIRE(info.ok());
  CHECK(info->compressed);
  CHECK_FALSE(info->compress_pending);
}

TEST_CASE("a daemon restart mid-generation: the engine re-attaches, recomputes, same output",
          "[service]") {
  Setup s(testing::StoriesBin(), testing::Tok512());
  const Reference ref = ReadReference();
  const std::vector<uint32_t> prompt = Prompt(*s.loaded.tokenizer);
  client::CompressOptions snapkv;
  snapkv.policy.preset = "snapkv";
  snapkv.policy.window = 8;
  snapkv.target = 0.5;
  snapkv.input = client::CompressInputSource::kWindowQueries;
  for (const bool compressed : {false, true}) {
    INFO((compressed ? "snapkv" : "fullkv"));
    GenerateOptions go;
    go.steps = 80;
    go.stop_tokens = {1};
    if (compressed) go.compress = snapkv;
    const std::vector<uint32_t> start = compressed ? prompt : std::vector<uint32_t>{1};
    // Undisturbed, for comparison.
    auto calm = GenerateGreedy(*s.engine, *s.cache, *s.loaded.tokenizer, "calm", start, go);
    REQUIRE(calm.ok());
    CHECK(calm->sidecar_recoveries == 0);
    REQUIRE(s.cache->Free("calm").ok());
    // SIGKILL and restart the daemon after the 20th token.
    const uint64_t generation = s.cache->session().generation();
    go.on_step = [&](uint32_t step) {
      if (step != 20) return;
      REQUIRE(s.daemon->Terminate(SIGKILL).ok());
      REQUIRE(s.daemon->Restart().ok());
    };
    auto out = GenerateGreedy(*s.engine, *s.cache, *s.loaded.tokenizer, "stormy", start, go);
    REQUIRE(out.ok());
    CHECK(out->sidecar_recoveries == 1);
    CHECK(s.cache->session().generation() == generation + 1);
    CHECK(out->tokens == calm->tokens);
    CHECK(out->text == calm->text);
    if (!compressed) {
      CHECK(std::vector<uint32_t>(out->tokens.begin(), out->tokens.begin() + 60) == ref.first_ids);
    } else {
      REQUIRE(out->compressed.has_value());
      CHECK(out->compressed->honest_ratio == calm->compressed->honest_ratio);
    }
    // The new daemon holds the recomputed sequence: every row of the prompt and the tokens.
    auto info = s.cache->session().GetSequence("stormy");
    REQUIRE(info.ok());
    CHECK(info->num_positions == start.size() + out->tokens.size() - 1);
    REQUIRE(s.cache->Free("stormy").ok());
  }
  // Without recovery the failure is reported, not hidden.
  GenerateOptions strict;
  strict.steps = 40;
  strict.sidecar_recovery_timeout = absl::ZeroDuration();
  strict.on_step = [&](uint32_t step) {
    if (step == 10) REQUIRE(s.daemon->Terminate(SIGKILL).ok());
  };
  auto failed = GenerateGreedy(*s.engine, *s.cache, *s.loaded.tokenizer, "strict", {1}, strict);
  CHECK_FALSE(failed.ok());
}

}  // namespace
}  // namespace cachemgr::engine
