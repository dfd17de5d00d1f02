// CacheManager's prefix store: StorePrefix, MatchPrefix, LoadPrefix and the eviction behind
// them (docs/PREFIX_STORE.md). StorePrefix and LoadPrefix read KV for digests, so they run in
// three steps as Compress does: validate and take references under the lock, read outside it
// (the sequence marked busy), apply under the lock again after finding the sequence by serial.
#include <algorithm>
#include <memory>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/reply_size.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

using cache_manager_internal::CheckNotBusy;
using cache_manager_internal::CheckPrefixHashes;
using cache_manager_internal::CheckSequenceId;
using cache_manager_internal::GatherLayerRows;
using cache_manager_internal::LeadingPrefixHits;
using cache_manager_internal::MutexUnlock;
using cache_manager_internal::RowSlots;
using cache_manager_internal::ShapeOf;
using cache_manager_internal::ShutdownCancelled;
using cache_manager_internal::SlotOf;

namespace cache_manager_internal {

absl::Status CheckPrefixHashes(const std::vector<std::string>& hashes) {
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

uint32_t LeadingPrefixHits(const PrefixStore& store, const std::vector<std::string>& hashes) {
  uint32_t n = 0;
  while (n < hashes.size() && store.Find(hashes[n]) != nullptr) ++n;
  return n;
}

}  // namespace cache_manager_internal

namespace {

// Makes hashes[0, n) the most recently used, the first last (chains are evicted tails first).
void TouchChain(PrefixStore& store, const std::vector<std::string>& hashes, size_t n) {
  for (size_t i = n; i-- > 0;) store.Touch(hashes[i]);
}

// Digests of one entry's blocks (each the layer's kv_digest over block_size rows); 0 for a
// layer whose `coded` is set.
absl::StatusOr<std::vector<uint64_t>> BlockDigests(const PoolMemory& memory,
                                                   const std::vector<uint32_t>& blocks,
                                                   const std::vector<bool>& coded,
                                                   uint32_t block_size) {
  std::vector<uint64_t> digests(blocks.size(), 0);
  for (uint32_t l = 0; l < blocks.size(); ++l) {
    if (!coded.empty() && coded[l]) continue;
    ASSIGN_OR_RETURN(digests[l], memory.DigestLayer(l, {&blocks[l], 1}, block_size, KvDigest::kXxh3));
  }
  return digests;
}

// The "codebook" preset with `options`' thresholds; INVALID_ARGUMENT naming codebook.theta_k or
// codebook.theta_v outside (0, 1] (0 means the preset's).
absl::StatusOr<compress::PolicyConfig> StoreCodebookPolicy(const PrefixCodebookOptions& options) {
  ASSIGN_OR_RETURN(compress::PolicyConfig policy, compress::PresetPolicy("codebook"));
  for (auto [field, theta, out] :
       {std::tuple{"codebook.theta_k", options.theta_k, &policy.theta_k},
        std::tuple{"codebook.theta_v", options.theta_v, &policy.theta_v}}) {
    if (theta == 0.0f) continue;
    if (!(theta > 0.0f && theta <= 1.0f)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " must be in (0, 1], or 0 for the preset's (got ", theta, ")"));
    }
    *out = theta;
  }
  return policy;
}

