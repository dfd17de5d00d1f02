#include "cachemgr/util/worker_pool.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace cachemgr {
namespace {

// Records the order tasks ran in.
class Log {
 public:
  void Add(std::string what) {
    absl::MutexLock lock(&mu_);
    entries_.push_back(std::move(what));
  }
  std::vector<std::string> entries() {
    absl::MutexLock lock(&mu_);
    return entries_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> entries_ ABSL_GUARDED_BY(mu_);
};

TEST_CASE("WorkerPool without keys runs tasks in submission order", "[cpu]") {
  Log log;
  absl::Notification gate;
  {
    WorkerPool pool(1);
    pool.Submit([&] { gate.WaitForNotification(); });
    for (int i = 0; i < 5; ++i) pool.Submit([&log, i] { log.Add(std::to_string(i)); });
    gate.Notify();
  }  // the destructor runs what is queued
  CHECK(log.entries() == std::vector<std::string>{"0", "1", "2", "3", "4"});
}

TEST_CASE("WorkerPool keys take turns; each key's tasks keep their order", "[cpu]") {
  Log log;
  absl::Notification first_ran;
  absl::Notification gate;
  {
    WorkerPool pool(1);
    pool.Submit("a", [&] {  // holds the thread while the rest queue
      first_ran.Notify();
      gate.WaitForNotification();
    });
    first_ran.WaitForNotification();
    for (int i = 1; i <= 4; ++i) pool.Submit("a", [&log, i] { log.Add("a" + std::to_string(i)); });
    pool.Submit("b", [&] { log.Add("b1"); });
    pool.Submit("c", [&] { log.Add("c1"); });
    pool.Submit("b", [&] { log.Add("b2"); });
    gate.Notify();
  }  // the destructor runs what is queued
  // Turn by turn: b and c do not wait for all of a's queue.
  CHECK(log.entries() == std::vector<std::string>{"a1", "b1", "c1", "a2", "b2", "a3", "a4"});
}

TEST_CASE("WorkerPool spreads tasks over its threads", "[cpu]") {
  absl::Notification both_running;
  absl::Mutex mu;
  int running = 0;
  {
    WorkerPool pool(2);
    for (int i = 0; i < 2; ++i) {
      pool.Submit([&] {
        absl::MutexLock lock(&mu);
        ++running;
        // Each task waits until the other runs too: only two threads let both finish.
        mu.Await(absl::Condition(
            +[](int* r) { return *r == 2; }, &running));
      });
    }
  }
  CHECK(running == 2);
}

}  // namespace
}  // namespace cachemgr
