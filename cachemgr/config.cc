#include "cachemgr/config.h"

#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {
namespace {

constexpr char kVersion[] = "cachemgrd 0.1.0";

// Parses "123", "64K", "256M", "2G" (binary units).
bool ParseBytes(absl::string_view text, uint64_t* out) {
  uint64_t mult = 1;
  if (!text.empty()) {
    switch (absl::ascii_toupper(text.back())) {
      case 'K':
        mult = uint64_t{1} << 10;
        break;
      case 'M':
        mult = uint64_t{1} << 20;
        break;
      case 'G':
        mult = uint64_t{1} << 30;
        break;
      case 'T':
        mult = uint64_t{1} << 40;
        break;
      default:
        break;
    }
    if (mult != 1) text.remove_suffix(1);
  }
  uint64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) return false;
  if (v > UINT64_MAX / mult) return false;
  *out = v * mult;
  return true;
}

bool ParseBool(absl::string_view text, bool* out) {
  const std::string t = absl::AsciiStrToLower(text);
  if (t == "true" || t == "1" || t == "yes" || t == "on") {
    *out = true;
    return true;
  }
  if (t == "false" || t == "0" || t == "no" || t == "off") {
    *out = false;
    return true;
  }
  return false;
}

struct Option {
  const char* name;
  const char* value_hint;  // nullptr for booleans
  const char* help;
  // Applies the value; returns an error message ("" on success).
  std::function<std::string(DaemonConfig&, absl::string_view)> apply;
};

std::string NeedUint(absl::string_view v, uint64_t min, uint64_t max, uint64_t* out) {
  if (!absl::SimpleAtoi(v, out) || *out < min || *out > max) {
    return absl::StrCat("must be an integer in [", min, ", ", max, "] (got \"", v, "\")");
  }
  return "";
}