// One stored block of every layer coded as a codebook (StorePrefix with PrefixCodebookOptions):
// rows read from `blocks`, K un-rotated at positions first_position + t. coded[l] stays null
// for a layer whose codebook would not be smaller than its block.
absl::StatusOr<std::vector<std::shared_ptr<const compress::CodedLayer>>> CodeBlock(
    const PoolMemory& memory, const compress::ModelShape& shape,
    const compress::PolicyConfig& policy, const std::vector<uint32_t>& blocks, uint32_t block_size,
    uint64_t first_position, const compress::ComputeOptions& compute) {
  compress::SequenceInput input;
  input.num_tokens = block_size;
  input.positions.resize(block_size);
  for (uint32_t t = 0; t < block_size; ++t) {
    if (first_position + t > UINT32_MAX) {
      return absl::InvalidArgumentError(
          "codebook.first_position: the stored rows' positions pass 2^32 - 1");
    }
    input.positions[t] = static_cast<uint32_t>(first_position + t);
  }
  input.layers.resize(shape.num_layers);
  std::vector<std::vector<float>> keys(shape.num_layers), values(shape.num_layers);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    RETURN_IF_ERROR(GatherLayerRows(memory, l, RowSlots({blocks[l]}, 0, block_size, block_size),
                                    &keys[l], &values[l]));
    input.layers[l].keys = keys[l].data();
    input.layers[l].values = values[l].data();
  }
  absl::StatusOr<compress::SequenceResult> computed = compress::CompressSequence(
      shape, policy, input, {compress::TargetKind::kReserveRatio, 1.0}, compute);
  if (!computed.ok()) {
    // The KV is the client's (a non-finite element, say): an argument of the call.
    return absl::Status(computed.status().code(),
                        absl::StrCat("coding the stored KV failed: ", computed.status().message()));
  }
  const compress::SequenceResult& result = *computed;
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded(shape.num_layers);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    const compress::LayerResult& lr = result.layers[l];
    if (!lr.key_codebook.has_value()) continue;
    if (lr.kept_per_head != block_size) {
      return absl::InternalError(absl::StrCat("layer ", l, " kept ", lr.kept_per_head, " of ",
                                              block_size, " rows under the codebook preset"));
    }
    ASSIGN_OR_RETURN(compress::CodedLayer layer,
                     compress::CodedLayer::FromResult(shape, policy, lr, input.positions));
    coded[l] = std::make_shared<const compress::CodedLayer>(std::move(layer));
  }
  return coded;
}

}  // namespace

