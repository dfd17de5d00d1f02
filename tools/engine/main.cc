// cachemgr-engine: a small Llama engine whose KV cache lives in cachemgrd.
//
//   cachemgr-engine --socket=S --model=stories260K.bin --tokenizer=tok512.bin [--prompt=TEXT]
//                   [--steps=256] [--policy=spindlekv --reserve_ratio=0.3 | --byte_ratio=0.3]
//   cachemgr-engine --tokenize --model=FILE [--tokenizer=FILE] --text_file=F [--special]
//
// Prefills the prompt (BOS alone when empty), optionally compresses it through the daemon, then
// decodes greedily and prints the text. --tokenize prints the ids of F's text as a JSON array
// (no BOS; --special parses spelled-out control tokens) and needs no daemon. Exit 0 on success
// (and on --help), 1 on failure, 2 on bad flags.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "tools/engine/generate.h"
#include "tools/engine/model_files.h"

namespace {

using cachemgr::engine::GenerateGreedy;

constexpr char kUsage[] =
    "usage: cachemgr-engine --socket=PATH --model=FILE [--tokenizer=FILE] [--prompt=TEXT]\n"
    "         [--steps=256] [--threads=2] [--dtype=fp32|fp16|bf16]\n"
    "         [--rope=interleaved|half_split] [--window=32]\n"
    "         [--policy=NAME (--reserve_ratio=R | --byte_ratio=R)]\n"
    "       cachemgr-engine --tokenize --model=FILE [--tokenizer=FILE] --text_file=FILE\n"
    "         [--special]\n"
    "A Llama engine whose KV cache lives in a running cachemgrd: prefills the prompt (BOS alone\n"
    "when empty), optionally compresses it with --policy, decodes greedily and prints the text.\n"
    "--model is a Llama-architecture GGUF or a llama2.c checkpoint (which needs --tokenizer).\n"
    "--tokenize prints the ids of the file's text as a JSON array (no BOS; --special parses\n"
    "spelled-out control tokens) and needs no daemon.\n";

int Usage(const char* message) {
  std::fprintf(stderr, "cachemgr-engine: %s\n%s", message, kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket, model, tokenizer, prompt, policy, dtype = "fp32", rope = "interleaved";
  std::string text_file;
  bool tokenize = false, special = false;
  uint32_t steps = 256, threads = 2, window = 32;
  double reserve = 0, bytes = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--tokenize" || arg == "--special") {
      (arg == "--tokenize" ? tokenize : special) = true;
      continue;
    }
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos)
      return Usage(("bad flag " + arg).c_str());
    const std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
    bool ok = true;
    if (key == "socket")
      socket = value;
    else if (key == "model")
      model = value;
    else if (key == "tokenizer")
      tokenizer = value;
    else if (key == "prompt")
      prompt = value;
    else if (key == "policy")
      policy = value;
    else if (key == "dtype")
      dtype = value;
    else if (key == "rope")
      rope = value;
    else if (key == "text_file")
      text_file = value;
    else if (key == "steps")
      ok = absl::SimpleAtoi(value, &steps);
    else if (key == "threads")
      ok = absl::SimpleAtoi(value, &threads) && threads > 0;
    else if (key == "window")
      ok = absl::SimpleAtoi(value, &window) && window > 0;
    else if (key == "reserve_ratio")
      ok = absl::SimpleAtod(value, &reserve);
    else if (key == "byte_ratio")
      ok = absl::SimpleAtod(value, &bytes);
    else
      return Usage(("unknown flag --" + key).c_str());
    if (!ok) return Usage(("bad value for --" + key).c_str());
  }
  if (tokenize) {
    if (model.empty() || text_file.empty())
      return Usage("--tokenize needs --model and --text_file");
    auto loaded = cachemgr::engine::LoadModel(model, tokenizer);
    std::ifstream in(text_file, std::ios::binary);
    if (!loaded.ok() || !in) {
      std::fprintf(stderr, "cachemgr-engine: %s\n",
                   loaded.ok() ? ("cannot read " + text_file).c_str()
                               : std::string(loaded.status().message()).c_str());
      return 1;
    }
    std::stringstream text;
    text << in.rdbuf();
    const std::vector<uint32_t> ids = loaded->tokenizer->Encode(text.str(), false, special);
    std::printf("[");
    for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%u", i ? ", " : "", ids[i]);
    std::printf("]\n");
    return 0;
  }
  if (socket.empty() || model.empty()) return Usage("--socket and --model are required");
  if (rope != "interleaved" && rope != "half_split")
    return Usage("--rope: interleaved or half_split");
  cachemgr::client::DType pool_dtype;
  if (dtype == "fp32")
    pool_dtype = cachemgr::client::DType::kFp32;
  else if (dtype == "fp16")
    pool_dtype = cachemgr::client::DType::kFp16;
  else if (dtype == "bf16")
    pool_dtype = cachemgr::client::DType::kBf16;
  else
    return Usage("--dtype: fp32, fp16 or bf16");
  if (!policy.empty() && (reserve > 0) == (bytes > 0)) {
    return Usage("--policy needs exactly one of --reserve_ratio and --byte_ratio");
  }

  auto loaded = cachemgr::engine::LoadModel(model, tokenizer, rope == "half_split");
  if (!loaded.ok()) {
    std::fprintf(stderr, "cachemgr-engine: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  cachemgr::engine::SidecarOptions so;
  so.socket_path = socket;
  so.model_name = loaded->name + (rope == "half_split" ? "-halfsplit" : "");
  so.dtype = pool_dtype;
  auto cache = cachemgr::engine::SidecarCache::Attach(so, loaded->checkpoint.config);
  if (!cache.ok()) {
    std::fprintf(stderr, "cachemgr-engine: attach: %s\n",
                 std::string(cache.status().message()).c_str());
    return 1;
  }
  cachemgr::engine::ThreadPool pool(threads);
  cachemgr::engine::LlamaEngine engine(loaded->checkpoint, cache->get(), &pool);
  std::vector<uint32_t> ids = loaded->tokenizer->Encode(prompt, /*add_bos=*/true);
  if (ids.empty()) ids.push_back(loaded->tokenizer->bos_id());
  cachemgr::engine::GenerateOptions go;
  go.steps = steps;
  go.stop_tokens = {loaded->tokenizer->bos_id(), loaded->tokenizer->eos_id()};
  if (!policy.empty()) {
    cachemgr::client::CompressOptions co;
    co.policy.preset = policy;
    co.policy.window = window;
    co.target_kind = reserve > 0 ? cachemgr::client::CompressTargetKind::kReserveRatio
                                 : cachemgr::client::CompressTargetKind::kByteRatio;
    co.target = reserve > 0 ? reserve : bytes;
    co.input = policy == "h2o" ? cachemgr::client::CompressInputSource::kScores
               : policy == "fullkv" || policy == "streamingllm" || policy == "codebook"
                   ? cachemgr::client::CompressInputSource::kNone
                   : cachemgr::client::CompressInputSource::kWindowQueries;
    go.compress = co;
  }
  auto out = GenerateGreedy(engine, **cache, *loaded->tokenizer, "generate", ids, go);
  if (!out.ok()) {
    std::fprintf(stderr, "cachemgr-engine: %s\n", std::string(out.status().message()).c_str());
    return 1;
  }
  if (out->compressed.has_value()) {
    std::fprintf(stderr, "compressed with %s: honest byte ratio %.4f (%llu -> %llu bytes)\n",
                 policy.c_str(), out->compressed->honest_ratio,
                 static_cast<unsigned long long>(out->compressed->bytes_before),
                 static_cast<unsigned long long>(out->compressed->bytes_after));
  }
  if (out->sidecar_recoveries > 0) {
    std::fprintf(stderr, "cachemgrd failed %u time(s) during generation; the KV was recomputed\n",
                 out->sidecar_recoveries);
  }
  std::printf("%s%s\n", prompt.c_str(), out->text.c_str());
  (void)(*cache)->Free("generate");
  return 0;
}
