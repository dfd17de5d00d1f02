#include "cachemgr/metrics/metrics.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "prometheus/metric_type.h"
#include "prometheus/text_serializer.h"

namespace cachemgr {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

// Seconds: 50 us .. 60 s (Compress of long sequences takes seconds).
const prometheus::Histogram::BucketBoundaries& LatencyBounds() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
      0.1,  0.25, 0.5,    1,    2.5,  5,      10,   30,   60};
  return *b;
}

const prometheus::Histogram::BucketBoundaries& RatioBounds() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{0.05, 0.1, 0.15, 0.2, 0.3, 0.4,
                                                                     0.5,  0.6, 0.75, 0.9, 1.0};
  return *b;
}

const char* EventName(EventType type) {
  switch (type) {
    case EventType::kClientAttached:
      return "client_attached";
    case EventType::kClientDetached:
      return "client_detached";
    case EventType::kClientExpired:
      return "client_expired";
    case EventType::kSequenceAllocated:
      return "sequence_allocated";
    case EventType::kSequenceFreed:
      return "sequence_freed";
    case EventType::kSequenceForked:
      return "sequence_forked";
    case EventType::kPoolCreated:
      return "pool_created";
    case EventType::kPoolReleased:
      return "pool_released";
    case EventType::kSequenceCompressed:
      return "sequence_compressed";
    case EventType::kSequenceParked:
      return "sequence_parked";
    case EventType::kSequenceCompressReady:
      return "sequence_compress_ready";
  }
  return "unknown";
}

MetricFamily Gauges(const char* name, const char* help) {
  return MetricFamily{name, help, MetricType::Gauge, {}};
}

void AddGauge(MetricFamily& family, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  family.metric.push_back(std::move(m));
}

// A counter kept by the CacheManager, read at scrape time.
MetricFamily Counter(const char* name, const char* help, double value) {
  MetricFamily family{name, help, MetricType::Counter, {}};
  ClientMetric m;
  m.counter.value = value;
  family.metric.push_back(std::move(m));
  return family;
}

}  // namespace

// The gauges read from the CacheManager at scrape time.
class Metrics::StateGauges : public prometheus::Collectable {
 public:
  StateGauges(const CacheManager* manager, std::string version)
      : manager_(manager), version_(std::move(version)), started_(absl::Now()) {}

