// CacheManager's prefix store: StorePrefix, MatchPrefix, LoadPrefix and the eviction behind
// them (docs/PREFIX_STORE.md). StorePrefix and LoadPrefix read KV for digests, so they run in
// three steps as Compress does: validate and take references under the lock, read outside it
// (the sequence marked busy), apply under the lock again after finding the sequence by serial.
#include <algorithm>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/reply_size.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

using cache_manager_internal::CheckNotBusy;
using cache_manager_internal::CheckSequenceId;
using cache_manager_internal::MutexUnlock;
using cache_manager_internal::ShutdownCancelled;

namespace {

absl::Status CheckHashes(const std::vector<std::string>& hashes) {
  if (hashes.empty() || hashes.size() > kMaxPrefixHashesPerCall) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block_hashes must hold 1-", kMaxPrefixHashesPerCall, " hashes (got ", hashes.size(), ")"));
  }
  for (size_t i = 0; i < hashes.size(); ++i) {
    if (hashes[i].empty() || hashes[i].size() > PrefixStore::kMaxHashBytes) {
      return absl::InvalidArgumentError(absl::StrCat("block_hashes[", i, "] must be 1-",
                                                     PrefixStore::kMaxHashBytes, " bytes (got ",
                                                     hashes[i].size(), ")"));
    }
  }
  return absl::OkStatus();
}

// How many leading hashes `store` holds.
uint32_t LeadingHits(const PrefixStore& store, const std::vector<std::string>& hashes) {
  uint32_t n = 0;
  while (n < hashes.size() && store.Find(hashes[n]) != nullptr) ++n;
  return n;
}

// Makes hashes[0, n) the most recently used, the first last (chains are evicted tails first).
void TouchChain(PrefixStore& store, const std::vector<std::string>& hashes, size_t n) {
  for (size_t i = n; i-- > 0;) store.Touch(hashes[i]);
}

// Digests of one block in every layer (each the layer's kv_digest over block_size rows).
absl::StatusOr<std::vector<uint64_t>> BlockDigests(const PoolMemory& memory,
                                                   const std::vector<uint32_t>& blocks,
                                                   uint32_t block_size) {
  std::vector<uint64_t> digests(blocks.size());
  for (uint32_t l = 0; l < blocks.size(); ++l) {
    ASSIGN_OR_RETURN(digests[l], memory.DigestLayer(l, {&blocks[l], 1}, block_size));
  }
  return digests;
}

}  // namespace

