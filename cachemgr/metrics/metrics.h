// Metrics: the daemon's Prometheus metrics (docs/OPERATIONS.md lists every one), held in
// prometheus-cpp collectables that MetricsEndpoint serves. Counters and histograms are recorded
// as calls happen; pool, client and sequence gauges are read from the CacheManager when
// scraped, so they are never stale.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/event_hub.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

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

  // What a scrape collects: the gauges read at scrape time, then the recorded counters and
  // histograms. Owned by this object (an exposer holding them must stop first).
  std::vector<std::weak_ptr<prometheus::Collectable>> collectables() const;

  // The Prometheus text exposition of collectables() (what a scrape returns, without the
  // exposer's own metrics).
  std::string Render() const;

 private:
  class StateGauges;

  const std::shared_ptr<StateGauges> state_;
  const std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& rpc_total_;
  prometheus::Family<prometheus::Histogram>& rpc_latency_;
  prometheus::Family<prometheus::Counter>& compress_total_;
  prometheus::Family<prometheus::Counter>& compress_bytes_before_;
  prometheus::Family<prometheus::Counter>& compress_bytes_saved_;
  prometheus::Family<prometheus::Histogram>& compress_ratio_;
  prometheus::Counter& fetch_blocks_;
  prometheus::Counter& park_rows_;
  prometheus::Counter& park_blocks_;
  prometheus::Family<prometheus::Counter>& events_total_;

  EventHub* const events_;
  uint64_t subscription_ = 0;
  bool subscribed_ = false;
};

}  // namespace cachemgr
