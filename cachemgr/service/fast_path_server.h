// FastPathServer: serves the fast path (util/fast_path_wire.h), a session's bookkeeping calls
// (Heartbeat, Allocate, Free, Fork, Step) over a Unix stream socket without gRPC.
//
// Same calls, same answers: each request runs the gRPC handler's own body (session_calls.h)
// with a Caller built the same way (the request's session token, the peer's kernel credentials
// recorded when its connection was admitted, the arrival time on the manager's clock), and its
// reply carries the status the gRPC call would answer (code and message), including for a
// request that does not parse. Connections come from a PeerListener (the same PeerPolicy and
// connection caps as the gRPC socket) through Adopt().
//
// One thread serves every connection (epoll, non-blocking sockets), one request at a time, in
// arrival order per connection and round robin across connections; calls are microseconds of
// bookkeeping behind the manager's lock, so a thread per connection would only add wake-ups.
// After answering it keeps polling for `spin` before it sleeps (see Start).
// A peer that stops reading costs only itself: its replies queue (reading from it pauses once
// kMaxQueuedReplyBytes wait) while others are served. A request frame over
// kMaxFastRequestBytes, or empty, is answered with RESOURCE_EXHAUSTED / INVALID_ARGUMENT and the
// connection is closed; a partial frame left when the peer goes away is dropped unread (nothing
// of it was applied). A byte that names no method is answered UNIMPLEMENTED and the connection
// goes on.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/caller.h"
#include "cachemgr/metrics/metrics.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

// Replies waiting for a slow reader past which the server stops reading its requests. A
// connection holds at most about kMaxFastRequestBytes of requests plus this (or one reply,
// which --max_reply_bytes bounds, when that is larger).
inline constexpr size_t kMaxQueuedReplyBytes = size_t{1} << 20;

class FastPathServer {
 public:
  // Starts the serving thread. `manager` and `metrics` (may be null) must outlive the server.
  // `spin`: after answering, the thread polls without sleeping for this long before it blocks,
  // so that a client's next request finds it awake (on a VM a sleeping thread's wake-up costs
  // tens of microseconds: docs/PERF.md, "The fast path"); zero: it blocks at once.
  static absl::StatusOr<std::unique_ptr<FastPathServer>> Start(CacheManager* manager,
                                                               Metrics* metrics,
                                                               absl::Duration spin);
  ~FastPathServer();  // Stop()

  // Takes an admitted connection (non-blocking, close-on-exec) and its peer's credentials
  // (nullopt: calls made as the manager's in-process callers, for the fuzz target). Thread-safe;
  // a connection adopted after Stop() is closed.
  void Adopt(UniqueFd connection, std::optional<PeerCredentials> peer);
  // From now on every request is answered UNAVAILABLE "cachemgrd is shutting down".
  void BeginDrain() { draining_.store(true); }
  // Stops serving and closes every connection; a request being handled finishes first.
  // Idempotent.
  void Stop();

  // Open connections (for tests and logs).
  size_t connections() const;

 private:
  struct Connection;

  FastPathServer(CacheManager* manager, Metrics* metrics, absl::Duration spin);
  void Serve();
  void AdoptPending();
  // Reads what the socket has, answers the complete requests, sends; false when the connection
  // is finished (closed or broken).
  bool Service(Connection& c, uint32_t events);
  void Answer(Connection& c, std::string_view body);
  void UpdateInterest(Connection& c);
  void Close(int fd);

  CacheManager* const manager_;
  Metrics* const metrics_;
  const absl::Duration spin_;
  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd: new connections or Stop()
  std::thread thread_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> stopping_{false};

  mutable absl::Mutex mu_;
  std::vector<std::pair<UniqueFd, std::optional<PeerCredentials>>> pending_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;

  // Serving thread only.
  absl::flat_hash_map<int, std::unique_ptr<Connection>> connections_;
};

}  // namespace cachemgr
