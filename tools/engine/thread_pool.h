// ThreadPool: a fixed set of worker threads for data-parallel loops (the engine's matmuls and
// attention). ParallelFor splits [0, n) into one contiguous range per thread and returns when
// every range is done; the calling thread runs the first range itself.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace cachemgr::engine {

class ThreadPool {
 public:
  // num_threads >= 1 (1: everything runs on the caller).
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t num_threads() const { return workers_.size() + 1; }

  // fn(begin, end) over a partition of [0, n). Not reentrant: one ParallelFor at a time.
  void ParallelFor(size_t n, const std::function<void(size_t, size_t)>& fn);

 private:
  void Work(size_t index);

  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(size_t, size_t)>* job_ = nullptr;
  size_t job_n_ = 0;
  size_t generation_ = 0;
  size_t pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace cachemgr::engine
