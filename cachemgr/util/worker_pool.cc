#include "cachemgr/util/worker_pool.h"

#include <utility>

namespace cachemgr {

WorkerPool::WorkerPool(size_t num_threads) {
  threads_.reserve(num_threads);
  for (size_t i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Run(); });
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void WorkerPool::Submit(std::string key, std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  std::deque<std::function<void()>>& queue = tasks_[key];
  if (queue.empty()) turns_.push_back(std::move(key));
  queue.push_back(std::move(task));
}

bool WorkerPool::Ready() const { return stopping_ || !turns_.empty(); }

void WorkerPool::Run() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &WorkerPool::Ready));
      if (turns_.empty()) return;  // stopping, and nothing left to run
      std::string key = std::move(turns_.front());
      turns_.pop_front();
      auto it = tasks_.find(key);
      task = std::move(it->second.front());
      it->second.pop_front();
      if (it->second.empty()) {
        tasks_.erase(it);
      } else {
        turns_.push_back(std::move(key));  // its next task waits for the other keys' turns
      }
    }
    task();
  }
}

}  // namespace cachemgr
