// DaemonConfig: every setting of cachemgrd, read once at start from an optional config file and
// the command line (flags win), validated, then immutable.
//
// Config file: one `key = value` per line, `#` starts a comment, keys are the flag names
// without `--`. Flags: `--key=value` or `--key value`; booleans also as `--key` / `--nokey`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/util/log.h"

namespace cachemgr {

struct DaemonConfig {
  // gRPC Unix socket; created with mode 0600.
  std::string socket_path = "/run/cachemgr/cachemgr.sock";
  // Share channel socket (pool descriptors); empty means socket_path + ".share".
  std::string share_socket_path;
  // Optional TCP listener "host:port" for remote schedulers; requires tcp_token_file.
  std::string tcp_address;
  // File holding the bearer token TCP callers must send as "authorization: Bearer <token>".
  std::string tcp_token_file;
  std::string tcp_token;  // read from tcp_token_file during validation

  // Prometheus scrape endpoint "host:port" (GET /metrics); empty: no endpoint.
  std::string metrics_address;

  // Where pools live: "host" (memfd shared memory) or "cuda" (one GPU's memory, CUDA IPC;
  // builds with CACHEMGR_CUDA only). For cuda: the device by UUID or ordinal, and the IPC path
  // ("vmm_fd" or "ipc_handle", see cachemgr/backend/cuda_backend.h).
  std::string backend = "host";
  std::string cuda_device = "0";
  std::string cuda_share = "vmm_fd";

  CacheManagerOptions manager;
  LogLevel log_level = LogLevel::kInfo;
  bool enable_reflection = true;
  bool enable_health = true;
  // Threads running Compress, Fetch and Park (CPU work proportional to the sequence).
  uint32_t worker_threads = 2;
  // How long shutdown waits for in-flight calls before cancelling them.
  absl::Duration shutdown_grace = absl::Seconds(5);
  // Where the config was read from, for the startup log line.
  std::string config_file;
};

// What parsing decided: run with a config, or print text (help/version) and exit 0.
struct ParsedCommandLine {
  DaemonConfig config;
  bool exit_now = false;
  std::string message;  // help or version text when exit_now
};

// Parses argv (argv[0] skipped) and the file named by --config, then validates everything.
// INVALID_ARGUMENT names the flag or `file:line` and says what is wrong.
absl::StatusOr<ParsedCommandLine> ParseDaemonCommandLine(const std::vector<std::string>& args);

// The --help text.
std::string DaemonUsage();

}  // namespace cachemgr
