// MetricsHttpServer: a minimal HTTP/1.0 server for Prometheus scrapes. GET /metrics answers
// 200 with the text `render` returns (Content-Type text/plain; version=0.0.4); anything else
// 404 (or 405 for another method). One connection at a time, on one background thread; a
// client silent for a second is dropped.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {

class MetricsHttpServer {
 public:
  // `address` is "host:port" (IPv4 or a name; port 0 picks a free one, see port()).
  // UNAVAILABLE when it cannot listen there, INVALID_ARGUMENT for a malformed address.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> render);
  ~MetricsHttpServer();  // Stops.

  void Stop();
  int port() const { return port_; }

 private:
  MetricsHttpServer(UniqueFd listener, int port, std::function<std::string()> render);
  void Serve();
  void Handle(int fd);

  UniqueFd listener_;
  UniqueFd wake_read_, wake_write_;
  int port_;
  std::function<std::string()> render_;
  std::atomic<bool> stopped_{false};
  std::thread thread_;
};

}  // namespace cachemgr
