#include "cachemgr/config.h"

#include <unistd.h>

#include <algorithm>
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
#include "cachemgr/peers/peer_address.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/peer_policy.h"
#include "cachemgr/util/secret_file.h"
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

std::string NeedUint32(absl::string_view v, uint64_t min, uint64_t max, uint32_t* out) {
  uint64_t n = 0;
  std::string e = NeedUint(v, min, max, &n);
  if (e.empty()) *out = static_cast<uint32_t>(n);
  return e;
}

std::string NeedBool(absl::string_view v, bool* out) {
  return ParseBool(v, out) ? std::string()
                           : absl::StrCat("must be true or false (got \"", v, "\")");
}

std::string SetString(std::string* field, absl::string_view v) {
  *field = std::string(v);
  return std::string();
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
      {"fast_socket", "PATH",
       "socket of the fast path: Allocate, Free, Fork, Step, Heartbeat without gRPC (default "
       "SOCKET.fast)",
       [](DaemonConfig& c, absl::string_view v) {
         c.fast_socket_path = std::string(v);
         return std::string();
       }},
      {"fast_path_spin_us", "N",
       "microseconds the fast path polls for the next request after an answer before it sleeps; "
       "0: sleep at once (default 50)",
       [](DaemonConfig& c, absl::string_view v) {
         uint32_t us = 0;
         if (std::string e = NeedUint32(v, 0, 10000, &us); !e.empty()) return e;
         c.fast_path_spin = absl::Microseconds(us);
         return std::string();
       }},
      {"allowed_uids", "LIST", "more uids or user names (a,b) that may connect; sockets 0666",
       [](DaemonConfig& c, absl::string_view v) {
         c.allowed_uids.clear();
         for (absl::string_view name : absl::StrSplit(v, ',', absl::SkipWhitespace())) {
           absl::StatusOr<uid_t> uid =
               ResolveUser(std::string(absl::StripAsciiWhitespace(name)), "--allowed_uids");
           if (!uid.ok()) return std::string(uid.status().message());
           c.allowed_uids.push_back(*uid);
         }
         return std::string();
       }},
      {"socket_group", "NAME",
       "group whose members may connect; sockets 0660 for it (default none)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.socket_group, v); }},
      {"operator_token_file", "PATH",
       "where the operator credential is written (default SOCKET.operator)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.operator_token_file, v); }},
      {"operator_group", "NAME",
       "group that may read the operator credential, file 0640 (default none)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.operator_group, v); }},
      {"max_clients", "N", "attached clients allowed in total (default 1024)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint32(v, 1, 1 << 20, &c.manager.max_clients);
       }},
      {"max_clients_per_uid", "N", "attached clients one uid may have (default 512)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint32(v, 1, 1 << 20, &c.manager.max_clients_per_uid);
       }},
      {"max_connections", "N", "open connections to the gRPC socket in total (default 1024)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint32(v, 1, 1 << 20, &c.max_connections);
       }},
      {"max_connections_per_uid", "N", "open connections to the gRPC socket per uid (default 512)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint32(v, 1, 1 << 20, &c.max_connections_per_uid);
       }},
      {"tcp_address", "HOST:PORT",
       "also listen on TCP (TLS, or --tcp_plaintext_loopback); off by default",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.tcp_address, v); }},
      {"tcp_token_file", "FILE", "bearer token every TCP call must send; mode 0600",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.tcp_token_file, v); }},
      {"tls_cert_file", "FILE", "TCP: the server's PEM certificate chain (TLS)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.tls_cert_file, v); }},
      {"tls_key_file", "FILE", "TCP: the server's PEM private key; mode 0600",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.tls_key_file, v); }},
      {"tls_client_ca_file", "FILE", "TCP: mutual TLS with client certificates this PEM CA signed",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.tls_client_ca_file, v); }},
      {"tcp_plaintext_loopback", nullptr,
       "TCP without TLS, on a loopback --tcp_address only (default false)",
       [](DaemonConfig& c, absl::string_view v) { return NeedBool(v, &c.tcp_plaintext_loopback); }},
      {"peers", "LIST",
       "other daemons (HOST:PORT, dns:NAME:PORT for every address of NAME), reached on their "
       "TCP listeners; needs --tcp_address",
       [](DaemonConfig& c, absl::string_view v) {
         absl::StatusOr<std::vector<PeerSource>> sources = ParsePeerList(v);
         if (!sources.ok()) return std::string(sources.status().message());
         c.peers = *std::move(sources);
         return std::string();
       }},
      {"peer_ca_file", "FILE",
       "TLS: the PEM CA that signs peers' server certificates (default: --tls_client_ca_file)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.peer_ca_file, v); }},
      {"peer_tls_server_name", "NAME",
       "TLS: the name peers' certificates carry (default: the address dialled)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.peer_tls_server_name, v); }},
      {"peer_probe_interval_ms", "MS", "how often every peer is probed (2000)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 100, 3600000, &n);
         c.peer_probe_interval = absl::Milliseconds(n);
         return e;
       }},
      {"row_links", "LIST",
       "how the rows of transfers between daemons travel beside the stream, in order of "
       "preference: nccl (GPU to GPU), socket (a TCP connection); auto: nccl with "
       "--backend=cuda; empty: the stream (default auto)",
       [](DaemonConfig& c, absl::string_view v) {
         c.row_links.clear();
         for (absl::string_view kind : absl::StrSplit(v, ',', absl::SkipEmpty())) {
           if (kind != "nccl" && kind != "socket" && kind != "auto") {
             return absl::StrCat("must list nccl, socket or auto (got \"", kind, "\")");
           }
           if (std::find(c.row_links.begin(), c.row_links.end(), kind) != c.row_links.end()) {
             return absl::StrCat("names ", kind, " twice");
           }
           c.row_links.emplace_back(kind);
         }
         if (c.row_links.size() > 1 &&
             std::find(c.row_links.begin(), c.row_links.end(), "auto") != c.row_links.end()) {
           return std::string("auto stands alone");
         }
         return std::string();
       }},
      {"row_link_host", "HOST",
       "where socket row links listen: a name or address peers reach this daemon at (not a "
       "wildcard); needed for --row_links=socket",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.row_link_host, v); }},
      {"row_link_chunk_bytes", "N",
       "the rows (keys and values) of one row link message fit N bytes, 4096-268435456 "
       "(default 67108864)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint(v, 4096, uint64_t{256} << 20, &c.row_link_chunk_bytes);
       }},
      {"node_name", "NAME", "this daemon's name as its peers see it (default: the host name)",
       [](DaemonConfig& c, absl::string_view v) { return SetString(&c.node_name, v); }},
      {"health_probe_interval_ms", "MS",
       "how often the daemon checks new clients get served; 0: never (2000)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 0, 3600000, &n);
         c.health_probe_interval = absl::Milliseconds(n);
         return e;
       }},
      {"health_probe_failures", "N",
       "probe failures in a row before health is NOT_SERVING (default 3)",
       [](DaemonConfig& c, absl::string_view v) {
         return NeedUint32(v, 1, 1000, &c.health_probe_failures);
       }},
      {"check_invariants_ms", "MS",
       "debugging and soak runs: check the block and budget books every MS and abort on a "
       "violation (costs time proportional to the pools' blocks, under the manager's lock); "
       "0: never (default 0)",
       [](DaemonConfig& c, absl::string_view v) {
         uint64_t n = 0;
         std::string e = NeedUint(v, 0, 3600000, &n);
         c.check_invariants_interval = absl::Milliseconds(n);
         return e;
       }},
      {"exit_when_unserving", nullptr,
       "exit 3 when the probe finds the daemon cannot serve (default false)",
       [](DaemonConfig& c, absl::string_view v) { return NeedBool(v, &c.exit_when_unserving); }},
      {"backend", "host|cuda", "where pools live (default host; cuda needs a CACHEMGR_CUDA build)",
       [](DaemonConfig& c, absl::string_view v) {
         if (v != "host" && v != "cuda")
           return absl::StrCat("must be host or cuda (got \"", v, "\")");
         c.backend = std::string(v);
         return std::string();
       }},
      {"cuda_device", "UUID|N[,...]",
       "with --backend=cuda: the GPUs, by UUID (GPU-...) or ordinal, comma-separated (default "
       "0); the first is where an Attach naming no device goes",
       [](DaemonConfig& c, absl::string_view v) {
         if (v.empty()) return std::string("must not be empty");
         for (absl::string_view d : absl::StrSplit(v, ',')) {
           if (d.empty()) return std::string("must not name an empty device");
         }
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
       [](DaemonConfig& c, absl::string_view v) { return NeedBool(v, &c.enable_reflection); }},
      {"health", nullptr, "serve grpc.health.v1.Health (default true)",
       [](DaemonConfig& c, absl::string_view v) { return NeedBool(v, &c.enable_health); }},
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

// "127.0.0.1:P", "127.x.y.z:P", "[::1]:P", "localhost:P".
bool IsLoopbackAddress(absl::string_view address) {
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos) return false;
  const absl::string_view host = address.substr(0, colon);
  return absl::StartsWith(host, "127.") || host == "[::1]" || host == "localhost";
}

