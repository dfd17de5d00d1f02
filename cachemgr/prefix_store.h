// PrefixStore: one pool's stored prefix blocks, keyed by the content hash of the prefix up to and
// including the block (vLLM's chained block hashes), in least-recently-used order.
//
// An entry holds each layer's rows either in a block of the pool (one reference on it: the
// CacheManager takes and drops those references; this class only keeps the index, the order
// and the digests) or, for an entry stored as a codebook, as a compress::CodedLayer in host
// memory (no block; reconstructed into fresh blocks at load). A hash is opaque bytes (1 to
// kMaxHashBytes); identical hashes are one entry.
//
// Not thread-safe: the CacheManager's mutex guards it.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "cachemgr/compress/coded_layer.h"

namespace cachemgr {

class PrefixStore {
 public:
  static constexpr size_t kMaxHashBytes = 64;

  // blocks[l] of a layer held as a codebook.
  static constexpr uint32_t kCodedLayer = 0xffffffffu;

  struct Entry {
    std::string hash;
    std::vector<uint32_t> blocks;   // one per layer (kCodedLayer: coded[l] holds the rows)
    std::vector<uint64_t> digests;  // per layer: the block's kv digest when it was stored
    // Empty, or one per layer: the rows of a layer held as a codebook (null for a block).
    std::vector<std::shared_ptr<const compress::CodedLayer>> coded;
    // Bytes charged to the budget for this entry: ChargeBytes + the codebooks' bytes().
    uint64_t charge = 0;
    // When it was last used, on a clock shared by every store (least recent first across
    // pools: PrefixStore::Tick).
    uint64_t last_used = 0;
  };

  // Host memory one entry takes (the entry, its list node and index slot, the hash twice, the
  // per-layer blocks and digests, and with `coded` the per-layer codebook handles), without the
  // codebooks themselves: what the manager charges to the budget for it beside them.
  static uint64_t ChargeBytes(size_t hash_bytes, uint32_t num_layers, bool coded = false);

  size_t size() const { return index_.size(); }
  bool empty() const { return index_.empty(); }
  // Sum of the entries' charges.
  uint64_t charge_bytes() const { return charge_bytes_; }
  // Layers (summed over entries) held as codebooks, and their bytes.
  uint64_t coded_layers() const { return coded_layers_; }
  uint64_t coded_bytes() const { return coded_bytes_; }

  // The entry stored under `hash`, or null. Does not change the order.
  const Entry* Find(absl::string_view hash) const;
  // Makes the entry under `hash` (if any) the most recently used.
  void Touch(absl::string_view hash);
  // Adds `entry` as the most recently used. REQUIRES: no entry under entry.hash, and
  // entry.charge covers the codebooks' bytes.
  void Insert(Entry entry);
  // Removes and returns the entry under `hash`. REQUIRES: Find(hash) != nullptr.
  Entry Remove(absl::string_view hash);

  // Entries from the least to the most recently used.
  const std::list<Entry>& lru_order() const { return lru_; }

 private:
  std::list<Entry> lru_;  // front: least recently used
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index_;
  void Count(const Entry& entry, int sign);
  // The shared clock of Entry::last_used.
  static uint64_t Tick();

  uint64_t charge_bytes_ = 0;
  uint64_t coded_layers_ = 0;
  uint64_t coded_bytes_ = 0;
};

}  // namespace cachemgr