absl::StatusOr<StorePrefixResult> CacheManager::StorePrefix(
    const Caller& caller, const std::string& sequence_id, uint32_t first_block,
    const std::vector<std::string>& hashes, const std::optional<PrefixCodebookOptions>& codebook) {
  RETURN_IF_ERROR(CheckPrefixHashes(hashes));
  std::optional<compress::PolicyConfig> policy;
  if (codebook.has_value()) {
    ASSIGN_OR_RETURN(policy, StoreCodebookPolicy(*codebook));
  }
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
  if (codebook.has_value() && codebook->first_position.has_value() &&
      (*codebook->first_position > UINT32_MAX ||
       *codebook->first_position + hashes.size() * bs - 1 > UINT32_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("codebook.first_position ", *codebook->first_position, " puts the ",
                     hashes.size() * bs, " stored rows past position 2^32 - 1"));
  }
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
    std::vector<std::shared_ptr<const compress::CodedLayer>> coded;  // with a codebook
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
    charge += PrefixStore::ChargeBytes(hashes[i].size(), num_layers, policy.has_value());
    pending.push_back(std::move(p));
  }
  pool.last_used = clock_->Now();
  if (pending.empty()) {
    TouchChain(pool.prefixes, hashes, hashes.size());
    return result;
  }
  if (options_.memory_budget_bytes - memory_used_bytes_ < charge) ReclaimIdlePoolsLocked(charge);
  RETURN_IF_ERROR(ChargeLocked(charge, "block_hashes (prefix store entries)"));

  // Codebooks and digests outside the lock: the sequence holds the blocks and, busy, cannot
  // change them.
  seq->busy = "StorePrefix";
  const uint64_t serial = seq->serial;
  const std::shared_ptr<const PoolMemory> memory = pool.memory;
  const compress::ModelShape shape = ShapeOf(pool.model);
  const compress::ComputeOptions compute{CompressThreads(), memory->similarity_graph(),
                                         memory->ranker(), &shutting_down_};
  const uint64_t first_position = codebook.has_value() && codebook->first_position.has_value()
                                      ? *codebook->first_position
                                      : uint64_t{first_block} * bs;
  absl::Status read = absl::OkStatus();
  {
    MutexUnlock unlocked(&mu_);
    for (Pending& p : pending) {
      std::vector<bool> coded;
      if (policy.has_value()) {
        absl::StatusOr<std::vector<std::shared_ptr<const compress::CodedLayer>>> built = CodeBlock(
            *memory, shape, *policy, p.blocks, bs, first_position + p.index * bs, compute);
        if (!built.ok()) {
          read = built.status();
          break;
        }
        p.coded = *std::move(built);
        for (const auto& c : p.coded) coded.push_back(c != nullptr);
      }
      absl::StatusOr<std::vector<uint64_t>> digests = BlockDigests(*memory, p.blocks, coded, bs);
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
    if (read.ok()) return ShutdownCancelled("StorePrefix");
    if (read.code() == absl::StatusCode::kInvalidArgument) return read;
    return absl::InternalError(
        absl::StrCat("reading the blocks to store failed: ", read.message()));
  }
  // The codebooks are charged now that their sizes are known (stored prefixes of other pools
  // may give way, ChargeLocked); all or nothing.
  uint64_t coded_bytes = 0;
  for (const Pending& p : pending) {
    for (const auto& c : p.coded) coded_bytes += c != nullptr ? c->bytes() : 0;
  }
  if (coded_bytes > 0) {
    if (absl::Status s = ChargeLocked(
            coded_bytes, absl::StrCat("the codebooks of ", pending.size(), " block_hashes"));
        !s.ok()) {
      memory_used_bytes_ -= charge;
      return s;
    }
  }
  Pool& owner_pool = *seq->owner->pool;
  for (Pending& p : pending) {
    const std::string& hash = hashes[p.index];
    uint32_t entry_coded_layers = 0;
    uint64_t entry_coded_bytes = 0;
    for (const auto& c : p.coded) {
      if (c == nullptr) continue;
      entry_coded_bytes += c->bytes();
      ++entry_coded_layers;
    }
    // Charged above as if coded; an entry without a codebook layer keeps no codebook handles.
    const uint64_t bookkeeping =
        PrefixStore::ChargeBytes(hash.size(), num_layers, entry_coded_layers > 0);
    memory_used_bytes_ -=
        PrefixStore::ChargeBytes(hash.size(), num_layers, policy.has_value()) - bookkeeping;
    const uint64_t entry_charge = bookkeeping + entry_coded_bytes;
    if (owner_pool.prefixes.Find(hash) != nullptr) {  // another call stored it meanwhile
      memory_used_bytes_ -= entry_charge;
      ++result.already_stored;
      continue;
    }
    for (uint32_t l = 0; l < num_layers; ++l) {
      if (!p.coded.empty() && p.coded[l] != nullptr) {
        result.codebook_bytes += p.coded[l]->bytes();
        p.blocks[l] = PrefixStore::kCodedLayer;
      } else {
        owner_pool.allocators[l].AddRef(p.blocks[l]);
      }
    }
    result.codebook_layers += entry_coded_layers;
    owner_pool.prefixes.Insert({hash, std::move(p.blocks), std::move(p.digests),
                                entry_coded_layers > 0 ? std::move(p.coded) : decltype(p.coded){},
                                entry_charge});
    ++result.stored;
  }
  TouchChain(owner_pool.prefixes, hashes, hashes.size());
  prefix_counters_.stored += result.stored;
  return result;
}

absl::StatusOr<uint32_t> CacheManager::MatchPrefix(const Caller& caller,
                                                   const std::vector<std::string>& hashes) {
  RETURN_IF_ERROR(CheckPrefixHashes(hashes));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  return LeadingPrefixHits(client->pool->prefixes, hashes);
}

