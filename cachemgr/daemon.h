// Daemon: wires a DaemonConfig into a running cachemgrd — backend, CacheManager, lease reaper,
// share channel, gRPC server (Unix socket, optional TCP), health and reflection, Prometheus
// metrics endpoint — and tears it down in order.
#pragma once

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
#include "cachemgr/service/cachemgr_service.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/clock.h"

namespace grpc {
class Server;
}

namespace cachemgr {

class Daemon {
 public:
  // Everything is listening when this returns. FAILED_PRECONDITION when another daemon listens
  // on the socket; INVALID_ARGUMENT when the socket's directory is missing.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const DaemonConfig& config);

  // Blocks until RequestShutdown(), then shuts down gracefully: health NOT_SERVING, Watch
  // streams ended, no new calls accepted, in-flight calls finished (cancelled after
  // shutdown_grace), every client detached and all pool memory released, sockets removed.
  void Wait();

  // Thread-safe and idempotent. Not async-signal-safe: call from a thread that waited for the
  // signal (main uses sigwait).
  void RequestShutdown();

  ~Daemon();

 private:
  explicit Daemon(const DaemonConfig& config);
  void Shutdown();
  void ReapLeases();

  const DaemonConfig config_;
  RealClock clock_;
  EventHub events_;
  std::unique_ptr<DeviceBackend> backend_;
  std::unique_ptr<CacheManager> manager_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<CacheManagerService> service_;
  std::unique_ptr<ShareChannelServer> share_server_;
  // Descriptors of the share channel's current reply (only its thread touches them).
  std::vector<UniqueFd> shared_fds_in_flight_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsEndpoint> metrics_server_;
  std::thread reaper_;
  absl::Notification shutdown_requested_;
  bool shut_down_ = false;
};

}  // namespace cachemgr
