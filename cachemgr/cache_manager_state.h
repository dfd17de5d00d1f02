// The state behind CacheManager (its private nested types), shared by cache_manager.cc
// (sessions, blocks, sequences) and cache_manager_compress.cc (Compress, Fetch, Park). Not part
// of any public interface.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/prefix_store.h"
#include "cachemgr/util/quote.h"

namespace cachemgr {

struct CacheManager::Pool {
  std::string pool_id;
  // Its key in pools_ (PoolKey): pools are never shared across owners, so one tenant can never
  // map another's KV memory.
  std::string key;
  std::optional<uid_t> owner;
  ModelSpec model;  // the whole model (a group's ranks each hold a shard of its heads)
  // A tensor-parallel group's pool (AttachParams::group): its name, its size, and the client of
  // each rank (null while that rank is not attached). Empty name, size 1 and no ranks otherwise.
  std::string group_name;
  uint32_t group_size = 1;
  std::vector<Client*> ranks;
  // The device of each rank's memory (one entry when the pool is not a group's).
  std::vector<DeviceBackend*> rank_backends;
  uint32_t num_blocks = 0;
  // Charged to the budget: the memory (DeviceBackend::PoolBytes, then what was allocated) and
  // the per-block bookkeeping.
  uint64_t bytes = 0;
  uint64_t bookkeeping_bytes = 0;
  // Its memory is being created outside the lock: no memory, no allocators, no clients yet.
  bool building = false;
  // While building: the input buffer of the client whose Attach builds it, charged to the budget
  // with the pool until that client exists.
  uint64_t building_input_charge = 0;
  // Shared so that Compress's work outside the lock keeps it alive if the pool is released
  // meanwhile. A group's is a ShardedPoolMemory (all heads; RankMemory gives a rank's shard).
  std::shared_ptr<PoolMemory> memory;
  std::vector<BlockAllocator> allocators;  // one per layer
  uint32_t clients = 0;
  // Stored prefixes (CacheManager::StorePrefix); they keep the pool when no client is left.
  PrefixStore prefixes;
  // Last StorePrefix / LoadPrefix / Attach: idle pools are reclaimed least recently used first.
  absl::Time last_used;
  // When the quarantine of the pool's last expired client ends: until then blocks the store
  // drops are quarantined too (that client may still write to any block of the pool).
  absl::Time stalled_writers_until = absl::InfinitePast();
};

struct CacheManager::Client {
  std::string client_id;
  std::string client_name;
  std::string session_token;
  // The uid that attached (Caller::owner); calls presenting the token from another are refused.
  std::optional<uid_t> owner;
  Pool* pool = nullptr;
  uint32_t rank = 0;  // its rank in pool's group (0 when the pool is not a group's)
  absl::Time lease_deadline;
  std::vector<std::string> sequences;  // ids, insertion order
  // Compress inputs, written by the client; shared so a Compress copying it outside the lock
  // keeps it mapped should the client detach meanwhile.
  std::shared_ptr<const MemfdRegion> input_buffer;
  uint64_t input_charge = 0;  // its bytes charged to the budget (whole pages)
  // The client's CUDA write event (Compress / Park cuda_ipc_event_handle), opened once per
  // handle; shared so a call waiting on it outside the lock keeps it open.
  std::string write_event_handle;
  std::shared_ptr<const ClientEvent> write_event;
  // Its sequences' background Compresses not yet finished (<=
  // max_background_compresses_per_client).
  uint32_t background_compresses = 0;
};

// What Compress left of a sequence, per layer: the rows it kept and, for codebook layers, their
// coded form. Immutable once built (forks share it; Park builds a new one).
struct CacheManager::Compression {
  struct Layer {
    uint32_t rows = 0;                // rows per KV head Compress left
    std::vector<uint32_t> positions;  // [num_kv_heads, rows]: original token index of each row
    // Codebook layers: the coded rows (Compress's, then every row Park coded since).
    std::shared_ptr<const compress::CodedLayer> coded;
  };
  std::string policy_name;
  compress::PolicyConfig policy;
  uint32_t num_tokens = 0;  // tokens (= positions) when compressed
  std::vector<Layer> layers;
};

struct CacheManager::Sequence {
  struct LayerTable {
    std::vector<uint32_t> blocks;
    uint32_t num_tokens = 0;  // rows
    // A codebook layer at rest: num_tokens rows live in the arena, no blocks until Fetch.
    bool parked = false;
  };
  uint64_t serial = 0;  // unique per sequence ever created (ids can be reused after Free)
  std::string sequence_id;
  Client* owner = nullptr;
  std::string parent_sequence_id;
  uint64_t num_positions = 0;
  std::vector<LayerTable> layers;
  std::shared_ptr<const Compression> compression;
  // Bytes charged to the budget for this sequence's own bookkeeping (SequenceChargeBytes).
  uint64_t charge = 0;
  // Set while Compress, Fetch or Park works on a copy outside the lock: the name of the call.
  // Every call that would change the sequence is refused (ABORTED) meanwhile; Free is not, and
  // the working call then finds the sequence gone and changes nothing.
  const char* busy = nullptr;
  // A background Compress from its start until FinishCompress applies it, its work fails, or
  // the sequence ends.
  std::shared_ptr<CompressJob> background;
  // Why the last background Compress's work failed (OK otherwise): what FinishCompress answers
  // until the next Compress.
  absl::Status compress_error;
};

// One Compress: what its first step copied out under the lock, and what its work computed. The
// work reads only this and the pool memory (kept alive here), never the manager's state.
struct CacheManager::CompressJob {
  std::string client_id;  // the owner's: background jobs of different clients take turns
  std::string sequence_id;
  uint64_t serial = 0;
  CompressParams params;
  compress::ModelShape shape;
  uint32_t n = 0;  // rows of every layer when it started
  uint32_t threads = 1;
  size_t per_layer_inputs = 0;
  // A private copy of the inputs (the client may write the buffer again), and the buffers
  // holding them until copied: the owner's, or a group's ranks' (each its share of the heads).
  std::vector<float> inputs;
  std::vector<std::shared_ptr<const MemfdRegion>> input_buffers;
  // The pool's memory (kept alive should the pool be released meanwhile), every layer's row
  // slots [0, n), which layers shared a block with a fork, and the client's write event.
  std::shared_ptr<PoolMemory> memory;
  std::shared_ptr<const ClientEvent> write_event;
  std::vector<std::vector<int64_t>> slots;
  std::vector<bool> shared;
  // Background jobs: a reference to every block of rows [0, n) per layer (under the manager's
  // lock), so that nothing writes them until the job ends.
  std::vector<std::vector<uint32_t>> pinned;
  // The work's results.
  absl::StatusOr<compress::SequenceResult> computed = absl::UnknownError("not computed");
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded;
  std::vector<std::vector<float>> keys, values;  // rows read for codebooks and shared layers
  absl::Notification done;                       // the work finished (background jobs)
};

namespace cache_manager_internal {

inline uint32_t CeilDiv(uint64_t a, uint32_t b) { return static_cast<uint32_t>((a + b - 1) / b); }

// The slot of row `row` of a layer table (block_table[row / bs] * bs + row % bs).
inline int64_t SlotOf(const std::vector<uint32_t>& blocks, uint32_t row, uint32_t block_size) {
  return int64_t{blocks[row / block_size]} * block_size + row % block_size;
}

// The compression library's view of a pool's model.
compress::ModelShape ShapeOf(const ModelSpec& model);

// The slots of rows [begin, end) of a layer table.
std::vector<int64_t> RowSlots(const std::vector<uint32_t>& blocks, uint32_t begin, uint32_t end,
                              uint32_t block_size);

// A layer's rows at `slots` as float32 [slots.size(), num_kv_heads, head_dim].
absl::Status GatherLayerRows(const PoolMemory& memory, uint32_t layer,
                             const std::vector<int64_t>& slots, std::vector<float>* keys,
                             std::vector<float>* values);

// ABORTED while another call works on the sequence outside the lock.
inline absl::Status CheckNotBusy(const std::string& sequence_id, const char* busy) {
  if (busy == nullptr) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                                         " is busy in ", busy, "; retry when it returns"));
}

