// The evaluation on the real stories260K and a real cachemgrd, small enough for CI: one policy,
// two ratios, a few stories. What must hold whatever the quality numbers are: at ratio 1 the
// compressed cache gives FullKV's NLL exactly and the same greedy tokens, and the bytes held
// shrink as the ratio falls. Also the cachemgr-eval command end to end (table and files).
#include <catch2/catch.hpp>
#include <fstream>
#include <sstream>

#include "tests/support/daemon_process.h"
#include "tests/support/temp_dir.h"
#include "tests/support/testdata.h"
#include "tools/engine/model_files.h"
#include "tools/eval/evaluator.h"
#include "tools/eval/observations.h"
#include "tools/eval/report.h"

namespace cachemgr::eval {
namespace {

TEST_CASE("a small evaluation: ratio 1 equals FullKV, bytes shrink with the ratio", "[service]") {
  auto daemon = cachemgr::testing::DaemonProcess::Start();
  REQUIRE(daemon.ok());
  auto model = engine::LoadModel(cachemgr::testing::StoriesBin(), cachemgr::testing::Tok512());
  REQUIRE(model.ok());
  engine::SidecarOptions so;
  so.socket_path = (*daemon)->socket_path();
  so.model_name = "stories";
  so.num_blocks = 256;
  auto cache = engine::SidecarCache::Attach(so, model->checkpoint.config);
  REQUIRE(cache.ok());
  engine::ThreadPool pool(2);
  engine::LlamaEngine llama(model->checkpoint, cache->get(), &pool);

  DatasetOptions d;
  d.data_dir = cachemgr::testing::TextDir();
  d.samples = 3;
  d.continuation = 32;
  auto samples = TinyStoriesSamples(*model->tokenizer, d);
  REQUIRE(samples.ok());
  REQUIRE(samples->size() == 3);
  for (const Sample& s : *samples) {
    CHECK(s.prompt.size() >= 256);
    CHECK(s.prompt.size() <= 448);
    CHECK(s.prompt[0] == 1);  // BOS
    CHECK(s.continuation.size() == 32);
  }

  EvalConfig config;
  config.variants = *SelectVariants("snapkv", 32);
  config.ratios = {0.3, 1.0};
  config.greedy = 16;
  std::vector<TrialResult> all;
  size_t callbacks = 0;
  for (const Sample& s : *samples) {
    auto r = RunSample(llama, **cache, *model->tokenizer, s, config,
                       [&](size_t, size_t, const TrialResult&) { ++callbacks; });
    REQUIRE(r.ok());
    REQUIRE(r->size() == TrialsPerSample(config));
    const TrialResult& ref = (*r)[0];
    const TrialResult& low = (*r)[1];
    const TrialResult& full = (*r)[2];
    CHECK(ref.policy == "fullkv-reference");
    CHECK(ref.nll_tokens == 31);
    CHECK(ref.nll > 0);
    REQUIRE(low.ok);
    REQUIRE(full.ok);
    CHECK(full.target == 1.0);
    CHECK(full.nll == ref.nll);  // exactly: ratio 1 keeps every row, bit for bit
    CHECK(full.greedy_tokens == ref.greedy_tokens);
    CHECK(full.greedy_agreement == 1.0);
    CHECK(full.honest_ratio == 1.0);
    CHECK(low.honest_ratio == Approx(0.3).epsilon(0.05));
    CHECK(low.block_ratio < full.block_ratio);
    CHECK(low.nll != ref.nll);  // eviction changed what the model saw
    all.insert(all.end(), r->begin(), r->end());
  }
  CHECK(callbacks == 3 * TrialsPerSample(config));

  // The paper's observations on one prefilled prompt: shares fall as the threshold rises, the
  // window's attention is concentrated (90% of it on fewer than all tokens).
  engine::ForwardOptions window;
  window.window_queries = 32;
  auto prefill = llama.Forward("observed", (*samples)[0].prompt, window);
  REQUIRE(prefill.ok());
  Observations observations;
  REQUIRE(observations.Add(**cache, "observed", *prefill, 7).ok());
  REQUIRE((*cache)->Free("observed").ok());
  CHECK(observations.sequences() == 1);
  const std::vector<LayerObservation> layers = observations.Layers();
  REQUIRE(layers.size() == 5);
  for (const LayerObservation& l : layers) {
    for (size_t t = 0; t + 1 < observations.thresholds().size(); ++t) {
      CHECK(l.key_similar[t] >= l.key_similar[t + 1]);
      CHECK(l.value_similar[t] >= l.value_similar[t + 1]);
    }
    CHECK(l.key_similar[0] <= 1.0);
    CHECK(l.mass90_share > 0.0);
    CHECK(l.mass90_share < 1.0);
    CHECK(l.top10_mass >= 0.1);
    CHECK(l.top10_mass <= 1.0);
  }
  // Every sequence the evaluation made is gone.
  auto left = (*cache)->session().ListSequences();
  REQUIRE(left.ok());
  CHECK(left->empty());

  const std::vector<Summary> summary = Summarize(all);
  REQUIRE(summary.size() == 3);
  CHECK(summary[0].policy == "fullkv-reference");
  CHECK(summary[2].delta_nll == 0.0);
  CHECK(summary[2].ppl_ratio == 1.0);
  CHECK(summary[1].honest_ratio < summary[2].honest_ratio);
  const std::string table = SummaryTable(summary, false);
  CHECK(table.find("| snapkv | 0.30 |") != std::string::npos);
}

TEST_CASE("cachemgr-eval writes its table, CSV and JSON", "[service]") {
  auto daemon = cachemgr::testing::DaemonProcess::Start();
  REQUIRE(daemon.ok());
  cachemgr::testing::TempDir out;
  auto child = cachemgr::testing::ChildProcess::Spawn(
      CACHEMGR_EVAL_PATH,
      {"--socket=" + (*daemon)->socket_path(), "--model=" + cachemgr::testing::StoriesBin(),
       "--tokenizer=" + cachemgr::testing::Tok512(), "--samples=2",
       "--policies=streamingllm,codebook", "--ratios=0.2,1.0", "--greedy=8", "--continuation=16",
       "--observations", "--out=" + out.path()});
  REQUIRE(child.ok());
  std::string stdout_text;
  while (true) {
    auto line = (*child)->ReadLine(absl::Seconds(120));
    if (!line.ok()) break;
    stdout_text += *line + "\n";
  }
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  CHECK(*code == 0);
  CHECK(stdout_text.find("| streamingllm | 0.20 |") != std::string::npos);
  CHECK(stdout_text.find("| codebook | 1.00 |") != std::string::npos);
  std::ifstream csv(out.file("trials.csv"));
  std::string header, row;
  std::getline(csv, header);
  CHECK(header.rfind("sample,policy,target,ok,nll", 0) == 0);
  size_t rows = 0;
  while (std::getline(csv, row)) ++rows;
  CHECK(rows == 2 * (1 + 2 + 1));  // per sample: reference, streamingllm x2, codebook once
  std::stringstream json;
  json << std::ifstream(out.file("summary.json")).rdbuf();
  CHECK(json.str().find("\"policy\": \"codebook\"") != std::string::npos);
  CHECK(json.str().find("\"honest_ratio\"") != std::string::npos);
  std::stringstream obs;
  obs << std::ifstream(out.file("observations.json")).rdbuf();
  CHECK(obs.str().find("\"key_similar\"") != std::string::npos);
  CHECK(obs.str().find("\"sequences\": 2") != std::string::npos);
  // Bad flags: exit 2 with the flag named.
  auto bad = cachemgr::testing::ChildProcess::Spawn(CACHEMGR_EVAL_PATH,
                                                    {"--socket=x", "--model=y", "--policies=nope"});
  REQUIRE(bad.ok());
  auto bad_code = (*bad)->Wait(absl::Seconds(30));
  REQUIRE(bad_code.ok());
  CHECK(*bad_code == 2);
}

// Runs cachemgr-eval with `args` through a shell, returning stdout and stderr together and the
// exit code.
std::pair<std::string, int> RunEval(const std::string& args) {
  auto child = cachemgr::testing::ChildProcess::Spawn(
      "/bin/sh", {"-c", std::string(CACHEMGR_EVAL_PATH) + " " + args + " 2>&1"});
  REQUIRE(child.ok());
  std::string text;
  while (true) {
    auto line = (*child)->ReadLine(absl::Seconds(120));
    if (!line.ok()) break;
    text += *line + "\n";
  }
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  return {text, *code};
}

TEST_CASE("cachemgr-eval names --data_dir when its texts are missing or too short", "[cpu]") {
  cachemgr::testing::TempDir empty;
  const std::string model = "--socket=unused --model=" + cachemgr::testing::StoriesBin() +
                            " --tokenizer=" + cachemgr::testing::Tok512();
  auto [missing, missing_code] = RunEval(model + " --data_dir=" + empty.path());
  CHECK(missing_code == 1);
  CHECK(missing.find("cannot read " + empty.path() + "/tinystories/tiny_stories_train_head.txt") !=
        std::string::npos);
  CHECK(missing.find("--data_dir=" + empty.path()) != std::string::npos);
  CHECK(missing.find("testdata/README.md") != std::string::npos);
  // The default is the repository's excerpt: enough for the documented runs, not for 500 samples.
  auto [short_text, short_code] = RunEval(model + " --samples=500");
  CHECK(short_code == 1);
  CHECK(short_text.find("TinyStories ran out") != std::string::npos);
  CHECK(short_text.find("--data_dir=" + cachemgr::testing::TextDir()) != std::string::npos);
}

}  // namespace
}  // namespace cachemgr::eval
