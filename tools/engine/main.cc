// cachemgr-engine: a small Llama engine whose KV cache lives in cachemgrd.
//
//   cachemgr-engine --socket=S --model=stories260K.bin --tokenizer=tok512.bin [--prompt=TEXT]
//                   [--steps=256] [--policy=spindlekv --reserve_ratio=0.3 | --byte_ratio=0.3]
//                   [--background_compress]
//   cachemgr-engine --tokenize --model=FILE [--tokenizer=FILE] --text_file=F [--special]
//   cachemgr-engine ... --prefill_only --sequence=ID [--transfer_to=PEER
//                   --transfer_token_file=F --transfer_id=ID]
//   cachemgr-engine ... --decode_from=ID --token_file=F --first_token_file=F
//
// Prefill/decode disaggregation (docs/MULTINODE.md): --prefill_only prefills (and compresses)
// the prompt as sequence ID, prints {"first_token":T,...} and, with --transfer_to, parks its
// codebook layers and moves it to the session whose token is in --transfer_token_file on that
// peer of its daemon. --decode_from writes its session token to --token_file, waits for the
// sequence to arrive and for the first token in --first_token_file, then decodes it (the same
// --prompt names the last prompt token and prefixes the printed text).
//
// Prefills the prompt (BOS alone when empty), optionally compresses it through the daemon, then
// decodes greedily and prints the text. --background_compress decodes on while the daemon
// compresses (applied at the first step after it finished). --tokenize prints the ids of F's text
// as a JSON array (no BOS; --special parses spelled-out control tokens) and needs no daemon. Exit 0
// on success (and on --help), 1 on failure, 2 on bad flags.
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "tools/engine/generate.h"
#include "tools/engine/model_files.h"

namespace {

using cachemgr::engine::GenerateGreedy;

constexpr char kUsage[] =
    "usage: cachemgr-engine --socket=PATH --model=FILE [--tokenizer=FILE] [--prompt=TEXT]\n"
    "         [--steps=256] [--threads=2] [--dtype=fp32|fp16|bf16]\n"
    "         [--rope=interleaved|half_split] [--window=32]\n"
    "         [--policy=NAME (--reserve_ratio=R | --byte_ratio=R)] [--background_compress]\n"
    "         [--tensor_parallel=1]\n"
    "       cachemgr-engine --tokenize --model=FILE [--tokenizer=FILE] --text_file=FILE\n"
    "         [--special]\n"
    "A Llama engine whose KV cache lives in a running cachemgrd: prefills the prompt (BOS alone\n"
    "when empty), optionally compresses it with --policy, decodes greedily and prints the text.\n"
    "--background_compress decodes on while the daemon compresses; the compression is applied\n"
    "at the first step after it finished (the tokens decoded meanwhile kept).\n"
    "--model is a Llama-architecture GGUF or a llama2.c checkpoint (which needs --tokenizer).\n"
    "--tokenize prints the ids of the file's text as a JSON array (no BOS; --special parses\n"
    "spelled-out control tokens) and needs no daemon.\n"
    "Prefill/decode on two daemons: --prefill_only --sequence=ID [--transfer_to=PEER\n"
    "--transfer_token_file=F --transfer_id=ID]; --decode_from=ID --token_file=F\n"
    "--first_token_file=F [--wait_ms=60000].\n"
    "--tensor_parallel=N attaches N sessions as the ranks of one group, each holding its share\n"
    "of the KV heads (N divides the model's heads).\n";

int Usage(const char* message) {
  std::fprintf(stderr, "cachemgr-engine: %s\n%s", message, kUsage);
  return 2;
}

int Fail(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "cachemgr-engine: %s: %s\n", what.c_str(),
               std::string(status.message()).c_str());
  return 1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return std::string(absl::StripAsciiWhitespace(text.str()));
}

// Writes `text` to `path` whole (a temporary file renamed over it), readable by the owner only.
bool WriteSecretFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return false;
    ::chmod(tmp.c_str(), 0600);
    out << text << "\n";
    if (!out) return false;
  }
  std::error_code error;
  std::filesystem::rename(tmp, path, error);
  return !error;
}