absl::Status ValidateTcp(DaemonConfig& c) {
  const bool tls = !c.tls_cert_file.empty() || !c.tls_key_file.empty();
  if (c.tcp_address.empty()) {
    if (tls || !c.tls_client_ca_file.empty() || c.tcp_plaintext_loopback ||
        !c.tcp_token_file.empty()) {
      return absl::InvalidArgumentError(
          "--tcp_token_file, --tls_* and --tcp_plaintext_loopback only apply with --tcp_address");
    }
    return absl::OkStatus();
  }
  if (c.tcp_address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tcp_address must be HOST:PORT (got \"", c.tcp_address, "\")"));
  }
  if (tls && c.tcp_plaintext_loopback) {
    return absl::InvalidArgumentError("--tcp_plaintext_loopback and --tls_* exclude each other");
  }
  if (!tls && !c.tcp_plaintext_loopback) {
    return absl::InvalidArgumentError(
        "--tcp_address needs TLS (--tls_cert_file and --tls_key_file), or, on a loopback "
        "address, an explicit --tcp_plaintext_loopback: TCP is never plaintext by accident");
  }
  if (c.tcp_plaintext_loopback && !IsLoopbackAddress(c.tcp_address)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tcp_plaintext_loopback needs a loopback --tcp_address (127.0.0.1, [::1] or "
                     "localhost), got \"",
                     c.tcp_address, "\"; use TLS for other addresses"));
  }
  if (tls && (c.tls_cert_file.empty() || c.tls_key_file.empty())) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  }
  if (tls) RETURN_IF_ERROR(CheckPrivateFile(c.tls_key_file, "--tls_key_file"));
  if (c.tcp_token_file.empty()) {
    if (c.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tcp_address needs --tcp_token_file (or mutual TLS with --tls_client_ca_file): TCP "
          "callers must authenticate");
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(c.tcp_token, ReadPrivateFile(c.tcp_token_file, "--tcp_token_file"));
  if (c.tcp_token.size() < 16) {
    return absl::InvalidArgumentError("--tcp_token_file must hold a token of >= 16 characters");
  }
  return absl::OkStatus();
}