absl::StatusOr<StorePrefixResult> CacheManager::StorePrefix(
    const Caller& caller, const std::string& sequence_id, uint32_t first_block,
    const std::vector<std::string>& hashes) {
  RETURN_IF_ERROR(CheckHashes(hashes));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  ASSIGN_OR_RETURN(Sequence * seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
  RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
  if (seq->compression != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence_id ", QuoteForMessage(sequence_id),
        " is compressed: only an uncompressed sequence (row t holds token t) can be stored"));
  }
  Pool& pool = *client->pool;
  const uint32_t bs = pool.model.block_size;
  const uint64_t end = uint64_t{first_block} + hashes.size();
  for (uint32_t l = 0; l < seq->layers.size(); ++l) {
    const uint32_t full = seq->layers[l].num_tokens / bs;
    if (end > full) {
      return absl::InvalidArgumentError(absl::StrCat(
          "first_block ", first_block, " and ", hashes.size(), " block_hashes name blocks up to ",
          end - 1, " but layer ", l, " of sequence_id ", QuoteForMessage(sequence_id), " has ",
          full, " full blocks of ", bs, " tokens"));
    }
  }

  struct Pending {
    size_t index = 0;
    std::vector<uint32_t> blocks;
    std::vector<uint64_t> digests;
  };
  StorePrefixResult result;
  std::vector<Pending> pending;
  absl::flat_hash_set<absl::string_view> named;
  uint64_t charge = 0;
  const uint32_t num_layers = pool.model.num_layers;
  for (size_t i = 0; i < hashes.size(); ++i) {
    if (pool.prefixes.Find(hashes[i]) != nullptr || !named.insert(hashes[i]).second) {
      ++result.already_stored;
      continue;
    }
    Pending p;
    p.index = i;
    for (uint32_t l = 0; l < num_layers; ++l) {
      p.blocks.push_back(seq->layers[l].blocks[first_block + i]);
    }
    charge += PrefixStore::ChargeBytes(hashes[i].size(), num_layers);
    pending.push_back(std::move(p));
  }
  pool.last_used = clock_->Now();
  if (pending.empty()) {
    TouchChain(pool.prefixes, hashes, hashes.size());
    return result;
  }
  if (options_.memory_budget_bytes - memory_used_bytes_ < charge) ReclaimIdlePoolsLocked(charge);
  RETURN_IF_ERROR(ChargeLocked(charge, "block_hashes (prefix store entries)"));

  // Digests outside the lock: the sequence holds the blocks and, busy, cannot change them.
  seq->busy = "StorePrefix";
  const uint64_t serial = seq->serial;
  const std::shared_ptr<const PoolMemory> memory = pool.memory;
  absl::Status read = absl::OkStatus();
  {
    MutexUnlock unlocked(&mu_);
    for (Pending& p : pending) {
      absl::StatusOr<std::vector<uint64_t>> digests = BlockDigests(*memory, p.blocks, bs);
      if (!digests.ok()) {
        read = digests.status();
        break;
      }
      p.digests = *std::move(digests);
    }
  }
  seq = FindSerialLocked(sequence_id, serial);
  if (seq == nullptr) {
    memory_used_bytes_ -= charge;
    return absl::AbortedError(absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                                           " was freed while StorePrefix read it; nothing was "
                                           "stored"));
  }
  seq->busy = nullptr;
  if (!read.ok() || shutting_down_.load()) {
    memory_used_bytes_ -= charge;
    return read.ok() ? ShutdownCancelled("StorePrefix") : read;
  }
  Pool& owner_pool = *seq->owner->pool;
  for (Pending& p : pending) {
    const std::string& hash = hashes[p.index];
    const uint64_t entry_charge = PrefixStore::ChargeBytes(hash.size(), num_layers);
    if (owner_pool.prefixes.Find(hash) != nullptr) {  // another call stored it meanwhile
      memory_used_bytes_ -= entry_charge;
      ++result.already_stored;
      continue;
    }
    for (uint32_t l = 0; l < num_layers; ++l) owner_pool.allocators[l].AddRef(p.blocks[l]);
    owner_pool.prefixes.Insert({hash, std::move(p.blocks), std::move(p.digests), entry_charge});
    ++result.stored;
  }
  TouchChain(owner_pool.prefixes, hashes, hashes.size());
  prefix_counters_.stored += result.stored;
  return result;
}

absl::StatusOr<uint32_t> CacheManager::MatchPrefix(const Caller& caller,
                                                   const std::vector<std::string>& hashes) {
  RETURN_IF_ERROR(CheckHashes(hashes));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  return LeadingHits(client->pool->prefixes, hashes);
}