  std::vector<MetricFamily> Collect() const override {
    const StatsSnapshot stats = manager_->Stats();
    std::vector<MetricFamily> out;
    out.push_back(Gauges("cachemgr_build_info", "Always 1; the version label says which build."));
    AddGauge(out.back(), {{"version", version_}}, 1);
    out.push_back(Gauges("cachemgr_uptime_seconds", "Seconds since the daemon started."));
    AddGauge(out.back(), {}, absl::ToDoubleSeconds(absl::Now() - started_));
    out.push_back(Gauges("cachemgr_clients", "Attached clients (live leases)."));
    AddGauge(out.back(), {}, static_cast<double>(stats.clients.size()));
    out.push_back(Gauges("cachemgr_sequences", "Sequences held, over all clients."));
    AddGauge(out.back(), {}, stats.num_sequences);
    out.push_back(Gauges(
        "cachemgr_memory_used_bytes",
        "Bytes charged to --memory_budget: pool memory, per-block bookkeeping, input buffers, "
        "sequences' own bookkeeping."));
    AddGauge(out.back(), {}, static_cast<double>(stats.memory_used_bytes));
    out.push_back(Gauges("cachemgr_sequence_bytes",
                         "Of cachemgr_memory_used_bytes, the sequences' own bookkeeping (forks' "
                         "duplicated block tables included)."));
    AddGauge(out.back(), {}, static_cast<double>(stats.sequence_bytes));

    out.push_back(Gauges("cachemgr_pool_bytes", "Bytes of one pool's memory (all layers)."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"model", p.model_name}, {"device", p.device}},
               static_cast<double>(p.bytes));
    }
    out.push_back(Gauges("cachemgr_pool_clients", "Clients attached to one pool."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}}, p.clients);
    }
    struct LayerGauge {
      const char* name;
      const char* help;
      uint32_t LayerOccupancy::*field;
    };
    for (const LayerGauge& g :
         {LayerGauge{"cachemgr_pool_capacity_blocks", "Blocks of one layer's pool.",
                     &LayerOccupancy::capacity_blocks},
          LayerGauge{"cachemgr_pool_used_blocks", "Blocks of one layer referenced by sequences.",
                     &LayerOccupancy::used_blocks},
          LayerGauge{"cachemgr_pool_free_blocks", "Free blocks of one layer.",
                     &LayerOccupancy::free_blocks},
          LayerGauge{"cachemgr_pool_shared_blocks",
                     "Blocks of one layer referenced by more than one sequence (forks).",
                     &LayerOccupancy::shared_blocks},
          LayerGauge{"cachemgr_pool_quarantined_blocks",
                     "Blocks of one layer an expired client released, held back until its "
                     "quarantine ends.",
                     &LayerOccupancy::quarantined_blocks}}) {
      out.push_back(Gauges(g.name, g.help));
      for (const PoolSnapshot& p : stats.pools) {
        for (size_t l = 0; l < p.layers.size(); ++l) {
          AddGauge(out.back(),
                   {{"pool", p.pool_id}, {"device", p.device}, {"layer", absl::StrCat(l)}},
                   p.layers[l].*g.field);
        }
      }
    }
    out.push_back(
        Gauges("cachemgr_pool_arena_bytes",
               "Bytes of codebook layers held in the daemon's arena for one pool's sequences."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}},
               static_cast<double>(p.arena_bytes));
    }
    out.push_back(Gauges("cachemgr_pool_compressed_sequences",
                         "Sequences of one pool that Compress has compressed."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}}, p.compressed_sequences);
    }
    out.push_back(Gauges("cachemgr_pool_prefix_entries",
                         "Stored prefix blocks of one pool (each one block in every layer)."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}}, p.prefix_entries);
    }
    out.push_back(Gauges("cachemgr_pool_prefix_only_blocks",
                         "Blocks of one pool (summed over layers) that only the prefix store "
                         "holds: what eviction can give back."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}},
               static_cast<double>(p.prefix_only_blocks));
    }
    out.push_back(Gauges("cachemgr_pool_prefix_codebook_bytes",
                         "Bytes of one pool's stored prefix layers held as codebooks (host "
                         "memory charged to the budget)."));
    for (const PoolSnapshot& p : stats.pools) {
      AddGauge(out.back(), {{"pool", p.pool_id}, {"device", p.device}},
               static_cast<double>(p.prefix_codebook_bytes));
    }
    const PrefixCounters& c = stats.prefix;
    out.push_back(Counter("cachemgr_prefix_stored_total", "Prefix entries stored (StorePrefix).",
                          static_cast<double>(c.stored)));
    out.push_back(Counter("cachemgr_prefix_hits_total", "Prefix entries LoadPrefix served.",
                          static_cast<double>(c.hits)));
    out.push_back(Counter("cachemgr_prefix_misses_total",
                          "Block hashes LoadPrefix was asked for past the last one it served.",
                          static_cast<double>(c.misses)));
    out.push_back(Counter("cachemgr_prefix_evictions_total",
                          "Prefix entries evicted to make room (least recently used first).",
                          static_cast<double>(c.evictions)));
    out.push_back(Counter("cachemgr_prefix_corrupt_total",
                          "Prefix entries dropped at load because their KV no longer matched "
                          "the digest taken when they were stored.",
                          static_cast<double>(c.corrupt)));
    out.push_back(Counter("cachemgr_prefix_pools_reclaimed_total",
                          "Client-less pools released with their stored prefixes because an "
                          "Attach needed the budget.",
                          static_cast<double>(c.pools_reclaimed)));
    return out;
  }

 private:
  const CacheManager* const manager_;
  const std::string version_;
  const absl::Time started_;
};