// INVALID_ARGUMENT naming `field` unless `id` is a valid sequence id.
inline absl::Status CheckSequenceId(const std::string& id, const char* field) {
  if (!IsValidIdentifier(id, kMaxSequenceIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be 1-", kMaxSequenceIdLength,
                                                   " printable characters without spaces"));
  }
  return absl::OkStatus();
}

// Unlocks a held mutex for its scope and locks it again on the way out (exceptions included).
class MutexUnlock {
 public:
  explicit MutexUnlock(absl::Mutex* mu) ABSL_UNLOCK_FUNCTION(mu) : mu_(mu) { mu_->Unlock(); }
  ~MutexUnlock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_->Lock(); }
  MutexUnlock(const MutexUnlock&) = delete;
  MutexUnlock& operator=(const MutexUnlock&) = delete;

 private:
  absl::Mutex* const mu_;
};

// StorePrefix / MatchPrefix / LoadPrefix's check of their hashes (INVALID_ARGUMENT naming
// block_hashes: 1-kMaxPrefixHashesPerCall hashes of 1-PrefixStore::kMaxHashBytes bytes each).
absl::Status CheckPrefixHashes(const std::vector<std::string>& hashes);

// How many leading hashes `store` holds.
uint32_t LeadingPrefixHits(const PrefixStore& store, const std::vector<std::string>& hashes);

// What Compress, Fetch and Park answer when the daemon's shutdown stopped them.
inline absl::Status ShutdownCancelled(const char* call) {
  return absl::UnavailableError(absl::StrCat("cachemgrd is shutting down: ", call,
                                             " stopped between layers and changed nothing"));
}

}  // namespace cache_manager_internal
}  // namespace cachemgr