absl::StatusOr<LoadPrefixResult> CacheManager::LoadPrefix(const Caller& caller,
                                                          const std::string& sequence_id,
                                                          const std::vector<std::string>& hashes) {
  RETURN_IF_ERROR(CheckHashes(hashes));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
  if (sequences_.contains(sequence_id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " already exists"));
  }
  Pool& pool = *client->pool;
  const uint32_t bs = pool.model.block_size;
  const uint32_t num_layers = pool.model.num_layers;
  const uint32_t n = LeadingHits(pool.prefixes, hashes);
  LoadPrefixResult result;
  pool.last_used = clock_->Now();
  if (n == 0) {
    prefix_counters_.misses += hashes.size();
    return result;
  }
  {
    std::vector<reply_size::LayerCounts> counts(num_layers, {n, 0});
    RETURN_IF_ERROR(CheckReplyBytes(reply_size::SequenceReplyBytes(counts, pool.num_blocks),
                                    absl::StrCat("LoadPrefix of ", n, " blocks")));
  }
  const uint64_t charge = SequenceChargeBytes(sequence_id, num_layers, uint64_t{n} * num_layers);
  RETURN_IF_ERROR(ChargeLocked(charge, absl::StrCat("sequence_id ", QuoteForMessage(sequence_id))));

  // The new sequence takes a reference on every block it serves, so neither eviction nor a
  // drop can hand them out while their digests are checked outside the lock.
  auto created = std::make_unique<Sequence>();
  Sequence* seq = created.get();
  seq->charge = charge;
  seq->serial = next_sequence_serial_++;
  seq->sequence_id = sequence_id;
  seq->owner = client;
  seq->num_positions = uint64_t{n} * bs;
  seq->layers.resize(num_layers);
  std::vector<std::vector<uint64_t>> expected(n);
  for (uint32_t i = 0; i < n; ++i) {
    const PrefixStore::Entry& e = *pool.prefixes.Find(hashes[i]);
    expected[i] = e.digests;
    for (uint32_t l = 0; l < num_layers; ++l) {
      seq->layers[l].blocks.push_back(e.blocks[l]);
      pool.allocators[l].AddRef(e.blocks[l]);
    }
  }
  for (auto& t : seq->layers) t.num_tokens = n * bs;
  TouchChain(pool.prefixes, hashes, n);
  sequences_.emplace(sequence_id, std::move(created));
  client->sequences.push_back(sequence_id);
  seq->busy = "LoadPrefix";
  const uint64_t serial = seq->serial;
  const std::shared_ptr<const PoolMemory> memory = pool.memory;
  std::vector<std::vector<uint32_t>> blocks(n, std::vector<uint32_t>(num_layers));
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t l = 0; l < num_layers; ++l) blocks[i][l] = seq->layers[l].blocks[i];
  }

  std::vector<bool> corrupt(n, false);
  absl::Status read = absl::OkStatus();
  {
    MutexUnlock unlocked(&mu_);
    for (uint32_t i = 0; i < n && read.ok(); ++i) {
      absl::StatusOr<std::vector<uint64_t>> digests = BlockDigests(*memory, blocks[i], bs);
      if (digests.ok()) {
        corrupt[i] = *digests != expected[i];
      } else {
        read = digests.status();
      }
    }
  }
  seq = FindSerialLocked(sequence_id, serial);
  if (seq == nullptr) {
    return absl::AbortedError(absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                                           " was freed while LoadPrefix checked its blocks"));
  }
  seq->busy = nullptr;
  Client* owner = seq->owner;
  Pool& owner_pool = *owner->pool;
  auto remove_sequence = [&] {
    ReleaseSequenceLocked(*seq, std::nullopt);
    std::erase(owner->sequences, sequence_id);
    sequences_.erase(sequence_id);
  };
  if (!read.ok() || shutting_down_.load()) {
    remove_sequence();
    return read.ok() ? ShutdownCancelled("LoadPrefix") : read;
  }
  uint32_t served = n;
  for (uint32_t i = 0; i < n; ++i) {
    if (!corrupt[i]) continue;
    served = std::min(served, i);
    ++result.corrupt_blocks;
  }
  prefix_counters_.corrupt += result.corrupt_blocks;
  prefix_counters_.hits += served;
  prefix_counters_.misses += hashes.size() - served;
  result.loaded_blocks = served;
  // The sequence gives up what it does not serve before the corrupt entries are dropped, so
  // that dropping them releases the blocks' last references (quarantined while an expired
  // client may still write to the pool, see DropPrefixLocked).
  if (served == 0) {
    remove_sequence();
  } else if (served < n) {
    for (uint32_t l = 0; l < num_layers; ++l) {
      auto& t = seq->layers[l];
      for (uint32_t i = served; i < n; ++i) owner_pool.allocators[l].Release(t.blocks[i]);
      t.blocks.resize(served);
      t.num_tokens = served * bs;
    }
    seq->num_positions = uint64_t{served} * bs;
    const uint64_t less =
        SequenceChargeBytes(sequence_id, num_layers, uint64_t{served} * num_layers);
    memory_used_bytes_ -= seq->charge - less;
    seq->charge = less;
  }
  for (uint32_t i = 0; i < n; ++i) {
    if (!corrupt[i]) continue;
    const PrefixStore::Entry* e = owner_pool.prefixes.Find(hashes[i]);
    if (e != nullptr && e->blocks == blocks[i]) {
      Log(LogLevel::kWarning, "stored prefix block failed its digest; dropped",
          {{"pool_id", owner_pool.pool_id}, {"entry", i}});
      DropPrefixLocked(owner_pool, hashes[i]);
    }
  }
  if (served == 0) return result;
  result.sequence = SnapshotLocked(*seq);
  PublishLocked(EventType::kSequenceAllocated, owner->client_id, sequence_id, owner_pool.pool_id,
                absl::StrCat("prefix_blocks=", served, " positions=", seq->num_positions));
  return result;
}

uint64_t CacheManager::DropPrefixLocked(Pool& pool, const std::string& hash) {
  PrefixStore::Entry e = pool.prefixes.Remove(hash);
  // A client whose lease expired may still write through its mapping until its quarantine
  // ends: blocks freed before then wait it out, as that client's own blocks do.
  const absl::Time now = clock_->Now();
  uint64_t freed = 0;
  for (uint32_t l = 0; l < e.blocks.size(); ++l) {
    BlockAllocator& alloc = pool.allocators[l];
    freed += (now < pool.stalled_writers_until
                  ? alloc.ReleaseToQuarantine(e.blocks[l], pool.stalled_writers_until)
                  : alloc.Release(e.blocks[l]))
                 ? 1
                 : 0;
  }
  memory_used_bytes_ -= e.charge;
  return freed;
}