// Peers are reached with this daemon's own TCP credentials (the cluster shares one token, or
// one CA), so they need the TCP listener configured.
absl::Status ValidatePeers(DaemonConfig& c) {
  if (c.node_name.empty()) {
    char host[256] = {};
    c.node_name = ::gethostname(host, sizeof(host) - 1) == 0 ? host : "unknown";
  }
  if (c.peers.empty()) {
    if (!c.peer_ca_file.empty() || !c.peer_tls_server_name.empty()) {
      return absl::InvalidArgumentError("--peer_ca_file and --peer_tls_server_name need --peers");
    }
    return absl::OkStatus();
  }
  if (c.tcp_address.empty()) {
    return absl::InvalidArgumentError(
        "--peers needs --tcp_address: daemons reach each other on their TCP listeners, with "
        "the same credentials");
  }
  if (c.tcp_plaintext_loopback) {
    for (const PeerSource& p : c.peers) {
      const std::string host =
          p.host.find(':') == std::string::npos ? p.host : absl::StrCat("[", p.host, "]");
      if (p.dns ? p.host != "localhost" : !IsLoopbackAddress(absl::StrCat(host, ":", p.port))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--peers entry \"", p.entry,
            "\" is not on loopback: with --tcp_plaintext_loopback peers are local; use TLS"));
      }
    }
    if (!c.peer_ca_file.empty() || !c.peer_tls_server_name.empty()) {
      return absl::InvalidArgumentError(
          "--peer_ca_file and --peer_tls_server_name apply with TLS, not --tcp_plaintext_loopback");
    }
    return absl::OkStatus();
  }
  if (c.peer_ca_file.empty()) c.peer_ca_file = c.tls_client_ca_file;
  if (c.peer_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--peers over TLS needs --peer_ca_file (or --tls_client_ca_file): the CA that signs the "
        "peers' server certificates");
  }
  return absl::OkStatus();
}

