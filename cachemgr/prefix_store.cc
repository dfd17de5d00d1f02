#include "cachemgr/prefix_store.h"

#include <utility>

namespace cachemgr {

uint64_t PrefixStore::ChargeBytes(size_t hash_bytes, uint32_t num_layers) {
  // A list node (two links and the entry), an index slot (key and iterator), the hash's bytes
  // in both (heap-allocated when long) and one block id and one digest per layer.
  constexpr uint64_t kFixed =
      2 * sizeof(void*) + sizeof(Entry) + sizeof(std::string) + sizeof(std::list<Entry>::iterator);
  return kFixed + 2 * uint64_t{hash_bytes} +
         uint64_t{num_layers} * (sizeof(uint32_t) + sizeof(uint64_t));
}

const PrefixStore::Entry* PrefixStore::Find(absl::string_view hash) const {
  auto it = index_.find(hash);
  return it == index_.end() ? nullptr : &*it->second;
}

void PrefixStore::Touch(absl::string_view hash) {
  auto it = index_.find(hash);
  if (it != index_.end()) lru_.splice(lru_.end(), lru_, it->second);
}

void PrefixStore::Insert(Entry entry) {
  charge_bytes_ += entry.charge;
  std::string key = entry.hash;
  lru_.push_back(std::move(entry));
  index_.emplace(std::move(key), std::prev(lru_.end()));
}

PrefixStore::Entry PrefixStore::Remove(absl::string_view hash) {
  auto it = index_.find(hash);
  Entry entry = std::move(*it->second);
  lru_.erase(it->second);
  index_.erase(it);
  charge_bytes_ -= entry.charge;
  return entry;
}

}  // namespace cachemgr
