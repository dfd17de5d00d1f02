// WorkerPool: a fixed set of threads running queued tasks in FIFO order. The gRPC service hands
// it the calls that do seconds of CPU work (Compress, Fetch, Park) so they never occupy gRPC's
// callback threads, which must stay free for the microsecond calls; the CacheManager hands its
// one thread the background Compresses.
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace cachemgr {

class WorkerPool {
 public:
  // REQUIRES: num_threads >= 1.
  explicit WorkerPool(size_t num_threads);
  // Runs every task already queued, then joins the threads.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Thread-safe. Tasks must not throw.
  void Submit(std::function<void()> task);

 private:
  void Run();
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace cachemgr
