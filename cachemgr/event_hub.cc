#include "cachemgr/event_hub.h"

#include "absl/time/clock.h"

namespace cachemgr {

uint64_t EventHub::Subscribe(Callback callback) {
  absl::MutexLock lock(&mu_);
  if (closed_) {
    callback(nullptr);
    return 0;
  }
  const uint64_t id = next_id_++;
  subscribers_.emplace(id, std::move(callback));
  return id;
}

void EventHub::Unsubscribe(uint64_t id) {
  absl::MutexLock lock(&mu_);
  subscribers_.erase(id);
}

void EventHub::Publish(Event event) {
  absl::MutexLock lock(&mu_);
  if (closed_) return;
  event.seq = next_seq_++;
  event.unix_micros = absl::ToUnixMicros(absl::Now());
  for (auto& [id, callback] : subscribers_) callback(&event);
}

void EventHub::Close() {
  absl::MutexLock lock(&mu_);
  if (closed_) return;
  closed_ = true;
  for (auto& [id, callback] : subscribers_) callback(nullptr);
  subscribers_.clear();
}

uint64_t EventHub::published() const {
  absl::MutexLock lock(&mu_);
  return next_seq_ - 1;
}

size_t EventHub::num_subscribers() const {
  absl::MutexLock lock(&mu_);
  return subscribers_.size();
}

}  // namespace cachemgr