const std::vector<Option>& Options() {
  static const auto* options = new std::vector<Option>{
      {"config", "FILE", "read settings from FILE (key = value lines); flags override it",
       [](DaemonConfig& c, absl::string_view v) {
         c.config_file = std::string(v);
         return std::string();
       }},
      {"socket", "PATH", "gRPC Unix socket, mode 0600 (default /run/cachemgr/cachemgr.sock)",
       [](DaemonConfig& c, absl::string_view v) {
         c.socket_path = std::string(v);
         return std::string();
       }},
      {"share_socket", "PATH", "socket that hands pool memory to clients (default SOCKET.share)",
       [](DaemonConfig& c, absl::string_view v) {
         c.share_socket_path = std::string(v);
         return std::string();
       }},
      {"tcp_address", "HOST:PORT", "also listen on TCP (needs --tcp_token_file); off by default",
       [](DaemonConfig& c, absl::string_view v) {
         c.tcp_address = std::string(v);
         return std::string();
       }},
      {"tcp_token_file", "FILE", "bearer token TCP callers must send (authorization metadata)",
       [](DaemonConfig& c, absl::string_view v) {
         c.tcp_token_file = std::string(v);
         return std::string();
       }},
      {"backend", "host|cuda", "where pools live (default host; cuda needs a CACHEMGR_CUDA build)",
       [](DaemonConfig& c, absl::string_view v) {
         if (v != "host" && v != "cuda")
           return absl::StrCat("must be host or cuda (got \"", v, "\")");
         c.backend = std::string(v);
         return std::string();
       }},
      {"cuda_device", "UUID|N",
       "with --backend=cuda: the GPU, by UUID (GPU-...) or ordinal (default 0)",
       [](DaemonConfig& c, absl::string_view v) {
         if (v.empty()) return std::string("must not be empty");
         c.cuda_device = std::string(v);
         return std::string();
       }},
      {"cuda_share", "vmm_fd|ipc_handle",
       "with --backend=cuda: how clients map the pools (default vmm_fd)",
       [](DaemonConfig& c, absl::string_view v) {
         if (v != "vmm_fd" && v != "ipc_handle") {
           return absl::StrCat("must be vmm_fd or ipc_handle (got \"", v, "\")");
         }
         c.cuda_share = std::string(v);
         return std::string();
       }},
      {"metrics_address", "HOST:PORT",
       "serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free); off by default",
       [](DaemonConfig& c, absl::string_view v) {
         c.metrics_address = std::string(v);
         return std::string();
       }},
      {"memory_budget", "BYTES", "bytes all pools together may hold, e.g. 8G (default 1G)",
       [](DaemonConfig& c, absl::string_view v) {
         if (!ParseBytes(v, &c.manager.memory_budget_bytes) || c.manager.memory_budget_bytes == 0) {
           return absl::StrCat("must be a byte count > 0 like 512M or 8G (got \"", v, "\")");
         }
         return std::string();
       }},
      {"default_pool_bytes", "BYTES",
       "size of a pool whose first client asks for num_blocks 0 (default 256M)",
       [](DaemonConfig& c, absl::string_view v) {
         if (!ParseBytes(v, &c.manager.default_pool_bytes) || c.manager.default_pool_bytes == 0) {
           return absl::StrCat("must be a byte count > 0 like 256M (got \"", v, "\")");
         }
         return std::string();
       }},
      {"default_block_size", "N", "tokens per block when a client sends 0 (default 16)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, kMaxBlockSize, &n);
         c.manager.default_block_size = static_cast<uint32_t>(n);
         return e;
       }},
      {"heartbeat_interval_ms", "MS", "interval clients are told to heartbeat at (default 1000)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, 3600000, &n);
         c.manager.heartbeat_interval = absl::Milliseconds(n);
         return e;
       }},
      {"lease_timeout_ms", "MS",
       "a client silent this long loses its blocks; > heartbeat interval (default 10000)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, 86400000, &n);
         c.manager.lease_timeout = absl::Milliseconds(n);
         return e;
       }},
      {"quarantine_ms", "MS",
       "blocks of a client whose lease expired stay unusable this long, since it may still "
       "write to them; >= lease_timeout_ms (default: lease_timeout_ms)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, 7 * 86400000ull, &n);
         c.manager.quarantine = absl::Milliseconds(n);
         return e;
       }},
      {"max_reply_bytes", "BYTES",
       "largest reply of Allocate, GetSequence, Fork, Compress or Fetch; larger requests get "
       "RESOURCE_EXHAUSTED (default 4M, what gRPC clients receive by default)",
       [](DaemonConfig& c, absl::string_view v) {
         if (!ParseBytes(v, &c.manager.max_reply_bytes) ||
             c.manager.max_reply_bytes < (uint64_t{64} << 10) ||
             c.manager.max_reply_bytes > (uint64_t{1} << 30)) {
           return absl::StrCat("must be a byte count in [64K, 1G] like 4M (got \"", v, "\")");
         }
         return std::string();
       }},
      {"max_tokens_per_allocate", "N", "largest num_new_tokens one Allocate accepts (1048576)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, UINT32_MAX, &n);
         c.manager.max_tokens_per_allocate = static_cast<uint32_t>(n);
         return e;
       }},
      {"log_level", "LEVEL", "debug, info, warning or error (default info)",
       [](DaemonConfig& c, absl::string_view v) {
         if (!ParseLogLevel(std::string(v), &c.log_level)) {
           return absl::StrCat("must be debug, info, warning or error (got \"", v, "\")");
         }
         return std::string();
       }},
      {"reflection", nullptr, "serve gRPC server reflection (default true)",
       [](DaemonConfig& c, absl::string_view v) {
         return ParseBool(v, &c.enable_reflection)
                    ? std::string()
                    : absl::StrCat("must be true or false (got \"", v, "\")");
       }},
      {"health", nullptr, "serve grpc.health.v1.Health (default true)",
       [](DaemonConfig& c, absl::string_view v) {
         return ParseBool(v, &c.enable_health)
                    ? std::string()
                    : absl::StrCat("must be true or false (got \"", v, "\")");
       }},
      {"worker_threads", "N", "threads running Compress, Fetch and Park (default 2)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 1, 256, &n);
         c.worker_threads = static_cast<uint32_t>(n);
         return e;
       }},
      {"compress_threads", "N",
       "threads one Compress spreads its layers over; 0: one per core (default 0)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 0, 256, &n);
         c.manager.compress_threads = static_cast<uint32_t>(n);
         return e;
       }},
      {"shutdown_grace_ms", "MS", "time in-flight calls get to finish at shutdown (default 5000)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 0, 600000, &n);
         c.shutdown_grace = absl::Milliseconds(n);
         return e;
       }},
  };
  return *options;
}

const Option* FindOption(absl::string_view name) {
  for (const Option& o : Options()) {
    if (name == o.name) return &o;
  }
  return nullptr;
}

absl::Status ApplyFile(const std::string& path, DaemonConfig& config) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--config: cannot read ", path));
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    absl::string_view text = line;
    if (size_t hash = text.find('#'); hash != absl::string_view::npos) text = text.substr(0, hash);
    text = absl::StripAsciiWhitespace(text);
    if (text.empty()) continue;
    const size_t eq = text.find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", lineno, ": expected `key = value` (got \"", text, "\")"));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(text.substr(0, eq));
    const absl::string_view value = absl::StripAsciiWhitespace(text.substr(eq + 1));
    const Option* opt = FindOption(key);
    if (opt == nullptr || key == "config") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", lineno, ": unknown setting \"", key, "\""));
    }
    if (std::string err = opt->apply(config, value); !err.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", lineno, ": ", key, " ", err));
    }
  }
  return absl::OkStatus();
}

