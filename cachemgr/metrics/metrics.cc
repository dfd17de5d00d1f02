#include "cachemgr/metrics/metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"

namespace cachemgr {
namespace {

// Seconds: 50 us .. 60 s (Compress of long sequences takes seconds).
const std::vector<double>& LatencyBounds() {
  static const auto* b =
      new std::vector<double>{5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                              0.1,  0.25, 0.5,    1,    2.5,  5,      10,   30,   60};
  return *b;
}

const std::vector<double>& RatioBounds() {
  static const auto* b =
      new std::vector<double>{0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0};
  return *b;
}

std::string Escape(const std::string& v) {
  return absl::StrReplaceAll(v, {{"\\", "\\\\"}, {"\"", "\\\""}, {"\n", "\\n"}});
}

std::string Labels(std::initializer_list<std::pair<const char*, std::string>> labels) {
  std::string out;
  for (const auto& [k, v] : labels) {
    absl::StrAppend(&out, out.empty() ? "{" : ",", k, "=\"", Escape(v), "\"");
  }
  return out.empty() ? out : out + "}";
}

void Header(std::string* out, const char* name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

std::string Number(double v) { return absl::StrFormat("%.17g", v); }

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
  }
  return "unknown";
}

}  // namespace

Metrics::Metrics(const CacheManager* manager, EventHub* events, std::string version)
    : manager_(manager), events_(events), version_(std::move(version)), started_(absl::Now()) {
  if (events_ != nullptr) {
    subscription_ = events_->Subscribe([this](const Event* e) {
      if (e == nullptr) return;
      absl::MutexLock lock(&mu_);
      ++events_total_[EventName(e->type)];
    });
    subscribed_ = true;
  }
}

Metrics::~Metrics() {
  if (subscribed_) events_->Unsubscribe(subscription_);
}

void Metrics::Observe(Histogram& h, const std::vector<double>& bounds, double value) {
  if (h.counts.empty()) h.counts.assign(bounds.size() + 1, 0);
  const size_t bucket = std::lower_bound(bounds.begin(), bounds.end(), value) - bounds.begin();
  ++h.counts[bucket];
  h.sum += value;
  ++h.count;
}

void Metrics::ObserveRpc(const std::string& method, const std::string& code,
                         absl::Duration latency) {
  absl::MutexLock lock(&mu_);
  ++rpc_total_[{method, code}];
  Observe(rpc_latency_[{method, code}], LatencyBounds(), absl::ToDoubleSeconds(latency));
}

void Metrics::ObserveCompress(const std::string& policy, const CompressResult& r) {
  absl::MutexLock lock(&mu_);
  ++compress_total_[policy];
  compress_bytes_before_[policy] += r.bytes_before;
  compress_bytes_after_[policy] += r.bytes_after;
  Observe(compress_ratio_[policy], RatioBounds(), r.honest_ratio);
}

void Metrics::ObserveFetch(const std::vector<FetchedLayerResult>& layers) {
  absl::MutexLock lock(&mu_);
  for (const auto& l : layers) fetch_blocks_ += l.new_blocks;
}

void Metrics::ObservePark(const std::vector<ParkedLayerResult>& layers) {
  absl::MutexLock lock(&mu_);
  for (const auto& l : layers) {
    park_rows_ += l.rows_appended;
    park_blocks_ += l.blocks_released;
  }
}

