#include <catch2/catch.hpp>
#include <string>

#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {
namespace {

PolicyConfig Preset(const std::string& name) {
  absl::StatusOr<PolicyConfig> policy = PresetPolicy(name);
  REQUIRE(policy.ok());
  return *policy;
}

TEST_CASE("every preset is known, named and valid", "[cpu]") {
  const std::vector<std::string> names = PresetNames();
  CHECK(names == std::vector<std::string>{"fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv",
                                          "pyramidinfer", "zigzagkv", "codebook", "spindlekv"});
  for (const std::string& name : names) {
    INFO(name);
    const PolicyConfig policy = Preset(name);
    CHECK(policy.name == name);
    CHECK(ValidatePolicy(policy).ok());
  }
  absl::StatusOr<PolicyConfig> unknown = PresetPolicy("quantkv");
  CHECK(unknown.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(unknown.status().message()).find("spindlekv") != std::string::npos);
}

TEST_CASE("preset stages", "[cpu]") {
  const PolicyConfig spindle = Preset("spindlekv");
  CHECK(spindle.schedule == BudgetSchedule::kPyramid);
  CHECK(spindle.beta == 0.05);
  CHECK(spindle.scoring == Scoring::kWindow);
  CHECK(spindle.window == 32);
  CHECK(spindle.normalization == WindowNormalization::kSum);
  CHECK(spindle.pooling == Pooling::kAvg);
  CHECK(spindle.pool_kernel == 5);
  CHECK(spindle.gqa == GqaMode::kRepeat);
  CHECK(spindle.codebook);
  CHECK(spindle.theta_k == 0.98f);
  CHECK(spindle.theta_v == 0.95f);
  CHECK(spindle.codebook_scope == CodebookScope::kLayer);
  CHECK(spindle.codebook_search == CodebookSearch::kLsh);
  CHECK(Preset("codebook").codebook_search == CodebookSearch::kLsh);

  const PolicyConfig full = Preset("fullkv");
  CHECK(full.schedule == BudgetSchedule::kFull);
  CHECK(!full.codebook);

  const PolicyConfig streaming = Preset("streamingllm");
  CHECK(streaming.scoring == Scoring::kSinksRecent);
  CHECK(streaming.sinks == 4);
  CHECK(streaming.schedule == BudgetSchedule::kUniform);
  CHECK(!streaming.codebook);

  const PolicyConfig h2o = Preset("h2o");
  CHECK(h2o.scoring == Scoring::kAccumulated);
  CHECK(h2o.schedule == BudgetSchedule::kUniform);
  CHECK(h2o.pooling == Pooling::kNone);
  CHECK(!h2o.codebook);

  const PolicyConfig snap = Preset("snapkv");
  CHECK(snap.schedule == BudgetSchedule::kUniform);
  CHECK(snap.scoring == Scoring::kWindow);
  CHECK(snap.window == 32);
  CHECK(snap.normalization == WindowNormalization::kSum);
  CHECK(snap.pooling == Pooling::kAvg);
  CHECK(snap.pool_kernel == 5);
  CHECK(snap.gqa == GqaMode::kRepeat);
  CHECK(!snap.codebook);

  const PolicyConfig pyramid = Preset("pyramidkv");
  CHECK(pyramid.schedule == BudgetSchedule::kPyramid);
  CHECK(pyramid.pooling == Pooling::kAvg);
  CHECK(pyramid.gqa == GqaMode::kRepeat);
  CHECK(!pyramid.codebook);

  const PolicyConfig infer = Preset("pyramidinfer");
  CHECK(infer.schedule == BudgetSchedule::kPyramid);
  CHECK(infer.gqa == GqaMode::kGroupMean);
  CHECK(infer.normalization == WindowNormalization::kLiteral);
  CHECK(!infer.codebook);

  const PolicyConfig zigzag = Preset("zigzagkv");
  CHECK(zigzag.schedule == BudgetSchedule::kZigZag);
  CHECK(zigzag.zigzag_tau == 0.9);
  CHECK(zigzag.zigzag_min_fraction == 0.2);
  CHECK(!zigzag.codebook);

  const PolicyConfig codebook = Preset("codebook");
  CHECK(codebook.schedule == BudgetSchedule::kFull);
  CHECK(codebook.codebook);
  CHECK(codebook.theta_k == 0.98f);
  CHECK(codebook.theta_v == 0.95f);
}

std::string Error(const PolicyConfig& policy) {
  const absl::Status status = ValidatePolicy(policy);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  return std::string(status.message());
}

TEST_CASE("policy validation names the field", "[cpu]") {
  PolicyConfig policy = Preset("spindlekv");
  policy.theta_k = 1.5f;
  CHECK(Error(policy) == "policy.theta_k must be in (0, 1] (got 1.5)");
  policy = Preset("spindlekv");
  policy.theta_v = 0.0f;
  CHECK(Error(policy).rfind("policy.theta_v must be in (0, 1]", 0) == 0);
  policy = Preset("spindlekv");
  policy.pool_kernel = 4;
  CHECK(Error(policy).rfind("policy.pool_kernel", 0) == 0);
  policy.pool_kernel = 0;
  CHECK(Error(policy).rfind("policy.pool_kernel", 0) == 0);
  policy = Preset("snapkv");
  policy.window = 0;
  CHECK(Error(policy).rfind("policy.window", 0) == 0);
  policy = Preset("spindlekv");
  policy.beta = 1.0;
  CHECK(Error(policy).rfind("policy.beta", 0) == 0);
  policy = Preset("zigzagkv");
  policy.zigzag_tau = 0.0;
  CHECK(Error(policy).rfind("policy.zigzag_tau", 0) == 0);
  policy = Preset("zigzagkv");
  policy.zigzag_min_fraction = 1.5;
  CHECK(Error(policy).rfind("policy.zigzag_min_fraction", 0) == 0);
  policy = Preset("zigzagkv");
  policy.scoring = Scoring::kSinksRecent;
  CHECK(Error(policy).rfind("policy.schedule", 0) == 0);
  policy = Preset("spindlekv");
  policy.gqa = static_cast<GqaMode>(7);
  CHECK(Error(policy).rfind("policy.gqa", 0) == 0);
  policy = Preset("spindlekv");
  policy.codebook_search = static_cast<CodebookSearch>(9);
  CHECK(Error(policy).rfind("policy.codebook_search", 0) == 0);

  // Window 0 is fine where nothing is scored over a window.
  policy = Preset("h2o");
  policy.window = 0;
  CHECK(ValidatePolicy(policy).ok());
  policy = Preset("streamingllm");
  policy.window = 0;
  CHECK(ValidatePolicy(policy).ok());
}

}  // namespace
}  // namespace cachemgr::compress
