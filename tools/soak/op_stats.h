// OpStats: per operation type, how many calls ended how, and a latency histogram of the
// successful ones, reported as deltas (what happened since the last report) so that a driver can
// add up the reports of clients that were killed at any point.
//
// Latency buckets are logarithmic, 8 per doubling from 1 us (bucket i holds latencies below
// 2^((i+1)/8) us; the last one everything above ~1.2 hours), so a percentile read from merged
// buckets is within 9% of the true value.
//
// Not thread-safe; one client thread owns it.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace cachemgr::soak {

inline constexpr int kLatencyBuckets = 8 * 32;

// The bucket of `latency` (see the file comment).
int LatencyBucket(absl::Duration latency);

class OpStats {
 public:
  // One call of `op` that ended with `outcome` ("OK", a status code name, or another word the
  // caller chooses); the latency counts toward the histogram only for "OK".
  void Record(const std::string& op, const std::string& outcome, absl::Duration latency);

  // {"op": {"outcomes": {"OK": n, ...}, "latency_buckets": {"<bucket>": n, ...}}, ...} for
  // what was recorded since the last call, then forgets it. Null when nothing was recorded.
  nlohmann::json TakeDelta();

 private:
  struct PerOp {
    std::map<std::string, uint64_t> outcomes;
    std::map<int, uint64_t> buckets;
  };
  std::map<std::string, PerOp> ops_;
};

}  // namespace cachemgr::soak
