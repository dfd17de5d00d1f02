// MetricsEndpoint: the Prometheus scrape endpoint (--metrics_address), prometheus-cpp's Exposer
// on civetweb. GET /metrics answers 200 with the text format (Content-Type
// "text/plain; charset=utf-8") of the registered collectables plus the exposer's own
// exposer_* metrics; other paths 404; other methods 405 (Allow: GET).
//
// Connections are served by a pool of kMetricsServerThreads threads; a thread waits for a
// request for about kMetricsRequestTimeout (civetweb's request_timeout_ms; a peer trickling its
// request is dropped within a few of them), so fewer idle connections than threads cost a
// scrape nothing, and each further batch of kMetricsServerThreads idle connections delays it by
// about kMetricsRequestTimeout. Connections are not kept alive.
//
// Start, Stop and the destructor: from one thread. Scrapes run on civetweb's threads.
// civetweb's messages go to the JSON log ("metrics endpoint: civetweb").
#pragma once

#include <netinet/in.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"

namespace cachemgr {

inline constexpr int kMetricsServerThreads = 32;
inline constexpr absl::Duration kMetricsRequestTimeout = absl::Seconds(1);

class MetricsEndpoint {
 public:
  // Listens on `address`, "host:port": host an IPv4 address, a name resolved to one, or empty
  // for every interface; port 0 picks a free one (see port()). Serves `collectables` (held
  // weakly: they must outlive Stop(), or drop out of scrapes when they expire; with none,
  // /metrics is 404 too).
  // INVALID_ARGUMENT for a malformed address or a host that does not resolve (the message
  // names --metrics_address); UNAVAILABLE when it cannot listen there (with civetweb's reason).
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address, std::vector<std::weak_ptr<prometheus::Collectable>> collectables);
  ~MetricsEndpoint();  // Stops.

  // Closes the listener and every connection, waiting for scrapes in flight and for threads
  // still reading an idle connection (up to about kMetricsRequestTimeout). Idempotent.
  void Stop();
  // The port listened on (the one picked for port 0).
  int port() const;

 private:
  MetricsEndpoint(std::unique_ptr<prometheus::Exposer> exposer, const sockaddr_in& wake_address);

  std::unique_ptr<prometheus::Exposer> exposer_;
  // Where Stop() connects to wake civetweb's listening thread: the listening address (loopback
  // for every interface) and port.
  const sockaddr_in wake_address_;
};

}  // namespace cachemgr