absl::Status Validate(DaemonConfig& c) {
  if (c.socket_path.empty()) return absl::InvalidArgumentError("--socket must not be empty");
  if (c.share_socket_path.empty()) c.share_socket_path = c.socket_path + ".share";
  // sockaddr_un.sun_path holds 108 bytes including the terminator.
  for (const auto& [flag, path] :
       {std::pair{"--socket", c.socket_path}, std::pair{"--share_socket", c.share_socket_path}}) {
    if (path.size() > 107) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " is ", path.size(), " bytes long; Unix socket paths hold 107"));
    }
  }
  if (c.share_socket_path == c.socket_path) {
    return absl::InvalidArgumentError("--share_socket must differ from --socket");
  }
  if (c.manager.lease_timeout <= c.manager.heartbeat_interval) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lease_timeout_ms (", absl::ToInt64Milliseconds(c.manager.lease_timeout),
                     ") must exceed --heartbeat_interval_ms (",
                     absl::ToInt64Milliseconds(c.manager.heartbeat_interval), ")"));
  }
  if (c.manager.quarantine == absl::ZeroDuration()) {
    c.manager.quarantine = c.manager.lease_timeout;
  } else if (c.manager.quarantine < c.manager.lease_timeout) {
    return absl::InvalidArgumentError(
        absl::StrCat("--quarantine_ms (", absl::ToInt64Milliseconds(c.manager.quarantine),
                     ") must be at least --lease_timeout_ms (",
                     absl::ToInt64Milliseconds(c.manager.lease_timeout),
                     "): a stalled client's blocks must not be reused sooner"));
  }
  if (c.manager.default_pool_bytes > c.manager.memory_budget_bytes) {
    return absl::InvalidArgumentError("--default_pool_bytes must not exceed --memory_budget");
  }
  if (!c.tcp_address.empty()) {
    if (c.tcp_address.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tcp_address must be HOST:PORT (got \"", c.tcp_address, "\")"));
    }
    if (c.tcp_token_file.empty()) {
      return absl::InvalidArgumentError(
          "--tcp_address needs --tcp_token_file: TCP callers must authenticate");
    }
    std::ifstream in(c.tcp_token_file);
    std::stringstream buf;
    buf << in.rdbuf();
    if (!in) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tcp_token_file: cannot read ", c.tcp_token_file));
    }
    c.tcp_token = std::string(absl::StripAsciiWhitespace(buf.str()));
    if (c.tcp_token.size() < 16) {
      return absl::InvalidArgumentError("--tcp_token_file must hold a token of >= 16 characters");
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string DaemonUsage() {
  std::string out =
      "Usage: cachemgrd [--config FILE] [--flag=value ...]\n"
      "KV-cache manager sidecar: owns KV blocks, lends them to engines, serves gRPC.\n\n";
  for (const Option& o : Options()) {
    std::string lhs = o.value_hint ? absl::StrCat("--", o.name, "=", o.value_hint)
                                   : absl::StrCat("--[no]", o.name);
    absl::StrAppend(&out, "  ", lhs, std::string(lhs.size() < 30 ? 30 - lhs.size() : 1, ' '),
                    o.help, "\n");
  }
  absl::StrAppend(&out, "  --help                        this text\n",
                  "  --version                     print the version\n");
  return out;
}

absl::StatusOr<ParsedCommandLine> ParseDaemonCommandLine(const std::vector<std::string>& args) {
  // First pass: normalise flags into (name, value) pairs; find --config.
  std::vector<std::pair<std::string, std::string>> flags;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument \"", arg, "\" (flags look like --name=value)"));
    }
    if (arg == "help" || arg == "version") {
      return ParsedCommandLine{{}, true, arg == "help" ? DaemonUsage() : std::string(kVersion)};
    }
    std::string name, value;
    if (size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = std::string(arg.substr(0, eq));
      value = std::string(arg.substr(eq + 1));
    } else {
      name = std::string(arg);
      const Option* opt = FindOption(name);
      if (opt == nullptr && absl::StartsWith(name, "no") && FindOption(name.substr(2)) &&
          FindOption(name.substr(2))->value_hint == nullptr) {
        name = name.substr(2);
        value = "false";
      } else if (opt != nullptr && opt->value_hint == nullptr) {
        value = "true";
      } else if (opt != nullptr) {
        if (i + 1 >= args.size()) {
          return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
        }
        value = args[++i];
      }
    }
    if (FindOption(name) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see --help)"));
    }
    flags.emplace_back(std::move(name), std::move(value));
  }
  ParsedCommandLine parsed;
  DaemonConfig& config = parsed.config;
  for (const auto& [name, value] : flags) {
    if (name == "config") config.config_file = value;
  }
  if (!config.config_file.empty()) RETURN_IF_ERROR(ApplyFile(config.config_file, config));
  for (const auto& [name, value] : flags) {
    if (std::string err = FindOption(name)->apply(config, value); !err.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " ", err));
    }
  }
  RETURN_IF_ERROR(Validate(config));
  return parsed;
}

}  // namespace cachemgr
