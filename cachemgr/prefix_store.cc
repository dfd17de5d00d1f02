#include "cachemgr/prefix_store.h"

#include <atomic>
#include <utility>

namespace cachemgr {

uint64_t PrefixStore::ChargeBytes(size_t hash_bytes, uint32_t num_layers, bool coded) {
  // A list node (two links and the entry), an index slot (key and iterator), the hash's bytes
  // in both (heap-allocated when long) and one block id and one digest per layer.
  constexpr uint64_t kFixed =
      2 * sizeof(void*) + sizeof(Entry) + sizeof(std::string) + sizeof(std::list<Entry>::iterator);
  const uint64_t per_layer = sizeof(uint32_t) + sizeof(uint64_t) +
                             (coded ? sizeof(std::shared_ptr<const compress::CodedLayer>) : 0);
  return kFixed + 2 * uint64_t{hash_bytes} + uint64_t{num_layers} * per_layer;
}

const PrefixStore::Entry* PrefixStore::Find(absl::string_view hash) const {
  auto it = index_.find(hash);
  return it == index_.end() ? nullptr : &*it->second;
}

uint64_t PrefixStore::Tick() {
  static std::atomic<uint64_t> clock{0};
  return clock.fetch_add(1, std::memory_order_relaxed) + 1;
}

void PrefixStore::Count(const Entry& entry, int sign) {
  uint64_t layers = 0, bytes = 0;
  for (const auto& c : entry.coded) {
    if (c == nullptr) continue;
    ++layers;
    bytes += c->bytes();
  }
  if (sign > 0) {
    charge_bytes_ += entry.charge;
    coded_layers_ += layers;
    coded_bytes_ += bytes;
  } else {
    charge_bytes_ -= entry.charge;
    coded_layers_ -= layers;
    coded_bytes_ -= bytes;
  }
}

void PrefixStore::Touch(absl::string_view hash) {
  auto it = index_.find(hash);
  if (it == index_.end()) return;
  lru_.splice(lru_.end(), lru_, it->second);
  it->second->last_used = Tick();
}

void PrefixStore::Insert(Entry entry) {
  Count(entry, +1);
  entry.last_used = Tick();
  std::string key = entry.hash;
  lru_.push_back(std::move(entry));
  index_.emplace(std::move(key), std::prev(lru_.end()));
}

PrefixStore::Entry PrefixStore::Remove(absl::string_view hash) {
  auto it = index_.find(hash);
  Entry entry = std::move(*it->second);
  lru_.erase(it->second);
  index_.erase(it);
  Count(entry, -1);
  return entry;
}

}  // namespace cachemgr
