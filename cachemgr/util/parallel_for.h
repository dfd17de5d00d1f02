// ParallelFor: runs fn(i) for i in [0, n) on up to `threads` threads (the caller's included),
// handing indices out one at a time, and returns the error of the lowest failing index, if any
// (every index still runs). Used for per-layer work (compression, the daemon's pool reads).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace cachemgr {

inline absl::Status ParallelFor(uint32_t n, uint32_t threads,
                                const std::function<absl::Status(uint32_t)>& fn) {
  std::vector<absl::Status> status(n);
  std::atomic<uint32_t> next{0};
  auto work = [&] {
    for (uint32_t i = next++; i < n; i = next++) status[i] = fn(i);
  };
  std::vector<std::thread> helpers;
  for (uint32_t t = 1; t < std::min(threads, n); ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  for (absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