std::string Metrics::Render() const {
  const StatsSnapshot stats = manager_->Stats();
  std::string out;
  Header(&out, "cachemgr_build_info", "gauge", "Always 1; the version label says which build.");
  absl::StrAppend(&out, "cachemgr_build_info", Labels({{"version", version_}}), " 1\n");
  Header(&out, "cachemgr_uptime_seconds", "gauge", "Seconds since the daemon started.");
  absl::StrAppend(&out, "cachemgr_uptime_seconds ",
                  Number(absl::ToDoubleSeconds(absl::Now() - started_)), "\n");
  Header(&out, "cachemgr_clients", "gauge", "Attached clients (live leases).");
  absl::StrAppend(&out, "cachemgr_clients ", stats.clients.size(), "\n");
  Header(&out, "cachemgr_sequences", "gauge", "Sequences held, over all clients.");
  absl::StrAppend(&out, "cachemgr_sequences ", stats.num_sequences, "\n");
  Header(&out, "cachemgr_memory_used_bytes", "gauge",
         "Bytes charged to --memory_budget: pool memory, per-block bookkeeping, input buffers.");
  absl::StrAppend(&out, "cachemgr_memory_used_bytes ", stats.memory_used_bytes, "\n");

  Header(&out, "cachemgr_pool_bytes", "gauge", "Bytes of one pool's memory (all layers).");
  for (const PoolSnapshot& p : stats.pools) {
    absl::StrAppend(&out, "cachemgr_pool_bytes",
                    Labels({{"pool", p.pool_id}, {"model", p.model_name}, {"device", p.device}}),
                    " ", p.bytes, "\n");
  }
  Header(&out, "cachemgr_pool_clients", "gauge", "Clients attached to one pool.");
  for (const PoolSnapshot& p : stats.pools) {
    absl::StrAppend(&out, "cachemgr_pool_clients",
                    Labels({{"pool", p.pool_id}, {"device", p.device}}), " ", p.clients, "\n");
  }
  for (const auto& [name, help, field] :
       {std::tuple{"cachemgr_pool_capacity_blocks", "Blocks of one layer's pool.",
                   &LayerOccupancy::capacity_blocks},
        std::tuple{"cachemgr_pool_used_blocks", "Blocks of one layer referenced by sequences.",
                   &LayerOccupancy::used_blocks},
        std::tuple{"cachemgr_pool_free_blocks", "Free blocks of one layer.",
                   &LayerOccupancy::free_blocks},
        std::tuple{"cachemgr_pool_shared_blocks",
                   "Blocks of one layer referenced by more than one sequence (forks).",
                   &LayerOccupancy::shared_blocks},
        std::tuple{"cachemgr_pool_quarantined_blocks",
                   "Blocks of one layer an expired client released, held back until its "
                   "quarantine ends.",
                   &LayerOccupancy::quarantined_blocks}}) {
    Header(&out, name, "gauge", help);
    for (const PoolSnapshot& p : stats.pools) {
      for (size_t l = 0; l < p.layers.size(); ++l) {
        absl::StrAppend(
            &out, name,
            Labels({{"pool", p.pool_id}, {"device", p.device}, {"layer", absl::StrCat(l)}}), " ",
            p.layers[l].*field, "\n");
      }
    }
  }
  Header(&out, "cachemgr_pool_arena_bytes", "gauge",
         "Bytes of codebook layers held in the daemon's arena for one pool's sequences.");
  for (const PoolSnapshot& p : stats.pools) {
    absl::StrAppend(&out, "cachemgr_pool_arena_bytes",
                    Labels({{"pool", p.pool_id}, {"device", p.device}}), " ", p.arena_bytes, "\n");
  }
  Header(&out, "cachemgr_pool_compressed_sequences", "gauge",
         "Sequences of one pool that Compress has compressed.");
  for (const PoolSnapshot& p : stats.pools) {
    absl::StrAppend(&out, "cachemgr_pool_compressed_sequences",
                    Labels({{"pool", p.pool_id}, {"device", p.device}}), " ",
                    p.compressed_sequences, "\n");
  }

  absl::MutexLock lock(&mu_);
  Header(&out, "cachemgr_rpc_requests_total", "counter",
         "Finished RPCs by method and gRPC status code.");
  for (const auto& [key, n] : rpc_total_) {
    absl::StrAppend(&out, "cachemgr_rpc_requests_total",
                    Labels({{"method", key.first}, {"code", key.second}}), " ", n, "\n");
  }
  auto histogram = [&out](const char* name, const std::string& labels_prefix, const Histogram& h,
                          const std::vector<double>& bounds) {
    uint64_t cumulative = 0;
    for (size_t b = 0; b <= bounds.size(); ++b) {
      cumulative += h.counts.empty() ? 0 : h.counts[b];
      absl::StrAppend(&out, name, "_bucket{", labels_prefix, labels_prefix.empty() ? "" : ",",
                      "le=\"", b < bounds.size() ? Number(bounds[b]) : "+Inf", "\"} ", cumulative,
                      "\n");
    }
    absl::StrAppend(&out, name, "_sum{", labels_prefix, "} ", Number(h.sum), "\n", name, "_count{",
                    labels_prefix, "} ", h.count, "\n");
  };
  Header(&out, "cachemgr_rpc_latency_seconds", "histogram",
         "RPC latency in the daemon (from the call's start to its status), by method and code.");
  for (const auto& [key, h] : rpc_latency_) {
    histogram("cachemgr_rpc_latency_seconds",
              absl::StrCat("method=\"", key.first, "\",code=\"", key.second, "\""), h,
              LatencyBounds());
  }
  Header(&out, "cachemgr_compress_total", "counter", "Successful Compress calls by policy.");
  for (const auto& [policy, n] : compress_total_) {
    absl::StrAppend(&out, "cachemgr_compress_total", Labels({{"policy", policy}}), " ", n, "\n");
  }
  Header(&out, "cachemgr_compress_bytes_before_total", "counter",
         "Bytes (whole blocks) the compressed sequences held before Compress, by policy.");
  for (const auto& [policy, n] : compress_bytes_before_) {
    absl::StrAppend(&out, "cachemgr_compress_bytes_before_total", Labels({{"policy", policy}}), " ",
                    n, "\n");
  }
  Header(&out, "cachemgr_compress_bytes_saved_total", "counter",
         "Bytes Compress freed: before minus after (whole blocks + arena), by policy.");
  for (const auto& [policy, before] : compress_bytes_before_) {
    const uint64_t after = compress_bytes_after_.at(policy);
    absl::StrAppend(&out, "cachemgr_compress_bytes_saved_total", Labels({{"policy", policy}}), " ",
                    before > after ? before - after : 0, "\n");
  }
  Header(&out, "cachemgr_compress_honest_ratio", "histogram",
         "Honest byte ratio (bytes held / full KV bytes) Compress achieved, by policy.");
  for (const auto& [policy, h] : compress_ratio_) {
    histogram("cachemgr_compress_honest_ratio", absl::StrCat("policy=\"", Escape(policy), "\""), h,
              RatioBounds());
  }
  Header(&out, "cachemgr_fetch_reconstructed_blocks_total", "counter",
         "Blocks Fetch allocated to reconstruct codebook layers.");
  absl::StrAppend(&out, "cachemgr_fetch_reconstructed_blocks_total ", fetch_blocks_, "\n");
  Header(&out, "cachemgr_park_coded_rows_total", "counter",
         "Rows appended after Fetch that Park coded into codebooks (per layer).");
  absl::StrAppend(&out, "cachemgr_park_coded_rows_total ", park_rows_, "\n");
  Header(&out, "cachemgr_park_released_blocks_total", "counter", "Blocks Park released.");
  absl::StrAppend(&out, "cachemgr_park_released_blocks_total ", park_blocks_, "\n");
  Header(&out, "cachemgr_events_total", "counter",
         "State changes published (what Watch streams), by type; client_expired counts lost "
         "leases.");
  for (const auto& [type, n] : events_total_) {
    absl::StrAppend(&out, "cachemgr_events_total", Labels({{"type", type}}), " ", n, "\n");
  }
  return out;
}

}  // namespace cachemgr