// Resolves --row_links=auto and checks each kind can work here.
absl::Status ValidateRowLinks(DaemonConfig& c) {
  if (c.row_links == std::vector<std::string>{"auto"}) {
    c.row_links.clear();
    if (c.backend == "cuda" && !c.tcp_address.empty()) c.row_links.push_back("nccl");
  }
  const bool socket =
      std::find(c.row_links.begin(), c.row_links.end(), "socket") != c.row_links.end();
  if (!c.row_links.empty() && c.tcp_address.empty()) {
    return absl::InvalidArgumentError(
        "--row_links needs --tcp_address: row links carry transfers between daemons");
  }
  if (std::find(c.row_links.begin(), c.row_links.end(), "nccl") != c.row_links.end() &&
      c.backend != "cuda") {
    return absl::InvalidArgumentError("--row_links=nccl needs --backend=cuda");
  }
  if (socket && (c.row_link_host.empty() || c.row_link_host == "0.0.0.0" ||
                 c.row_link_host == "::" || c.row_link_host == "[::]")) {
    return absl::InvalidArgumentError(
        "--row_links=socket needs --row_link_host: the name or address peers reach this daemon "
        "at (not a wildcard)");
  }
  if (!socket && !c.row_link_host.empty()) {
    return absl::InvalidArgumentError("--row_link_host only applies with --row_links=socket");
  }
  return absl::OkStatus();
}

absl::Status Validate(DaemonConfig& c) {
  if (c.socket_path.empty()) return absl::InvalidArgumentError("--socket must not be empty");
  if (c.share_socket_path.empty()) c.share_socket_path = c.socket_path + ".share";
  if (c.fast_socket_path.empty()) c.fast_socket_path = c.socket_path + ".fast";
  // sockaddr_un.sun_path holds 108 bytes including the terminator.
  for (const auto& [flag, path] :
       {std::pair{"--socket", c.socket_path}, std::pair{"--share_socket", c.share_socket_path},
        std::pair{"--fast_socket", c.fast_socket_path}}) {
    if (path.size() > 107) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " is ", path.size(), " bytes long; Unix socket paths hold 107"));
    }
  }
  if (c.share_socket_path == c.socket_path) {
    return absl::InvalidArgumentError("--share_socket must differ from --socket");
  }
  if (c.fast_socket_path == c.socket_path || c.fast_socket_path == c.share_socket_path) {
    return absl::InvalidArgumentError("--fast_socket must differ from --socket and --share_socket");
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
  if (c.operator_token_file.empty()) {
    c.operator_token_file = DefaultOperatorTokenPath(c.socket_path);
  }
  if (!c.socket_group.empty()) {
    ASSIGN_OR_RETURN(c.socket_gid, ResolveGroup(c.socket_group, "--socket_group"));
  }
  if (!c.operator_group.empty()) {
    ASSIGN_OR_RETURN(c.operator_gid, ResolveGroup(c.operator_group, "--operator_group"));
  }
  RETURN_IF_ERROR(ValidateTcp(c));
  RETURN_IF_ERROR(ValidatePeers(c));
  return ValidateRowLinks(c);
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