Metrics::Metrics(const CacheManager* manager, EventHub* events, std::string version)
    : state_(std::make_shared<StateGauges>(manager, std::move(version))),
      registry_(std::make_shared<prometheus::Registry>()),
      rpc_total_(prometheus::BuildCounter()
                     .Name("cachemgr_rpc_requests_total")
                     .Help("Finished RPCs by method and gRPC status code.")
                     .Register(*registry_)),
      rpc_latency_(prometheus::BuildHistogram()
                       .Name("cachemgr_rpc_latency_seconds")
                       .Help("RPC latency in the daemon (from the call's start to its status), by "
                             "method and code.")
                       .Register(*registry_)),
      compress_total_(prometheus::BuildCounter()
                          .Name("cachemgr_compress_total")
                          .Help("Successful Compress calls by policy.")
                          .Register(*registry_)),
      compress_bytes_before_(
          prometheus::BuildCounter()
              .Name("cachemgr_compress_bytes_before_total")
              .Help("Bytes (whole blocks) the compressed sequences held before Compress, by "
                    "policy.")
              .Register(*registry_)),
      compress_bytes_saved_(
          prometheus::BuildCounter()
              .Name("cachemgr_compress_bytes_saved_total")
              .Help("Bytes Compress freed: before minus after (whole blocks + arena), by policy.")
              .Register(*registry_)),
      compress_ratio_(
          prometheus::BuildHistogram()
              .Name("cachemgr_compress_honest_ratio")
              .Help("Honest byte ratio (bytes held / full KV bytes) Compress achieved, by policy.")
              .Register(*registry_)),
      fetch_blocks_(prometheus::BuildCounter()
                        .Name("cachemgr_fetch_reconstructed_blocks_total")
                        .Help("Blocks Fetch allocated to reconstruct codebook layers.")
                        .Register(*registry_)
                        .Add({})),
      park_rows_(prometheus::BuildCounter()
                     .Name("cachemgr_park_coded_rows_total")
                     .Help("Rows appended after Fetch that Park coded into codebooks (per layer).")
                     .Register(*registry_)
                     .Add({})),
      park_blocks_(prometheus::BuildCounter()
                       .Name("cachemgr_park_released_blocks_total")
                       .Help("Blocks Park released.")
                       .Register(*registry_)
                       .Add({})),
      events_total_(prometheus::BuildCounter()
                        .Name("cachemgr_events_total")
                        .Help("State changes published (what Watch streams), by type; "
                              "client_expired counts lost leases.")
                        .Register(*registry_)),
      events_(events) {
  if (events_ != nullptr) {
    subscription_ = events_->Subscribe([this](const Event* e) {
      if (e == nullptr) return;
      events_total_.Add({{"type", EventName(e->type)}}).Increment();
    });
    subscribed_ = true;
  }
}

Metrics::~Metrics() {
  if (subscribed_) events_->Unsubscribe(subscription_);
}

void Metrics::ObserveRpc(const std::string& method, const std::string& code,
                         absl::Duration latency) {
  const prometheus::Labels labels = {{"method", method}, {"code", code}};
  rpc_total_.Add(labels).Increment();
  rpc_latency_.Add(labels, LatencyBounds()).Observe(absl::ToDoubleSeconds(latency));
}

void Metrics::ObserveCompress(const std::string& policy, const CompressResult& r) {
  const prometheus::Labels labels = {{"policy", policy}};
  compress_total_.Add(labels).Increment();
  compress_bytes_before_.Add(labels).Increment(static_cast<double>(r.bytes_before));
  // A counter never goes down: a call that holds more than before (codebooks larger than the
  // blocks they replace) adds nothing.
  compress_bytes_saved_.Add(labels).Increment(
      r.bytes_before > r.bytes_after ? static_cast<double>(r.bytes_before - r.bytes_after) : 0);
  compress_ratio_.Add(labels, RatioBounds()).Observe(r.honest_ratio);
}

void Metrics::ObserveFetch(const std::vector<FetchedLayerResult>& layers) {
  for (const auto& l : layers) fetch_blocks_.Increment(l.new_blocks);
}

void Metrics::ObservePark(const std::vector<ParkedLayerResult>& layers) {
  for (const auto& l : layers) {
    park_rows_.Increment(l.rows_appended);
    park_blocks_.Increment(l.blocks_released);
  }
}

std::vector<std::weak_ptr<prometheus::Collectable>> Metrics::collectables() const {
  return {state_, registry_};
}

std::string Metrics::Render() const {
  std::vector<MetricFamily> families = state_->Collect();
  for (MetricFamily& f : registry_->Collect()) families.push_back(std::move(f));
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace cachemgr
