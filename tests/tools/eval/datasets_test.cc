// The evaluation texts: the repository's excerpts (testdata/text) give every dataset's samples,
// including the 20 TinyStories prompts of docs/QUALITY.md's stories260K runs, and a missing or
// too short text is a precise error.
#include "tools/eval/datasets.h"

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.h"
#include "tests/support/testdata.h"
#include "tools/engine/model_files.h"

namespace cachemgr::eval {
namespace {

engine::LoadedModel Stories() {
  auto model = engine::LoadModel(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512());
  REQUIRE(model.ok());
  return *std::move(model);
}

TEST_CASE("the TinyStories excerpt holds docs/QUALITY.md's 20 samples, and no more", "[cpu]") {
  const engine::LoadedModel model = Stories();
  DatasetOptions d;
  d.data_dir = cachemgr::testing::TextDir();
  d.samples = 20;  // seed 1, 256-448 prompt tokens, 64 continuation tokens: the documented run
  auto samples = TinyStoriesSamples(*model.tokenizer, d);
  REQUIRE(samples.ok());
  REQUIRE(samples->size() == 20);
  for (const Sample& s : *samples) {
    CHECK(s.prompt.size() >= 256);
    CHECK(s.prompt.size() <= 448);
    CHECK(s.prompt[0] == model.tokenizer->bos_id());
    CHECK(s.continuation.size() == 64);
  }
  d.samples = 100;
  auto more = TinyStoriesSamples(*model.tokenizer, d);
  CHECK(more.status().code() == absl::StatusCode::kOutOfRange);
  CHECK(more.status().message().find("TinyStories ran out") != absl::string_view::npos);
}

TEST_CASE("Brown, multi_news and RULER excerpts each give samples", "[cpu]") {
  const engine::LoadedModel model = Stories();
  DatasetOptions d;
  d.data_dir = cachemgr::testing::TextDir();
  d.samples = 1;
  auto brown = BrownSamples(*model.tokenizer, d);
  REQUIRE(brown.ok());
  CHECK(brown->at(0).continuation.size() == 64);
  d.max_prompt = 16384;  // the long documents are for long-context models
  auto news = MultiNewsSamples(*model.tokenizer, d);
  REQUIRE(news.ok());
  CHECK(news->at(0).name.rfind("multi_news-", 0) == 0);
  auto ruler = RulerSamples(*model.tokenizer, d);
  REQUIRE(ruler.ok());
  CHECK(ruler->at(0).answer.size() == 36);  // a uuid
  CHECK(!ruler->at(0).continuation.empty());
}

TEST_CASE("a data directory without the texts is NOT_FOUND naming the file", "[cpu]") {
  const engine::LoadedModel model = Stories();
  cachemgr::testing::TempDir empty;
  DatasetOptions d;
  d.data_dir = empty.path();
  d.samples = 1;
  auto stories = TinyStoriesSamples(*model.tokenizer, d);
  CHECK(stories.status().code() == absl::StatusCode::kNotFound);
  CHECK(stories.status().message() ==
        "cannot read " + empty.path() + "/tinystories/tiny_stories_train_head.txt");
  CHECK(BrownSamples(*model.tokenizer, d).status().code() == absl::StatusCode::kNotFound);
  CHECK(MultiNewsSamples(*model.tokenizer, d).status().code() == absl::StatusCode::kNotFound);
  CHECK(RulerSamples(*model.tokenizer, d).status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace cachemgr::eval
