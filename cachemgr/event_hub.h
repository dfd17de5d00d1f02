// EventHub: fan-out of state-change events to Watch subscribers.
//
// Publishers never block on subscribers: a subscriber's callback must only enqueue. Thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace cachemgr {

enum class EventType : uint8_t {
  kClientAttached,
  kClientDetached,
  kClientExpired,
  kSequenceAllocated,
  kSequenceFreed,
  kSequenceForked,
  kPoolCreated,
  kPoolReleased,
  kSequenceCompressed,
  kSequenceParked,
  // A background Compress finished its work; FinishCompress applies it.
  kSequenceCompressReady,
};

struct Event {
  uint64_t seq = 0;  // assigned by Publish, from 1
  int64_t unix_micros = 0;
  EventType type = EventType::kClientAttached;
  std::string client_id;
  std::string sequence_id;
  std::string pool_id;
  std::string detail;
};

class EventHub {
 public:
  // Called with each event published after Subscribe returns, in publish order, and once with
  // nullptr when the hub closes. Runs on the publisher's thread under the hub's lock: it must
  // not block or call back into the hub.
  using Callback = std::function<void(const Event*)>;

  uint64_t Subscribe(Callback callback);
  // After Unsubscribe returns the callback is never called again.
  void Unsubscribe(uint64_t id);
  // Stamps seq/time and delivers.
  void Publish(Event event);
  // Delivers nullptr to every subscriber and drops them; later Subscribe calls get an immediate
  // nullptr. Idempotent.
  void Close();

  uint64_t published() const;
  size_t num_subscribers() const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Callback> subscribers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace cachemgr
