#include "tools/soak/op_stats.h"

#include <algorithm>
#include <cmath>

namespace cachemgr::soak {

int LatencyBucket(absl::Duration latency) {
  const double us = absl::ToDoubleMicroseconds(latency);
  if (!(us > 1.0)) return 0;
  const int bucket = static_cast<int>(std::floor(8.0 * std::log2(us)));
  return std::clamp(bucket, 0, kLatencyBuckets - 1);
}

void OpStats::Record(const std::string& op, const std::string& outcome, absl::Duration latency) {
  PerOp& per = ops_[op];
  ++per.outcomes[outcome];
  if (outcome == "OK") ++per.buckets[LatencyBucket(latency)];
}

nlohmann::json OpStats::TakeDelta() {
  if (ops_.empty()) return nullptr;
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [op, per] : ops_) {
    nlohmann::json& o = out[op];
    o["outcomes"] = per.outcomes;
    nlohmann::json buckets = nlohmann::json::object();
    for (const auto& [bucket, count] : per.buckets) buckets[std::to_string(bucket)] = count;
    o["latency_buckets"] = std::move(buckets);
  }
  ops_.clear();
  return out;
}

}  // namespace cachemgr::soak
