// WorkerPool: a fixed set of threads running queued tasks. The gRPC service hands it the calls
// that do seconds of CPU work (Compress, Fetch, Park) so they never occupy gRPC's callback
// threads, which must stay free for the microsecond calls; the CacheManager hands its one thread
// the background Compresses, keyed by client so that one client's queue cannot hold back
// another's.
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
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

  // Thread-safe. Tasks must not throw. Tasks of one key start in the order they were submitted;
  // the keys with tasks waiting take turns (round robin: after a task of key A starts, every
  // other waiting key starts one before A starts its next). Submit(task) is Submit("", task), so
  // a pool used without keys is FIFO.
  void Submit(std::string key, std::function<void()> task);
  void Submit(std::function<void()> task) { Submit(std::string(), std::move(task)); }

 private:
  void Run();
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  // Each key's waiting tasks, and the keys with tasks waiting in the order they take turns.
  absl::flat_hash_map<std::string, std::deque<std::function<void()>>> tasks_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> turns_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace cachemgr