bool CacheManager::MakeRoomLocked(Pool& pool, const std::vector<uint32_t>& needed) {
  const uint32_t num_layers = static_cast<uint32_t>(pool.allocators.size());
  std::vector<uint32_t> deficit(num_layers, 0);
  uint64_t short_layers = 0;
  for (uint32_t l = 0; l < num_layers; ++l) {
    const uint32_t free = pool.allocators[l].num_free();
    deficit[l] = needed[l] > free ? needed[l] - free : 0;
    short_layers += deficit[l] > 0 ? 1 : 0;
  }
  if (short_layers == 0) return true;
  if (pool.prefixes.empty()) return false;
  // While an expired client may still write to the pool, dropped blocks are quarantined
  // (DropPrefixLocked), not freed: evicting would lose entries and free nothing.
  if (clock_->Now() < pool.stalled_writers_until) return false;
  // Plan on the side (references the planned evictions would drop), evict only if it suffices.
  absl::flat_hash_map<uint64_t, uint32_t> dropped;
  std::vector<std::string> victims;
  for (const PrefixStore::Entry& e : pool.prefixes.lru_order()) {
    bool helps = false;
    for (uint32_t l = 0; l < num_layers && !helps; ++l) {
      const uint64_t key = (uint64_t{l} << 32) | e.blocks[l];
      helps = deficit[l] > 0 && pool.allocators[l].refcount(e.blocks[l]) - dropped[key] == 1;
    }
    if (!helps) continue;
    victims.push_back(e.hash);
    for (uint32_t l = 0; l < num_layers; ++l) {
      const uint64_t key = (uint64_t{l} << 32) | e.blocks[l];
      if (pool.allocators[l].refcount(e.blocks[l]) - dropped[key]++ == 1 && deficit[l] > 0) {
        if (--deficit[l] == 0) --short_layers;
      }
    }
    if (short_layers == 0) break;
  }
  if (short_layers > 0) return false;
  for (const std::string& hash : victims) DropPrefixLocked(pool, hash);
  prefix_counters_.evictions += victims.size();
  Log(LogLevel::kInfo, "stored prefix blocks evicted",
      {{"pool_id", pool.pool_id}, {"entries", victims.size()}});
  return true;
}

void CacheManager::ReclaimIdlePoolsLocked(uint64_t bytes, const Pool* keep) {
  auto left = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return options_.memory_budget_bytes - memory_used_bytes_;
  };
  if (left() >= bytes) return;
  // What reclaiming gives back: each idle pool's entries, and its memory unless blocks in
  // quarantine (or those its store drops while an expired client's quarantine runs) keep it.
  const absl::Time now = clock_->Now();
  std::vector<Pool*> idle;
  uint64_t reclaimable = 0;
  for (const auto& [key, pool] : pools_) {
    if (pool.get() == keep || pool->building || pool->clients > 0 || pool->prefixes.empty()) {
      continue;
    }
    idle.push_back(pool.get());
    reclaimable += pool->prefixes.charge_bytes();
    bool kept = now < pool->stalled_writers_until;
    for (const BlockAllocator& a : pool->allocators) kept = kept || a.num_quarantined() > 0;
    if (!kept) reclaimable += pool->bytes + pool->bookkeeping_bytes;
  }
  if (left() + reclaimable < bytes) return;  // not enough: the caller fails, nothing changed
  std::sort(idle.begin(), idle.end(), [](const Pool* a, const Pool* b) {
    return a->last_used != b->last_used ? a->last_used < b->last_used : a->pool_id < b->pool_id;
  });
  for (Pool* pool : idle) {
    if (left() >= bytes) return;
    ReclaimIdlePoolLocked(*pool, "an Attach needed its budget");
  }
}

void CacheManager::ReclaimIdlePoolLocked(Pool& pool, const char* why) {
  const size_t entries = pool.prefixes.size();
  while (!pool.prefixes.empty()) DropPrefixLocked(pool, pool.prefixes.lru_order().front().hash);
  prefix_counters_.evictions += entries;
  ++prefix_counters_.pools_reclaimed;
  Log(LogLevel::kInfo, "idle pool's stored prefixes dropped",
      {{"pool_id", pool.pool_id}, {"entries", entries}, {"why", why}});
  MaybeReleasePoolLocked(std::string(pool.key));  // `pool` may be gone from here
}

}  // namespace cachemgr