// Polls `ready` every 20 ms until it returns true or `wait` passes.
template <typename Ready>
bool WaitFor(absl::Duration wait, Ready ready) {
  const absl::Time deadline = absl::Now() + wait;
  while (!ready()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket, model, tokenizer, prompt, policy, dtype = "fp32", rope = "interleaved";
  std::string text_file;
  bool tokenize = false, special = false, prefill_only = false, background_compress = false;
  std::string sequence = "generate", transfer_to, transfer_token_file, transfer_id;
  std::string decode_from, token_file, first_token_file;
  uint32_t steps = 256, threads = 2, window = 32, wait_ms = 60000, tensor_parallel = 1;
  double reserve = 0, bytes = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--tokenize" || arg == "--special" || arg == "--prefill_only" ||
        arg == "--background_compress") {
      (arg == "--tokenize"       ? tokenize
       : arg == "--special"      ? special
       : arg == "--prefill_only" ? prefill_only
                                 : background_compress) = true;
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
    else if (key == "sequence")
      sequence = value;
    else if (key == "transfer_to")
      transfer_to = value;
    else if (key == "transfer_token_file")
      transfer_token_file = value;
    else if (key == "transfer_id")
      transfer_id = value;
    else if (key == "decode_from")
      decode_from = value;
    else if (key == "token_file")
      token_file = value;
    else if (key == "first_token_file")
      first_token_file = value;
    else if (key == "wait_ms")
      ok = absl::SimpleAtoi(value, &wait_ms);
    else if (key == "steps")
      ok = absl::SimpleAtoi(value, &steps);
    else if (key == "threads")
      ok = absl::SimpleAtoi(value, &threads) && threads > 0;
    else if (key == "tensor_parallel")
      ok = absl::SimpleAtoi(value, &tensor_parallel) && tensor_parallel > 0;
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
  if (background_compress && (policy.empty() || prefill_only || !decode_from.empty())) {
    return Usage(
        "--background_compress needs --policy, and neither --prefill_only nor "
        "--decode_from (a prefill compresses before it hands the prompt on)");
  }
  if (prefill_only && !decode_from.empty()) {
    return Usage("--prefill_only and --decode_from exclude each other");
  }
  if (!transfer_to.empty() &&
      (!prefill_only || transfer_token_file.empty() || transfer_id.empty())) {
    return Usage("--transfer_to needs --prefill_only, --transfer_token_file and --transfer_id");
  }
  if (!decode_from.empty() && (token_file.empty() || first_token_file.empty() || !policy.empty())) {
    return Usage(
        "--decode_from needs --token_file and --first_token_file, and no --policy "
        "(the prefill compressed)");
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
  so.tensor_parallel = tensor_parallel;
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
    co.background = background_compress;
    go.compress = co;
  }
  if (prefill_only) {
    auto prefilled = cachemgr::engine::PrefillGreedy(engine, **cache, sequence, ids, go);
    if (!prefilled.ok()) return Fail("prefill", prefilled.status());
    uint64_t payload = 0;
    if (!transfer_to.empty()) {
      cachemgr::client::Session& session = (*cache)->session();
      auto info = session.GetSequence(sequence);
      if (!info.ok()) return Fail("prefill", info.status());
      bool fetched_codebook = false;
      for (const auto& layer : info->layers) fetched_codebook |= layer.codebook && !layer.parked;
      if (fetched_codebook) {  // codebook layers travel coded: back to the arena first
        if (auto parked = (*cache)->Park(sequence); !parked.ok()) {
          return Fail("park", parked.status());
        }
      }
      cachemgr::client::TransferOptions to;
      to.sequence_id = sequence;
      to.peer = transfer_to;
      to.destination_session_token = ReadFile(transfer_token_file);
      to.transfer_id = transfer_id;
      to.move = true;
      auto moved = session.TransferSequence(to);
      if (!moved.ok()) return Fail("transfer", moved.status());
      payload = moved->payload_bytes;
    } else {
      (void)(*cache)->Free(sequence);
    }
    std::printf("{\"first_token\": %u, \"prompt_tokens\": %zu, \"payload_bytes\": %llu}\n",
                prefilled->first_token, ids.size(), static_cast<unsigned long long>(payload));
    return 0;
  }
  if (!decode_from.empty()) {
    cachemgr::client::Session& session = (*cache)->session();
    if (!WriteSecretFile(token_file, session.session_token())) {
      return Fail("decode", absl::InternalError("cannot write --token_file " + token_file));
    }
    // Listed first (a GetSequence of a sequence not there yet is NOT_FOUND, which the client
    // takes as a hint to check its session), then not busy (still being received).
    const bool arrived = WaitFor(absl::Milliseconds(wait_ms), [&] {
      auto listed = session.ListSequences();
      if (!listed.ok()) return false;
      for (const auto& s : *listed) {
        if (s.sequence_id != decode_from) continue;
        auto info = session.GetSequence(decode_from);
        return info.ok() && info->busy.empty();
      }
      return false;
    });
    uint32_t first_token = 0;
    const bool told = WaitFor(absl::Milliseconds(wait_ms), [&] {
      return absl::SimpleAtoi(ReadFile(first_token_file), &first_token);
    });
    if (!arrived || !told) {
      return Fail("decode", absl::DeadlineExceededError(
                                "the sequence or its first token did not arrive in time"));
    }
    if (absl::Status s = (*cache)->Adopt(decode_from); !s.ok()) return Fail("adopt", s);
    auto decoded = cachemgr::engine::DecodeGreedy(engine, **cache, *loaded->tokenizer, decode_from,
                                                  ids.back(), first_token, go);
    if (!decoded.ok()) return Fail("decode", decoded.status());
    std::printf("%s%s\n", prompt.c_str(), decoded->text.c_str());
    (void)(*cache)->Free(decode_from);
    return 0;
  }
  auto out = GenerateGreedy(engine, **cache, *loaded->tokenizer, sequence, ids, go);
  if (!out.ok()) {
    std::fprintf(stderr, "cachemgr-engine: %s\n", std::string(out.status().message()).c_str());
    return 1;
  }
  if (out->compressed.has_value()) {
    std::fprintf(stderr, "compressed with %s: honest byte ratio %.4f (%llu -> %llu bytes)\n",
                 policy.c_str(), out->compressed->honest_ratio,
                 static_cast<unsigned long long>(out->compressed->bytes_before),
                 static_cast<unsigned long long>(out->compressed->bytes_after));
    if (background_compress) {
      std::fprintf(stderr, "applied in the background, after %u decoded tokens\n",
                   out->compressed->rows_appended);
    }
  }
  if (out->sidecar_recoveries > 0) {
    std::fprintf(stderr, "cachemgrd failed %u time(s) during generation; the KV was recomputed\n",
                 out->sidecar_recoveries);
  }
  std::printf("%s%s\n", prompt.c_str(), out->text.c_str());
  (void)(*cache)->Free(sequence);
  return 0;
}
