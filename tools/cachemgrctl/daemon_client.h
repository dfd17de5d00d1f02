// cachemgrctl's connection to a running cachemgrd: the flags every daemon command shares and
// the gRPC plumbing behind them.
//
//   --socket=PATH       the daemon's Unix socket (default $CACHEMGR_SOCKET, else
//                       /run/cachemgr/cachemgr.sock)
//   --address=HOST:PORT TCP instead of the socket; with --token_file
//   --token_file=FILE   the bearer token TCP callers send (first line of FILE)
//   --tls               TCP over TLS (implied by the --tls_* flags), verified with the system's
//                       roots or --tls_ca_file=FILE; --tls_cert_file / --tls_key_file: this
//                       client's certificate for mutual TLS
//   --operator_token_file=FILE  the operator credential (default: SOCKET.operator when this
//                       user can read it; over TCP none unless given)
//   --timeout=SECONDS   per-call deadline (default 10; Watch has none)
//   --json              machine-readable output (proto3 JSON mapping, field names as in the
//                       .proto) instead of tables
//
// Daemon commands carry no session token. With the operator credential they see and act on
// every client; without it the daemon shows only this user's clients and sequences and refuses
// free, compress and watch.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"
#include "tools/cachemgrctl/flags.h"

namespace google::protobuf {
class Message;
}

namespace cachemgr::ctl {

struct DaemonOptions {
  std::string target;  // gRPC target: "unix:/path" or "host:port"
  std::string token;   // TCP bearer token; empty over the socket
  // TLS for a TCP target: the PEM contents of --tls_ca_file (empty: the system's roots),
  // --tls_cert_file and --tls_key_file.
  bool tls = false;
  std::string tls_ca_pem, tls_cert_pem, tls_key_pem;
  std::string operator_token;  // the operator credential; empty: none
  absl::Duration timeout = absl::Seconds(10);
  bool json = false;
};

// The shared flag names, to append to a command's own.
std::vector<std::string> DaemonFlagNames();

struct DaemonCommandArgs {
  Flags flags;  // the command's own flags and the shared ones
  DaemonOptions options;
};

// Parses `args` with the command's `own` flag names plus the shared ones.
absl::StatusOr<DaemonCommandArgs> ParseDaemonCommand(const std::vector<std::string>& args,
                                                     std::vector<std::string> own,
                                                     const std::string& command);

// INVALID_ARGUMENT naming the flag (both --socket and --address, an unreadable token file or
// named operator token file, TLS flags without --address, a non-positive timeout).
absl::StatusOr<DaemonOptions> ParseDaemonOptions(const Flags& flags);

class DaemonClient {
 public:
  explicit DaemonClient(const DaemonOptions& options);

  v1::CacheManager::Stub& stub() { return *stub_; }
  grpc::health::v1::Health::Stub& health() { return *health_; }

  // A context with the call deadline (unless `deadline` is false), the bearer token and the
  // operator credential.
  std::unique_ptr<grpc::ClientContext> Context(bool deadline = true) const;

  const DaemonOptions& options() const { return options_; }

 private:
  DaemonOptions options_;
  std::unique_ptr<v1::CacheManager::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// "NOT_FOUND: sequence_id: no sequence \"x\"" (the daemon's message names the field).
std::string StatusText(const grpc::Status& status);

// The proto3 JSON mapping with the .proto's field names; default values printed.
// `indent`: pretty-printed with a trailing newline; otherwise one line, no newline.
std::string ToJson(const google::protobuf::Message& message, bool indent = true);

}  // namespace cachemgr::ctl
