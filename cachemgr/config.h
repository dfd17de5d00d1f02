// DaemonConfig: every setting of cachemgrd, read once at start from an optional config file and
// the command line (flags win), validated, then immutable.
//
// Config file: one `key = value` per line, `#` starts a comment, keys are the flag names
// without `--`. Flags: `--key=value` or `--key value`; booleans also as `--key` / `--nokey`.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/peers/peer_address.h"
#include "cachemgr/util/log.h"

namespace cachemgr {

struct DaemonConfig {
  // gRPC Unix socket; created with mode 0600 (0660 with socket_group).
  std::string socket_path = "/run/cachemgr/cachemgr.sock";
  // Share channel socket (pool descriptors); empty means socket_path + ".share".
  std::string share_socket_path;
  // The fast path's socket (service/fast_path_server.h); empty means socket_path + ".fast".
  std::string fast_socket_path;
  // How long the fast path's thread keeps polling after an answer before it sleeps.
  absl::Duration fast_path_spin = absl::Microseconds(50);

  // Who may connect to the Unix sockets (cachemgr/service/peer_policy.h): the daemon's uid,
  // root, these uids, and members of socket_group (whose gid the sockets then carry, mode 0660).
  std::vector<uid_t> allowed_uids;
  std::string socket_group;
  std::optional<gid_t> socket_gid;  // resolved from socket_group during validation
  // Where the operator credential is written at start (empty means socket_path + ".operator"),
  // mode 0600, or 0640 owned by operator_group when set.
  std::string operator_token_file;
  std::string operator_group;
  std::optional<gid_t> operator_gid;  // resolved from operator_group during validation
  // Open gRPC Unix connections allowed in total and per uid (closed at accept beyond).
  uint32_t max_connections = 1024;
  uint32_t max_connections_per_uid = 512;

  // Optional TCP listener "host:port" for remote schedulers: TLS (tls_cert_file, tls_key_file;
  // mutual TLS with tls_client_ca_file), or plaintext on a loopback address with
  // tcp_plaintext_loopback. Every call authenticates with the bearer token of tcp_token_file
  // (or, under mutual TLS, with the client certificate).
  std::string tcp_address;
  std::string tcp_token_file;
  std::string tcp_token;  // read from tcp_token_file during validation
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  bool tcp_plaintext_loopback = false;

  // Other daemons (cachemgr/peers/peer_address.h), reached on their TCP listeners with this
  // daemon's TCP credentials: the bearer token, or (TLS) this daemon's certificate as a client
  // certificate, verifying theirs against peer_ca_file (default tls_client_ca_file) under the
  // name peer_tls_server_name (default: the address). Probed every peer_probe_interval.
  std::vector<PeerSource> peers;
  std::string peer_ca_file;
  std::string peer_tls_server_name;
  absl::Duration peer_probe_interval = absl::Seconds(2);
  // This daemon's name for its peers (default: the host name).
  std::string node_name;
  // Row links (cachemgr/peers/row_link.h): the kinds this daemon offers and joins for the rows
  // of transfers, in order of preference ("nccl", "socket"); {"auto"}: nccl with
  // --backend=cuda, none with host. Socket links listen on row_link_host.
  std::vector<std::string> row_links = {"auto"};
  std::string row_link_host;
  uint64_t row_link_chunk_bytes = uint64_t{64} << 20;  // rows per link message fit this

  // The self-probe (cachemgr/service/health_probe.h): interval (zero: off), consecutive
  // failures before health turns NOT_SERVING, and whether the daemon then exits (non-zero, so
  // a supervisor restarts it).
  absl::Duration health_probe_interval = absl::Seconds(2);
  uint32_t health_probe_failures = 3;
  bool exit_when_unserving = false;

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
  // Debugging and soak runs: how often the reaper runs CacheManager::CheckInvariants (a
  // violation is logged and aborts the daemon); zero: never.
  absl::Duration check_invariants_interval = absl::ZeroDuration();
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
