// Daemon: wires a DaemonConfig into a running cachemgrd — instance locks, backend,
// CacheManager, lease reaper, share channel, operator credential, gRPC server (its own Unix
// socket listener with peer checks, optional TCP with TLS), health with a self-probe,
// reflection, Prometheus metrics endpoint — and tears it down in order.
#pragma once

#include <atomic>
#include <memory>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "cachemgr/backend/device_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/config.h"
#include "cachemgr/event_hub.h"
#include "cachemgr/metrics/metrics.h"
#include "cachemgr/metrics/metrics_endpoint.h"
#include "cachemgr/peers/peer_directory.h"
#include "cachemgr/peers/row_links.h"
#include "cachemgr/service/cachemgr_service.h"
#include "cachemgr/service/fast_path_server.h"
#include "cachemgr/service/health_probe.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/peer_listener.h"
#include "cachemgr/service/peer_policy.h"
#include "cachemgr/service/peer_service.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/clock.h"
#include "cachemgr/util/instance_lock.h"

namespace grpc {
class Server;
}

namespace cachemgr {

class Daemon {
 public:
  // Everything is listening when this returns. Raises the descriptor limit (RLIMIT_NOFILE) to
  // its hard limit first. FAILED_PRECONDITION when another daemon holds the socket's or the
  // share socket's lock or listens there, or when the descriptor limit cannot hold
  // --max_clients; INVALID_ARGUMENT when the socket's directory is missing.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const DaemonConfig& config);

  // Blocks until RequestShutdown() (or, with exit_when_unserving, until the health probe found
  // that the daemon can no longer serve), then shuts down gracefully: health NOT_SERVING, Watch
  // streams ended, no new calls accepted, in-flight calls finished (cancelled after
  // shutdown_grace), every client detached and all pool memory released, sockets, lock and
  // operator credential files removed. OK after a requested shutdown; UNAVAILABLE after an
  // unserving one.
  absl::Status Wait();

  // Thread-safe and idempotent. Not async-signal-safe: call from a thread that waited for the
  // signal (main uses sigwait).
  void RequestShutdown();

  ~Daemon();

 private:
  explicit Daemon(const DaemonConfig& config);
  void Shutdown();
  void ReapLeases();
  // The health probe's verdict changed.
  void OnServingChanged(bool serving, const std::string& why);

  const DaemonConfig config_;
  RealClock clock_;
  EventHub events_;
  std::unique_ptr<InstanceLock> socket_lock_;
  std::unique_ptr<InstanceLock> share_socket_lock_;
  std::unique_ptr<InstanceLock> fast_socket_lock_;
  std::unique_ptr<PeerPolicy> peer_policy_;
  std::unique_ptr<OperatorToken> operator_token_;
  // One per device (--cuda_device may name several GPUs); the first is the default.
  std::vector<std::unique_ptr<DeviceBackend>> backends_;
  std::unique_ptr<CacheManager> manager_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<PeerDirectory> peers_;
  // Null without --row_links. Outlives both services (receivers' link threads use it).
  std::unique_ptr<RowLinks> row_links_;
  std::unique_ptr<PeerListener> peer_listener_;
  std::unique_ptr<CacheManagerService> service_;
  std::unique_ptr<PeerService> peer_service_;
  std::unique_ptr<ShareChannelServer> share_server_;
  // The fast path: its socket's listener (the gRPC socket's peer checks) and its server.
  std::unique_ptr<FastPathServer> fast_server_;
  std::unique_ptr<PeerListener> fast_listener_;
  // Descriptors of the share channel's current reply (only its thread touches them).
  std::vector<UniqueFd> shared_fds_in_flight_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsEndpoint> metrics_server_;
  std::unique_ptr<HealthProbe> health_probe_;
  std::thread reaper_;
  absl::Notification shutdown_requested_;
  // Set (before shutdown is requested) when the probe ended the daemon.
  std::atomic<bool> stopped_unserving_{false};
  bool shut_down_ = false;
};

}  // namespace cachemgr
