// FastPathClient: the C++ client's end of the daemon's fast path (cachemgr/util/fast_path_wire.h):
// Heartbeat, Allocate, Free, Fork and Step with the RPCs' own messages over a Unix stream
// socket, one call at a time per connection.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/util/fast_path_wire.h"
#include "cachemgr/util/unique_fd.h"
#include "google/protobuf/message.h"

namespace cachemgr::client {

class FastPathClient {
 public:
  // `spin`: how long a call polls for its reply without sleeping before it blocks (a sleeping
  // thread's wake-up costs tens of microseconds on a VM); zero: it blocks at once.
  FastPathClient(std::string path, absl::Duration spin) : path_(std::move(path)), spin_(spin) {}

  // Runs one call: nullopt when the fast path cannot take it (another thread's call holds the
  // connection, or none could be opened; nothing was sent: use gRPC). Otherwise the daemon's
  // status as the RPC would answer it, with `response` filled when OK; UNAVAILABLE when the
  // connection broke after the request was sent (it may have been applied, as with gRPC) and
  // DEADLINE_EXCEEDED after `timeout` (the connection is dropped, so no late reply is read).
  std::optional<absl::Status> Call(FastMethod method, const google::protobuf::Message& request,
                                   google::protobuf::Message* response, absl::Duration timeout);

  // Ends a call in flight (it fails UNAVAILABLE); the next call reconnects. Any thread.
  void Interrupt();

  const std::string& path() const { return path_; }
  // Calls the daemon answered (OK or not) through the fast path.
  uint64_t calls() const { return calls_.load(std::memory_order_relaxed); }

 private:
  // The open connection, opening one if needed; false when none can be opened now.
  bool Connect() ABSL_EXCLUSIVE_LOCKS_REQUIRED(call_mu_);
  std::optional<absl::Status> CallLocked(FastMethod method,
                                         const google::protobuf::Message& request,
                                         google::protobuf::Message* response,
                                         absl::Duration timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(call_mu_);
  void Drop() ABSL_EXCLUSIVE_LOCKS_REQUIRED(call_mu_);

  const std::string path_;
  const absl::Duration spin_;
  absl::Mutex call_mu_;                          // one call at a time
  std::string frame_ ABSL_GUARDED_BY(call_mu_);  // the request being sent, reused
  absl::Time retry_at_ ABSL_GUARDED_BY(call_mu_) = absl::InfinitePast();
  absl::Mutex fd_mu_;  // the descriptor, for Interrupt()
  UniqueFd fd_ ABSL_GUARDED_BY(fd_mu_);
  std::atomic<uint64_t> calls_{0};
};

}  // namespace cachemgr::client
