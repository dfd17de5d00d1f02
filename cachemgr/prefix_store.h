// PrefixStore: one pool's stored prefix blocks, keyed by the content hash of the prefix up to and
// including the block (vLLM's chained block hashes), in least-recently-used order.
//
// An entry names one block per layer and holds one reference on each (the CacheManager takes
// and drops those references; this class only keeps the index, the order and the digests). A
// hash is opaque bytes (1 to kMaxHashBytes); identical hashes are one entry.
//
// Not thread-safe: the CacheManager's mutex guards it.
#pragma once

#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace cachemgr {

class PrefixStore {
 public:
  static constexpr size_t kMaxHashBytes = 64;

  struct Entry {
    std::string hash;
    std::vector<uint32_t> blocks;   // one per layer
    std::vector<uint64_t> digests;  // per layer: the block's kv digest when it was stored
    uint64_t charge = 0;            // bytes charged to the budget for this entry (ChargeBytes)
  };

  // Host memory one entry takes (the entry, its list node and index slot, the hash twice, the
  // per-layer blocks and digests): what the manager charges to the budget for it.
  static uint64_t ChargeBytes(size_t hash_bytes, uint32_t num_layers);

  size_t size() const { return index_.size(); }
  bool empty() const { return index_.empty(); }
  // Sum of the entries' charges.
  uint64_t charge_bytes() const { return charge_bytes_; }

  // The entry stored under `hash`, or null. Does not change the order.
  const Entry* Find(absl::string_view hash) const;
  // Makes the entry under `hash` (if any) the most recently used.
  void Touch(absl::string_view hash);
  // Adds `entry` as the most recently used. REQUIRES: no entry under entry.hash.
  void Insert(Entry entry);
  // Removes and returns the entry under `hash`. REQUIRES: Find(hash) != nullptr.
  Entry Remove(absl::string_view hash);

  // Entries from the least to the most recently used.
  const std::list<Entry>& lru_order() const { return lru_; }

 private:
  std::list<Entry> lru_;  // front: least recently used
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index_;
  uint64_t charge_bytes_ = 0;
};

}  // namespace cachemgr
