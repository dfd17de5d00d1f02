// cachemgr-eval: compression quality on a real model through a real cachemgrd. For every sample
// of a dataset: prefill once, measure FullKV, then every policy at every ratio on a fork of the
// prefilled sequence (tools/eval/evaluator.h). Prints a markdown table; writes trials.csv,
// summary.json, summary.md (and observations.json with --observations) to --out.
//
//   cachemgr-eval --socket=S --model=stories260K.bin --tokenizer=tok512.bin
//       --dataset=tinystories --samples=20 --policies=all --out=results/stories   (one line)
//
// The texts come from --data_dir (default: the excerpts in the source tree's testdata/text).
// Exit 0 on success (and on --help), 1 on failure, 2 on bad flags.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tools/engine/model_files.h"
#include "tools/eval/datasets.h"
#include "tools/eval/evaluator.h"
#include "tools/eval/observations.h"
#include "tools/eval/report.h"

namespace {

using namespace cachemgr;  // NOLINT

struct Flags {
  std::string socket, model, tokenizer, dataset = "tinystories", policies = "all", out;
  std::string ratios = "0.15,0.2,0.3,0.4,0.5,1.0", target = "reserve", dtype;
  std::string data_dir = CACHEMGR_DEFAULT_DATA_DIR;
  uint32_t samples = 8, min_prompt = 256, max_prompt = 448, continuation = 64, greedy = 64;
  uint32_t window = 32, threads = 0;  // 0: 1 for small models (dim < 256), else 2
  uint64_t seed = 1;
  bool observations = false;
};

constexpr char kUsage[] =
    "usage: cachemgr-eval --socket=PATH --model=FILE [--tokenizer=FILE]\n"
    "  [--dataset=tinystories|brown|multi_news|ruler] [--data_dir=DIR] [--samples=8] [--seed=1]\n"
    "  [--min_prompt=256] [--max_prompt=448] [--continuation=64] [--greedy=64]\n"
    "  [--policies=all|NAME,...] [--ratios=0.15,0.2,0.3,0.4,0.5,1.0]\n"
    "  [--target=reserve|bytes] [--window=32] [--dtype=fp32|bf16|fp16]\n"
    "  [--threads=N (0: 1 for small models, else 2)] [--out=DIR] [--observations]\n"
    "Compression quality of every policy on a real model through a running cachemgrd: prints a\n"
    "markdown table; --out=DIR also gets trials.csv, summary.json, summary.md (and\n"
    "observations.json with --observations).\n"
    "--data_dir holds tinystories/, brown/, longbench/ and ruler_4096/; the default is the\n"
    "repository's excerpts, " CACHEMGR_DEFAULT_DATA_DIR
    "\n"
    "(testdata/README.md says where the full texts come from).\n";

int Usage(const std::string& message) {
  std::fprintf(stderr, "cachemgr-eval: %s\n%s", message.c_str(), kUsage);
  return 2;
}

// "[#####.....] 12/140  ETA 1m20s  spindlekv@0.30 on tinystories-3" on a terminal; a line per
// sample otherwise.
class Progress {
 public:
  Progress(size_t total)
      : total_(total), start_(std::chrono::steady_clock::now()), tty_(isatty(2)) {}
  void Step(const std::string& what) {
    ++done_;
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double eta = done_ == 0 ? 0 : elapsed / done_ * (total_ - done_);
    const size_t width = 30, filled = total_ == 0 ? width : width * done_ / total_;
    const std::string bar = std::string(filled, '#') + std::string(width - filled, '.');
    const std::string line =
        absl::StrCat("[", bar, "] ", done_, "/", total_, "  ETA ", static_cast<int>(eta) / 60, "m",
                     static_cast<int>(eta) % 60, "s  ", what);
    if (tty_) {
      std::fprintf(stderr, "\r%-110.110s", line.c_str());
      if (done_ == total_) std::fprintf(stderr, "\n");
    } else if (what.rfind("fullkv-reference", 0) == 0 || done_ == total_) {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

 private:
  size_t total_, done_ = 0;
  std::chrono::steady_clock::time_point start_;
  bool tty_;
};

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--observations") {
      f.observations = true;
      continue;
    }
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) return Usage("bad flag " + arg);
    const std::string key = arg.substr(2, eq - 2), v = arg.substr(eq + 1);
    bool ok = true;
    if (key == "socket")
      f.socket = v;
    else if (key == "model")
      f.model = v;
    else if (key == "tokenizer")
      f.tokenizer = v;
    else if (key == "dataset")
      f.dataset = v;
    else if (key == "policies")
      f.policies = v;
    else if (key == "ratios")
      f.ratios = v;
    else if (key == "target")
      f.target = v;
    else if (key == "dtype")
      f.dtype = v;
    else if (key == "data_dir")
      f.data_dir = v;
    else if (key == "out")
      f.out = v;
    else if (key == "samples")
      ok = absl::SimpleAtoi(v, &f.samples);
    else if (key == "min_prompt")
      ok = absl::SimpleAtoi(v, &f.min_prompt);
    else if (key == "max_prompt")
      ok = absl::SimpleAtoi(v, &f.max_prompt);
    else if (key == "continuation")
      ok = absl::SimpleAtoi(v, &f.continuation);
    else if (key == "greedy")
      ok = absl::SimpleAtoi(v, &f.greedy);
    else if (key == "window")
      ok = absl::SimpleAtoi(v, &f.window) && f.window > 0;
    else if (key == "threads")
      ok = absl::SimpleAtoi(v, &f.threads) && f.threads > 0;
    else if (key == "seed")
      ok = absl::SimpleAtoi(v, &f.seed);
    else
      return Usage("unknown flag --" + key);
    if (!ok) return Usage("bad value for --" + key);
  }
  if (f.socket.empty() || f.model.empty()) return Usage("--socket and --model are required");
  if (f.target != "reserve" && f.target != "bytes") return Usage("--target: reserve or bytes");
  eval::EvalConfig config;
  config.window = f.window;
  config.greedy = f.greedy;
  config.target = f.target == "reserve" ? client::CompressTargetKind::kReserveRatio
                                        : client::CompressTargetKind::kByteRatio;
  for (absl::string_view r : absl::StrSplit(f.ratios, ',', absl::SkipEmpty())) {
    double x = 0;
    if (!absl::SimpleAtod(r, &x) || !(x > 0 && x <= 1)) {
      return Usage(absl::StrCat("--ratios: ", r, " is not in (0, 1]"));
    }
    config.ratios.push_back(x);
  }
  if (config.ratios.empty()) return Usage("--ratios is empty");
  auto variants = eval::SelectVariants(f.policies, f.window);
  if (!variants.ok()) return Usage(std::string(variants.status().message()));
  config.variants = *std::move(variants);

  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "cachemgr-eval: %s\n", std::string(s.message()).c_str());
    return 1;
  };
  auto loaded = engine::LoadModel(f.model, f.tokenizer);
  if (!loaded.ok()) return fail(loaded.status());
  const engine::LlamaConfig& c = loaded->checkpoint.config;

  eval::DatasetOptions d;
  d.data_dir = f.data_dir;
  d.samples = f.samples;
  d.seed = f.seed;
  d.min_prompt = f.min_prompt;
  d.max_prompt = f.max_prompt;
  d.continuation = f.continuation;
  absl::StatusOr<std::vector<eval::Sample>> samples;
  if (f.dataset == "tinystories")
    samples = eval::TinyStoriesSamples(*loaded->tokenizer, d);
  else if (f.dataset == "brown")
    samples = eval::BrownSamples(*loaded->tokenizer, d);
  else if (f.dataset == "multi_news")
    samples = eval::MultiNewsSamples(*loaded->tokenizer, d);
  else if (f.dataset == "ruler")
    samples = eval::RulerSamples(*loaded->tokenizer, d);
  else
    return Usage("--dataset: tinystories, brown, multi_news or ruler");
  if (absl::IsNotFound(samples.status()) || absl::IsOutOfRange(samples.status())) {
    // The texts are missing, or an excerpt is too short for these samples.
    return fail(absl::Status(
        samples.status().code(),
        absl::StrCat(samples.status().message(), " (texts from --data_dir=", f.data_dir,
                     "; testdata/README.md says where the full texts come from)")));
  }
  if (!samples.ok()) return fail(samples.status());
  // Teacher forcing and greedy decoding both start at the prompt's end (on separate forks).
  size_t longest = 0;
  for (const eval::Sample& s : *samples) {
    longest =
        std::max(longest, s.prompt.size() + std::max<size_t>(s.continuation.size(), f.greedy));
  }
  if (c.max_seq_len > 0 && longest > c.max_seq_len) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
        "samples need up to ", longest, " positions but ", loaded->name, " was trained for ",
        c.max_seq_len, ": lower --max_prompt, --continuation or --greedy")));
  }

  engine::SidecarOptions so;
  so.socket_path = f.socket;
  so.client_name = "cachemgr-eval";
  so.model_name = loaded->name;
  so.dtype = f.dtype.empty()
                 ? (absl::EndsWith(f.model, ".gguf") && c.dim > 256 ? client::DType::kBf16
                                                                    : client::DType::kFp32)
             : f.dtype == "bf16" ? client::DType::kBf16
             : f.dtype == "fp16" ? client::DType::kFp16
                                 : client::DType::kFp32;
  // The prompt, a compressed fork of it in fresh blocks, and both forks' appended tokens.
  so.num_blocks = static_cast<uint32_t>((3 * longest + 15) / 16 + 64);
  so.input_buffer_bytes =
      std::max<uint64_t>(uint64_t{c.num_layers} * f.window * c.num_heads * c.head_dim() * 4,
                         uint64_t{c.num_layers} * c.num_heads * (longest + 1) * 4);
  auto cache = engine::SidecarCache::Attach(so, c);
  if (!cache.ok()) return fail(cache.status());
  // Threads pay off only when a layer's matmuls outweigh waking them (not for stories260K).
  engine::ThreadPool pool(f.threads > 0 ? f.threads : (c.dim < 256 ? 1 : 2));
  engine::LlamaEngine llama(loaded->checkpoint, cache->get(), &pool);

  eval::Observations observations;
  std::vector<eval::TrialResult> trials;
  Progress progress(samples->size() * eval::TrialsPerSample(config));
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < samples->size(); ++i) {
    const eval::Sample& s = (*samples)[i];
    auto results = eval::RunSample(
        llama, **cache, *loaded->tokenizer, s, config,
        [&](size_t, size_t, const eval::TrialResult& r) {
          progress.Step(
              absl::StrCat(r.policy, "@", r.target, " on ", s.name, r.ok ? "" : " (failed)"));
        },
        f.observations ? &observations : nullptr, f.seed + i);
    if (!results.ok()) return fail(results.status());
    trials.insert(trials.end(), results->begin(), results->end());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::vector<eval::Summary> summary = eval::Summarize(trials);
  const bool retrieval = f.dataset == "ruler";
  const std::string table = eval::SummaryTable(summary, retrieval);
  std::printf("%s (%s, %zu samples, %s ratios, %.0f s)\n\n%s", loaded->name.c_str(),
              f.dataset.c_str(), samples->size(), f.target.c_str(), seconds, table.c_str());
  if (!f.out.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(f.out, ec);
    eval::RunInfo info{loaded->name,
                       f.dataset,
                       static_cast<uint32_t>(samples->size()),
                       f.target == "reserve" ? "reserve_ratio" : "byte_ratio",
                       f.window,
                       f.greedy,
                       f.continuation,
                       f.seed,
                       seconds};
    for (absl::Status s : {eval::WriteTrialsCsv(f.out + "/trials.csv", trials),
                           eval::WriteSummaryJson(f.out + "/summary.json", info, summary)}) {
      if (!s.ok()) return fail(s);
    }
    std::ofstream(f.out + "/summary.md") << table;
    if (f.observations) std::ofstream(f.out + "/observations.json") << observations.Json();
  }
  return 0;
}