absl::StatusOr<LoadPrefixResult> CacheManager::LoadPrefix(const Caller& caller,
                                                          const std::string& sequence_id,
                                                          const std::vector<std::string>& hashes) {
  RETURN_IF_ERROR(CheckPrefixHashes(hashes));
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
  uint32_t n = LeadingPrefixHits(pool.prefixes, hashes);
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
  // The hits first become the most recently used, so a charge that evicts stored prefixes
  // (ChargeLocked) takes them last; should it take some all the same, fewer are served.
  TouchChain(pool.prefixes, hashes, n);
  uint64_t charge = SequenceChargeBytes(sequence_id, num_layers, uint64_t{n} * num_layers);
  RETURN_IF_ERROR(ChargeLocked(charge, absl::StrCat("sequence_id ", QuoteForMessage(sequence_id))));
  if (const uint32_t left = LeadingPrefixHits(pool.prefixes, hashes); left < n) {
    const uint64_t less = SequenceChargeBytes(sequence_id, num_layers, uint64_t{left} * num_layers);
    memory_used_bytes_ -= charge - less;
    charge = less;
    n = left;
    if (n == 0) {
      memory_used_bytes_ -= charge;
      prefix_counters_.misses += hashes.size();
      return result;
    }
  }

  // The new sequence takes a reference on every stored block it serves, so neither eviction
  // nor a drop can hand them out while their digests are checked outside the lock; a layer held
  // as a codebook gets a fresh block, its rows reconstructed into it.
  std::vector<std::vector<uint32_t>> entry_blocks(n);  // the entries' (kCodedLayer: coded)
  std::vector<std::vector<uint64_t>> expected(n);
  std::vector<std::vector<std::shared_ptr<const compress::CodedLayer>>> coded(n);
  std::vector<uint32_t> needed(num_layers, 0);
  for (uint32_t i = 0; i < n; ++i) {
    const PrefixStore::Entry& e = *pool.prefixes.Find(hashes[i]);
    entry_blocks[i] = e.blocks;
    expected[i] = e.digests;
    coded[i] = e.coded;
    for (uint32_t l = 0; l < num_layers; ++l) {
      if (e.blocks[l] == PrefixStore::kCodedLayer) {
        ++needed[l];
      } else {
        pool.allocators[l].AddRef(e.blocks[l]);
      }
    }
  }
  // Fresh blocks for the codebook layers, evicting other entries if that frees enough; if not,
  // the leading entries whose layers fit are served.
  uint32_t fit = n;
  if (!MakeRoomLocked(pool, needed)) {
    std::vector<uint32_t> taken(num_layers, 0);
    for (fit = 0; fit < n; ++fit) {
      bool fits = true;
      for (uint32_t l = 0; l < num_layers; ++l) {
        const uint32_t more = entry_blocks[fit][l] == PrefixStore::kCodedLayer ? 1 : 0;
        fits = fits && taken[l] + more <= pool.allocators[l].num_free();
      }
      if (!fits) break;
      for (uint32_t l = 0; l < num_layers; ++l) {
        taken[l] += entry_blocks[fit][l] == PrefixStore::kCodedLayer ? 1 : 0;
      }
    }
  }
  for (uint32_t i = fit; i < n; ++i) {
    for (uint32_t l = 0; l < num_layers; ++l) {
      if (entry_blocks[i][l] != PrefixStore::kCodedLayer) {
        pool.allocators[l].Release(entry_blocks[i][l]);
      }
    }
  }
  if (fit < n) {
    const uint64_t less = SequenceChargeBytes(sequence_id, num_layers, uint64_t{fit} * num_layers);
    memory_used_bytes_ -= charge - less;
    charge = less;
    n = fit;
    entry_blocks.resize(n);
    expected.resize(n);
    coded.resize(n);
    if (n == 0) {
      memory_used_bytes_ -= charge;
      prefix_counters_.misses += hashes.size();
      return result;
    }
  }
  auto created = std::make_unique<Sequence>();
  Sequence* seq = created.get();
  seq->charge = charge;
  seq->serial = next_sequence_serial_++;
  seq->sequence_id = sequence_id;
  seq->owner = client;
  seq->num_positions = uint64_t{n} * bs;
  seq->layers.resize(num_layers);
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t l = 0; l < num_layers; ++l) {
      seq->layers[l].blocks.push_back(entry_blocks[i][l] == PrefixStore::kCodedLayer
                                          ? pool.allocators[l].Allocate(1).value()[0]
                                          : entry_blocks[i][l]);
    }
  }
  for (auto& t : seq->layers) t.num_tokens = n * bs;
  sequences_.emplace(sequence_id, std::move(created));
  client->sequences.push_back(sequence_id);
  seq->busy = "LoadPrefix";
  const uint64_t serial = seq->serial;
  const std::shared_ptr<const PoolMemory> memory = pool.memory;
  const bool on_device = memory->computes_on_device();
  std::vector<std::vector<uint32_t>> blocks(n, std::vector<uint32_t>(num_layers));
  std::vector<std::vector<bool>> is_coded(n, std::vector<bool>(num_layers, false));
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t l = 0; l < num_layers; ++l) {
      blocks[i][l] = seq->layers[l].blocks[i];
      is_coded[i][l] = entry_blocks[i][l] == PrefixStore::kCodedLayer;
    }
  }

  // Outside the lock: the stored blocks' digests, and the codebook layers rebuilt from their
  // immutable codes (flattened for a device pool, which reconstructs next to its memory).
  struct Rebuilt {
    uint32_t entry = 0, layer = 0;
    compress::CodedRows flat;
    std::vector<float> keys, values;
  };
  std::vector<Rebuilt> rebuilt;
  std::vector<bool> corrupt(n, false);
  absl::Status read = absl::OkStatus();
  {
    MutexUnlock unlocked(&mu_);
    for (uint32_t i = 0; i < n && read.ok(); ++i) {
      absl::StatusOr<std::vector<uint64_t>> digests =
          BlockDigests(*memory, blocks[i], is_coded[i], bs);
      if (digests.ok()) {
        corrupt[i] = *digests != expected[i];
      } else {
        read = digests.status();
      }
      for (uint32_t l = 0; l < num_layers && read.ok(); ++l) {
        if (!is_coded[i][l]) continue;
        if (shutting_down_.load()) break;
        Rebuilt r;
        r.entry = i;
        r.layer = l;
        if (on_device) {
          r.flat = coded[i][l]->Flatten();
        } else {
          coded[i][l]->Reconstruct(&r.keys, &r.values);
        }
        rebuilt.push_back(std::move(r));
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
  // The reconstructed rows go to their fresh blocks under the lock, as Fetch writes them.
  for (const Rebuilt& r : rebuilt) {
    const std::vector<int64_t> slots = RowSlots({blocks[r.entry][r.layer]}, 0, bs, bs);
    if (absl::Status s = on_device ? owner_pool.memory->ScatterCodedRows(r.layer, slots, r.flat)
                                   : owner_pool.memory->ScatterTokens(r.layer, slots, r.keys.data(),
                                                                      r.values.data());
        !s.ok()) {
      remove_sequence();
      Log(LogLevel::kError, "stored codebook reconstruction failed", {{"error", s.ToString()}});
      return absl::InternalError(
          absl::StrCat("writing layer ", r.layer, " of a stored codebook failed: ", s.message()));
    }
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
    if (e != nullptr && e->blocks == entry_blocks[i]) {
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
    if (e.blocks[l] == PrefixStore::kCodedLayer) continue;
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
      if (e.blocks[l] == PrefixStore::kCodedLayer) continue;
      const uint64_t key = (uint64_t{l} << 32) | e.blocks[l];
      helps = deficit[l] > 0 && pool.allocators[l].refcount(e.blocks[l]) - dropped[key] == 1;
    }
    if (!helps) continue;
    victims.push_back(e.hash);
    for (uint32_t l = 0; l < num_layers; ++l) {
      if (e.blocks[l] == PrefixStore::kCodedLayer) continue;
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

bool CacheManager::EvictForBudgetLocked(uint64_t bytes) {
  // A merge of the pools' LRU lists (each ordered by last_used), planned before anything goes.
  struct Cursor {
    Pool* pool;
    std::list<PrefixStore::Entry>::const_iterator at, end;
  };
  std::vector<Cursor> cursors;
  for (const auto& [key, pool] : pools_) {
    if (pool->clients == 0 || pool->building || pool->prefixes.empty()) continue;
    const auto& order = pool->prefixes.lru_order();
    cursors.push_back({pool.get(), order.begin(), order.end()});
  }
  std::vector<std::pair<Pool*, std::string>> victims;
  uint64_t planned = 0;
  while (planned < bytes) {
    Cursor* oldest = nullptr;
    for (Cursor& c : cursors) {
      if (c.at != c.end && (oldest == nullptr || c.at->last_used < oldest->at->last_used)) {
        oldest = &c;
      }
    }
    if (oldest == nullptr) return false;
    planned += oldest->at->charge;
    victims.emplace_back(oldest->pool, oldest->at->hash);
    ++oldest->at;
  }
  for (auto& [pool, hash] : victims) DropPrefixLocked(*pool, hash);
  prefix_counters_.evictions += victims.size();
  Log(LogLevel::kInfo, "stored prefixes evicted for the memory budget",
      {{"entries", victims.size()}, {"bytes", planned}});
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
