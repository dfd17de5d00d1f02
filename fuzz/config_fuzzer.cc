// Fuzzes the daemon's configuration parser (cachemgr/config.h, ParseDaemonCommandLine).
//
// Input: the config file's text, optionally followed by a NUL byte and command-line arguments,
// one per line. The parser is given `--config=<the file>` and those arguments.
//
// Hermetic: the parser reads only what this harness hands it. Arguments that mention "config"
// are dropped (the only config file is the input), and every setting whose name contains
// "file" (tcp_token_file, and any *_file setting added later) is pointed at one of a few fixed
// in-memory files (a valid token, a short one, an empty one) or at a path that does not exist,
// chosen by the length of the value it replaces.
//
// Oracle besides the sanitizers: a configuration the parser accepts satisfies every rule the
// parser promises to enforce (see Validate in cachemgr/config.cc).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "cachemgr/config.h"
#include "fuzz/fuzz_util.h"

namespace cachemgr::fuzz {
namespace {

// The files a *_file setting may name.
struct Fixtures {
  Fixtures() {
    valid.Write("0123456789abcdef0123456789abcdef\n");
    short_token.Write("short\n");
    empty.Write("");
  }
  const std::string& Pick(size_t selector) const {
    static const std::string kMissing = "/nonexistent-cachemgr-fuzz/token";
    switch (selector % 4) {
      case 0:
        return valid.path();
      case 1:
        return short_token.path();
      case 2:
        return empty.path();
    }
    return kMissing;
  }
  MemoryFile valid{"fuzz-config-token"};
  MemoryFile short_token{"fuzz-config-short-token"};
  MemoryFile empty{"fuzz-config-empty"};
};

// A config-file line with a file-naming key gets a fixture as its value.
std::string HermeticLine(absl::string_view line, const Fixtures& fixtures) {
  const size_t eq = line.find('=');
  if (eq == absl::string_view::npos || !absl::StrContains(line.substr(0, eq), "file")) {
    return std::string(line);
  }
  return absl::StrCat(line.substr(0, eq), "= ", fixtures.Pick(line.size() - eq));
}

// An argument naming a file setting gets a fixture; one mentioning config is dropped ("").
std::string HermeticArg(absl::string_view arg, const Fixtures& fixtures) {
  if (absl::StrContains(arg, "config")) return "";
  if (!absl::StrContains(arg, "file")) return std::string(arg);
  const size_t eq = arg.find('=');
  const absl::string_view name = eq == absl::string_view::npos ? arg : arg.substr(0, eq);
  return absl::StrCat(name, "=", fixtures.Pick(arg.size() - name.size()));
}

void CheckAccepted(const ParsedCommandLine& parsed) {
  if (parsed.exit_now) {
    Check(!parsed.message.empty(), "--help/--version without text");
    return;
  }
  const DaemonConfig& c = parsed.config;
  Check(!c.socket_path.empty() && c.socket_path.size() <= 107, "socket path accepted");
  Check(!c.share_socket_path.empty() && c.share_socket_path.size() <= 107 &&
            c.share_socket_path != c.socket_path,
        "share socket path accepted");
  Check(c.manager.lease_timeout > c.manager.heartbeat_interval, "lease <= heartbeat accepted");
  Check(c.manager.memory_budget_bytes > 0 && c.manager.default_pool_bytes > 0 &&
            c.manager.default_pool_bytes <= c.manager.memory_budget_bytes,
        "pool/budget sizes accepted");
  Check(c.manager.default_block_size >= 1 && c.manager.default_block_size <= kMaxBlockSize,
        "default block size accepted");
  Check(c.manager.max_tokens_per_allocate >= 1, "max_tokens_per_allocate 0 accepted");
  Check(c.worker_threads >= 1 && c.worker_threads <= 256, "worker_threads accepted");
  Check(c.backend == "host" || c.backend == "cuda", "backend accepted");
  if (!c.tcp_address.empty()) {
    Check(absl::StrContains(c.tcp_address, ":"), "tcp_address without a port accepted");
    Check(c.tcp_token.size() >= 16, "TCP served with a short token");
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  static const Fixtures* fixtures = new Fixtures();
  static MemoryFile* config_file = new MemoryFile("fuzz-config");
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const absl::string_view file_text = input.substr(0, nul);

  std::string file;
  for (absl::string_view line : absl::StrSplit(file_text, '\n')) {
    absl::StrAppend(&file, HermeticLine(line, *fixtures), "\n");
  }
  std::vector<std::string> args = {absl::StrCat("--config=", config_file->Write(file))};
  if (nul != absl::string_view::npos) {
    for (absl::string_view arg : absl::StrSplit(input.substr(nul + 1), '\n')) {
      std::string hermetic = HermeticArg(arg, *fixtures);
      if (!hermetic.empty()) args.push_back(std::move(hermetic));
    }
  }
  absl::StatusOr<ParsedCommandLine> parsed = ParseDaemonCommandLine(args);
  if (!parsed.ok()) {
    Check(parsed.status().code() == absl::StatusCode::kInvalidArgument,
          absl::StrCat("a bad config is not INVALID_ARGUMENT: ", parsed.status().ToString()));
    return;
  }
  CheckAccepted(*parsed);
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
