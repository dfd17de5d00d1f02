// Metrics: the daemon's Prometheus metrics (docs/OPERATIONS.md lists every one). Counters and
// histograms are recorded as calls happen; pool, client and sequence gauges are read from the
// CacheManager when scraped, so they are never stale.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/event_hub.h"

namespace cachemgr {

class Metrics {
 public:
  // `manager` must outlive the metrics; `events` (may be null) is subscribed to for the event
  // counters until the destructor.
  Metrics(const CacheManager* manager, EventHub* events, std::string version);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished RPC: its method ("Allocate"), status code name ("OK", "NOT_FOUND") and latency.
  void ObserveRpc(const std::string& method, const std::string& code, absl::Duration latency);
  void ObserveCompress(const std::string& policy, const CompressResult& result);
  void ObserveFetch(const std::vector<FetchedLayerResult>& layers);
  void ObservePark(const std::vector<ParkedLayerResult>& layers);

  // The Prometheus text exposition (format 0.0.4).
  std::string Render() const;

 private:
  struct Histogram {
    std::vector<uint64_t> counts;  // per bucket (cumulative when rendered), + Inf last
    double sum = 0;
    uint64_t count = 0;
  };
  static void Observe(Histogram& h, const std::vector<double>& bounds, double value);

  const CacheManager* const manager_;
  EventHub* const events_;
  const std::string version_;
  const absl::Time started_;
  uint64_t subscription_ = 0;
  bool subscribed_ = false;

  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, std::string>, uint64_t> rpc_total_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, std::string>, Histogram> rpc_latency_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> compress_total_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> compress_bytes_before_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> compress_bytes_after_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Histogram> compress_ratio_ ABSL_GUARDED_BY(mu_);
  uint64_t fetch_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t park_rows_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t park_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, uint64_t> events_total_ ABSL_GUARDED_BY(mu_);
};

}  // namespace cachemgr
