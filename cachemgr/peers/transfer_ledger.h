// TransferLedger: what a daemon remembers of transfers by their transfer_id, so that a retry is
// answered from the first attempt rather than repeated (docs/MULTINODE.md). The sender keeps one
// for TransferSequence, the receiver one for ReceiveSequence.
//
// Each id is bound to a fingerprint of what it transfers (the sequence, the destination): a
// retry must present the same one. Only completed transfers are remembered for good (the
// `capacity` most recent); a failed attempt is forgotten, so its retry runs again.
//
// Thread-safe.
#pragma once

#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace cachemgr {

template <typename Outcome>
class TransferLedger {
 public:
  enum class Claim {
    kNew,       // the caller runs the transfer, then calls Complete or Forget
    kDone,      // completed before: `outcome` holds what it gave
    kInFlight,  // another attempt with this id is running
    kConflict,  // the id was used for another transfer (another fingerprint)
  };

  explicit TransferLedger(size_t capacity = 4096) : capacity_(capacity) {}

  // Claims `id` for a transfer described by `fingerprint`.
  Claim Begin(const std::string& id, const std::string& fingerprint, Outcome* outcome) {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = records_.try_emplace(id);
    Record& r = it->second;
    if (inserted) {
      r.fingerprint = fingerprint;
      return Claim::kNew;
    }
    if (r.fingerprint != fingerprint) return Claim::kConflict;
    if (!r.outcome.has_value()) return Claim::kInFlight;
    *outcome = *r.outcome;
    return Claim::kDone;
  }

  // The transfer claimed as `id` completed with `outcome`.
  void Complete(const std::string& id, Outcome outcome) {
    absl::MutexLock lock(&mu_);
    auto it = records_.find(id);
    if (it == records_.end()) return;
    it->second.outcome = std::move(outcome);
    completed_.push_back(id);
    while (completed_.size() > capacity_) {
      records_.erase(completed_.front());
      completed_.pop_front();
    }
  }

  // The transfer claimed as `id` failed: a retry runs again.
  void Forget(const std::string& id) {
    absl::MutexLock lock(&mu_);
    auto it = records_.find(id);
    if (it != records_.end() && !it->second.outcome.has_value()) records_.erase(it);
  }

 private:
  struct Record {
    std::string fingerprint;
    std::optional<Outcome> outcome;  // unset while in flight
  };
  const size_t capacity_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Record> records_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> completed_ ABSL_GUARDED_BY(mu_);  // oldest first
};

}  // namespace cachemgr
