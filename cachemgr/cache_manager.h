// CacheManager: the daemon's state — pools, client sessions with leases, sequences with per-layer
// block tables — and every operation on it. Backend-agnostic (memory comes from a
// DeviceBackend) and transport-agnostic (the gRPC service converts to and from these types).
//
// Errors: every method validates all of its inputs before changing anything, so a failed call
// leaves the state exactly as it was. Messages name the offending request field and quote at
// most 64 bytes of any client-supplied string (QuoteForMessage).
//   INVALID_ARGUMENT   malformed field (empty id, zero tokens, bad model description, a pool
//                      whose sizes overflow 64 bits)
//   NOT_FOUND          session_token names no attached client; unknown sequence, or a sequence
//                      of another owner (other tenants' sequences are invisible)
//   ALREADY_EXISTS     Fork's child id is taken
//   PERMISSION_DENIED  the sequence belongs to another client of the same owner; the session
//                      token was attached by another owner; an operator call (no session
//                      token) without Caller::operator_credential
//   FAILED_PRECONDITION  a pool with the same model name but another description exists; or
//                      session_token was issued by an earlier start of the daemon (another boot
//                      id): its session is gone and the client must attach again
//   RESOURCE_EXHAUSTED a layer has too few free blocks, the memory budget is spent, the reply
//                      would exceed max_reply_bytes, or Attach is over max_clients /
//                      max_clients_per_uid
//
// Owners and tenants: every client belongs to the owner that attached it (Caller::owner: the
// peer's uid; TCP and in-process callers form one owner). A session token works only for its
// owner, pools are never shared across owners (a model attached by two owners gets two pools),
// and without the operator credential a call sees only its owner's clients, pools and
// sequences.
//   ABORTED            the sequence is busy in a Compress / Fetch / Park, or was freed by
//                      another call while one of those worked on it
//   UNAVAILABLE        Compress / Fetch / Park stopped because the daemon is shutting down
//
// Memory budget: every byte the manager allocates on a client's behalf is charged before it is
// allocated and released when it is freed, and the charges never exceed memory_budget_bytes:
// pool memory as the backend allocates it (DeviceBackend::PoolBytes: page or granularity
// rounding included), the pool's per-block bookkeeping (kBookkeepingBytesPerBlockLayer per
// block and layer), and each client's Compress input buffer (rounded to pages).
//
// Quarantine: the blocks of a client whose lease expired (and those an operator Free takes from
// a client) are not handed out again until `quarantine` has passed, because the client may be
// stalled with the pool mapped and write to them when it resumes. They are neither used nor
// free meanwhile (free + used + quarantined == capacity on every layer), and a pool whose last
// client expired keeps its memory and budget until its quarantine ends. ExpireLeases ends
// quarantines. Detach and a client's own Free release at once: the client gave the blocks up.
//
// Leases are judged by when a call arrived (Caller::arrival), so a call that waited is not
// blamed for the wait.
//
// Thread-safe: one mutex serializes the bookkeeping (microseconds per call). Pool memory is
// created outside it (the budget reserved first), and the heavy part of Compress, Fetch and Park
// (scoring, codebooks, reconstruction) runs outside it on private copies, with the sequence
// marked busy.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/backend/device_backend.h"
#include "cachemgr/block_allocator.h"
#include "cachemgr/caller.h"
#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/event_hub.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/model_spec.h"
#include "cachemgr/util/clock.h"
#include "cachemgr/util/unique_fd.h"
#include "cachemgr/util/worker_pool.h"

namespace cachemgr {

struct CacheManagerOptions {
  absl::Duration heartbeat_interval = absl::Seconds(1);
  absl::Duration lease_timeout = absl::Seconds(10);
  // Bytes all pools together may hold.
  uint64_t memory_budget_bytes = uint64_t{1} << 30;
  // Bytes of a pool created by an Attach with num_blocks == 0 (capped by what the budget has).
  uint64_t default_pool_bytes = uint64_t{256} << 20;
  // block_size used when a client sends 0.
  uint32_t default_block_size = 16;
  // Largest num_new_tokens one Allocate accepts.
  uint32_t max_tokens_per_allocate = 1u << 20;
  // Ops one Step may carry.
  uint32_t max_step_ops = 4096;
  // Largest per-client Compress input buffer an Attach may ask for.
  uint64_t max_input_buffer_bytes = uint64_t{1} << 30;
  // Threads one Compress spreads its layers over (0: one per hardware thread).
  uint32_t compress_threads = 0;
  // Background Compresses (CompressParams::background) one client may have started and not yet
  // finished. Each holds a private copy of its inputs (up to the client's input buffer) and
  // keeps the blocks it reads referenced until FinishCompress.
  uint32_t max_background_compresses_per_client = 4;
  // How long the blocks of an expired client stay quarantined (see the file comment).
  // Zero means lease_timeout; shorter values count as lease_timeout.
  absl::Duration quarantine = absl::ZeroDuration();
  // Largest reply (encoded bytes) of a call that grows with a sequence: Allocate, GetSequence,
  // Fork, Compress, Fetch. 4 MiB is what a gRPC client receives by default.
  uint64_t max_reply_bytes = uint64_t{4} << 20;
  // Attached clients allowed in total and per owner (uid; TCP callers count as one owner).
  uint32_t max_clients = 1024;
  uint32_t max_clients_per_uid = 512;
};

inline constexpr size_t kMaxSequenceIdLength = 256;
// Host memory charged to the budget per block of a pool, per layer: the allocator's
// (BlockAllocator::kBookkeepingBytesPerBlock) and the block's entry in a sequence's block table.
// Each sequence is charged its own bookkeeping on top (the sequence, its id, its per-layer
// tables), and a Fork's child the block-table entries it duplicates: see
// CacheManager::SequenceChargeBytes.
inline constexpr uint64_t kBookkeepingBytesPerBlockLayer =
    BlockAllocator::kBookkeepingBytesPerBlock + sizeof(uint32_t);

// A tensor-parallel engine's ranks attach as a group (docs/MULTINODE.md, "Groups"): one session
// per rank, all naming the same group. The group's pool keeps rank r's shard of the KV heads
// ([r * H / size, (r + 1) * H / size) of every layer) in rank r's memory and one block table per
// layer for all of them, so Allocate / Free / Fork / Compress / Fetch / Park act on every rank at
// once, and any member's session may act on any sequence of the group.
inline constexpr uint32_t kMaxGroupSize = 64;
struct GroupMembership {
  std::string name;   // an identifier, unique per owner and model
  uint32_t rank = 0;  // < size
  uint32_t size = 1;  // 1..kMaxGroupSize, dividing num_q_heads and num_kv_heads; 1 is no group
  // The device of each rank's shard (size names: DeviceBackend::device_name(), a GPU's UUID);
  // empty: every shard on AttachParams::device. Only the first member's count; a later
  // member's, when given, must be the same.
  std::vector<std::string> devices = {};
};

struct AttachParams {
  std::string client_name;
  ModelSpec model;  // block_size 0 / rope.scaling_factor 0 mean defaults
  uint32_t num_blocks = 0;
  // Bytes of the client's Compress input buffer; 0 means 64 float32 window queries of every
  // layer (num_layers * 64 * num_q_heads * head_dim * 4; a group member: of its rank's heads).
  uint64_t input_buffer_bytes = 0;
  // A rank of a tensor-parallel engine: see GroupMembership.
  std::optional<GroupMembership> group = std::nullopt;
  // The device the pool lives on (DeviceBackend::device_name(): "host", a GPU's UUID); empty:
  // the daemon's first device. A model attached on two devices has a pool on each.
  std::string device = "";
};

struct PoolDescription {
  std::string pool_id;
  BackendKind backend = BackendKind::kHost;
  ShareMethod share_method = ShareMethod::kMemfd;
  std::string device;
  // Negotiated. For a group member: its rank's shard (num_q_heads and num_kv_heads divided by
  // group_size), which is what its regions hold.
  ModelSpec model;
  std::string group_name;  // empty when not a group
  uint32_t group_rank = 0;
  uint32_t group_size = 1;
  uint32_t num_blocks = 0;
  uint64_t block_bytes = 0;
  std::vector<RegionInfo> regions;
  std::vector<LayerPlacement> layers;
};

struct AttachResult {
  std::string client_id;
  // "<boot id>.<128 random bits as hex>": carries the boot id of the manager that issued it.
  std::string session_token;
  std::string boot_id;  // CacheManager::boot_id()
  PoolDescription pool;
  absl::Duration heartbeat_interval;
  absl::Duration lease_timeout;
  // The input buffer is the descriptor ShareFds returns after the pool's regions.
  uint32_t input_buffer_region_index = 0;
  uint64_t input_buffer_bytes = 0;
};

struct DetachResult {
  uint32_t sequences_freed = 0;
  uint64_t blocks_released = 0;
};

struct LayerAllocationResult {
  std::vector<uint32_t> new_block_ids;
  std::vector<int64_t> slot_mapping;
  uint32_t num_tokens = 0;
  std::vector<kernels::BlockCopyPair> copies;
};

struct AllocateResult {
  bool created = false;
  uint64_t first_position = 0;
  uint64_t num_positions = 0;
  std::vector<LayerAllocationResult> layers;
};

// One op of CacheManager::Step.
struct StepOp {
  enum class Kind : uint8_t { kAllocate, kFree, kFork, kMatchPrefix };
  Kind kind = Kind::kAllocate;
  std::string sequence_id;                // kAllocate, kFree; kFork: the parent
  std::string child_sequence_id;          // kFork
  uint32_t num_new_tokens = 0;            // kAllocate
  std::vector<std::string> block_hashes;  // kMatchPrefix
};

struct StepOpResult {
  absl::Status status;
  AllocateResult allocate;       // kAllocate
  uint64_t blocks_released = 0;  // kFree
  uint32_t matched_blocks = 0;   // kMatchPrefix
};

struct LayerTableSnapshot {
  uint32_t num_tokens = 0;
  std::vector<uint32_t> block_ids;
  std::optional<uint64_t> kv_digest;
  bool codebook = false;  // stored as a codebook (compress::CodedLayer)
  bool parked = false;    // its rows in the arena, no blocks
  uint32_t key_codebook_size = 0;
  uint32_t value_codebook_size = 0;
  uint64_t arena_bytes = 0;
};

struct SequenceSnapshot {
  std::string sequence_id;
  std::string owner_client_id;
  std::string parent_sequence_id;
  uint64_t num_positions = 0;
  std::vector<LayerTableSnapshot> layers;
  // Compression state (set once Compress succeeded).
  bool compressed = false;
  std::string compression_policy;
  std::vector<uint32_t> kept_per_layer;  // rows per KV head Compress left in each layer
  // The call working on the sequence outside the lock ("Compress", "Fetch", "Park",
  // "StorePrefix", "LoadPrefix"), or "".
  std::string busy;
  // A background Compress was started and not finished (CacheManager::FinishCompress); ready
  // once its work is done (its result waits for FinishCompress).
  bool compress_pending = false;
  bool compress_ready = false;
  // The last background Compress's work failed: its status (FinishCompress answers it), or "".
  std::string compress_error;
};

// ---- Compress / Fetch ----------------------------------------------------------------------

enum class CompressInput : uint8_t { kNone, kWindowQueries, kScores };

struct CompressParams {
  compress::PolicyConfig policy;  // resolved: preset + overrides (see ResolvePreset)
  compress::CompressTarget target;
  CompressInput input = CompressInput::kNone;
  uint32_t num_queries = 0;  // kWindowQueries
  // A CUDA interprocess event the client recorded after its KV writes (64 bytes), or empty.
  std::string cuda_ipc_event_handle;
  // Return once the inputs are copied; the work runs on the manager's background thread and
  // FinishCompress applies it (see CacheManager::Compress).
  bool background = false;
};

// The preset named `preset` ("" means compress::kDefaultPreset); INVALID_ARGUMENT naming
// "policy.preset".
absl::StatusOr<compress::PolicyConfig> ResolvePreset(const std::string& preset);

struct CompressedLayerResult {
  double context_ratio = 1.0;
  uint32_t kept_per_head = 0;  // tokens kept per KV head (window included)
  // Rows the layer holds: kept_per_head, then (FinishCompress) the rows appended since the
  // background Compress started, one position each.
  uint32_t num_tokens = 0;
  std::vector<uint32_t> block_ids;
  // [num_kv_heads, num_tokens]: the position of every row (the kept ones ascending per head,
  // then the appended ones).
  std::vector<uint32_t> kept_positions;
  bool codebook = false;
  uint32_t key_codebook_size = 0;
  uint32_t value_codebook_size = 0;
  uint64_t bytes_held = 0;
  double eq15_ratio = 1.0;
};

struct CompressResult {
  // A background Compress started (Compress) or still working (FinishCompress without wait):
  // nothing else is set.
  bool pending = false;
  // FinishCompress: rows appended since the background Compress started (per layer).
  uint32_t rows_appended = 0;
  std::string policy_name;  // the resolved policy's name (for metrics; not on the wire)
  std::vector<CompressedLayerResult> layers;
  uint64_t bytes_before = 0;  // whole blocks held before
  uint64_t bytes_after = 0;   // whole blocks held after + codebook arena
  double honest_ratio = 1.0;
  double eq15_ratio = 1.0;
  double reserve_ratio = 1.0;
  uint64_t blocks_released = 0;
};

struct FetchedLayerResult {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  std::vector<uint32_t> block_ids;
  // [num_kv_heads, num_tokens]: the position of every row (rows appended after Compress
  // included); empty for a sequence never compressed (row t is position t).
  std::vector<uint32_t> positions;
  uint32_t new_blocks = 0;
};

struct ParkedLayerResult {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;     // rows the layer holds, all in the arena now
  uint32_t rows_appended = 0;  // rows coded by this call (appended since the last Fetch)
  compress::AppendStats append;
  uint32_t key_codebook_size = 0;
  uint32_t value_codebook_size = 0;
  uint32_t queued = 0;  // vectors waiting for a batch after this call
  uint64_t arena_bytes = 0;
  uint32_t blocks_released = 0;
};

// ---- Prefix store --------------------------------------------------------------------------

// Hashes one StorePrefix / MatchPrefix / LoadPrefix call may carry (a 2 MiB prompt at 128
// tokens a block is 16384 blocks).
inline constexpr size_t kMaxPrefixHashesPerCall = 16384;

// StorePrefix's entries held as codebooks (paper §3.4: every token kept, each vector an entry
// reference and a magnitude; K entries pre-RoPE) rather than blocks. Per entry and layer, one
// codebook over the block's block_size rows (every KV head: CodebookScope::kLayer); a layer
// whose codebook would not be smaller than its block stays a block.
struct PrefixCodebookOptions {
  float theta_k = 0.0f;  // (0, 1]; 0: the "codebook" preset's
  float theta_v = 0.0f;
  // RoPE position of row 0 of block first_block (unset: first_block * block_size).
  std::optional<uint64_t> first_position;
};

struct StorePrefixResult {
  uint32_t stored = 0;           // new entries
  uint32_t already_stored = 0;   // hashes the store held (or that repeat in the call)
  uint32_t codebook_layers = 0;  // of the new entries' layers, those held as codebooks
  uint64_t codebook_bytes = 0;   // their bytes (CodedLayer::bytes)
};

struct LoadPrefixResult {
  // Leading hashes served: the new sequence holds that many blocks per layer (row t of block i
  // is token i * block_size + t of the prefix).
  uint32_t loaded_blocks = 0;
  // Entries whose KV no longer matched the digest taken when they were stored: dropped from
  // the store, and the load stops before the first of them.
  uint32_t corrupt_blocks = 0;
  std::optional<SequenceSnapshot> sequence;  // set when loaded_blocks > 0
};

// Daemon-wide prefix-store counters since start, in entries (one block in every layer).
struct PrefixCounters {
  uint64_t stored = 0;
  uint64_t hits = 0;    // entries LoadPrefix served
  uint64_t misses = 0;  // hashes LoadPrefix asked for past the last one served
  uint64_t evictions = 0;
  uint64_t corrupt = 0;
  uint64_t pools_reclaimed = 0;  // client-less pools released (with their store) for an Attach
};

struct SequenceSummary {
  std::string sequence_id;
  std::string owner_client_id;
  std::string owner_client_name;
  uint64_t num_positions = 0;
  uint64_t num_blocks = 0;
};

struct LayerOccupancy {
  uint32_t capacity_blocks = 0;
  uint32_t used_blocks = 0;
  uint32_t free_blocks = 0;
  uint32_t shared_blocks = 0;
  // Neither used nor free: released by an expired client, waiting out the quarantine.
  uint32_t quarantined_blocks = 0;
};

struct PoolSnapshot {
  std::string pool_id;
  std::string model_name;
  BackendKind backend = BackendKind::kHost;
  std::string device;
  std::string group_name;  // a tensor-parallel group's pool (empty otherwise)
  uint32_t group_size = 1;
  uint32_t group_ranks_attached = 0;
  uint64_t bytes = 0;              // pool memory, as allocated (every rank's)
  uint64_t bookkeeping_bytes = 0;  // per-block host bookkeeping charged beside it
  uint32_t clients = 0;
  std::vector<LayerOccupancy> layers;
  uint64_t arena_bytes = 0;  // codebook layers of the pool's sequences
  uint32_t compressed_sequences = 0;
  uint32_t prefix_entries = 0;          // stored prefix blocks (each one block in every layer)
  uint64_t prefix_bytes = 0;            // their host memory (bookkeeping + codebooks), as charged
  uint64_t prefix_only_blocks = 0;      // blocks (summed over layers) only the store holds
  uint64_t prefix_codebook_layers = 0;  // entries' layers held as codebooks (summed)
  uint64_t prefix_codebook_bytes = 0;   // their codebooks' bytes (part of prefix_bytes)
};

struct ClientSnapshot {
  std::string client_id;
  std::string client_name;
  std::string pool_id;
  uint32_t sequences = 0;
  absl::Duration lease_remaining;
  uint32_t group_rank = 0;  // its rank when its pool is a group's
};

struct StatsSnapshot {
  std::vector<PoolSnapshot> pools;
  std::vector<ClientSnapshot> clients;
  uint32_t num_sequences = 0;
  // Everything charged to the budget: pools (memory + bookkeeping, pools being built
  // included), client input buffers and sequences' own bookkeeping. Never above
  // memory_budget_bytes.
  uint64_t memory_used_bytes = 0;
  uint64_t memory_budget_bytes = 0;
  uint64_t input_buffer_bytes = 0;  // of all clients, as charged
  uint64_t sequence_bytes = 0;      // of all sequences, as charged (forks' duplicated tables)
  PrefixCounters prefix;            // daemon-wide: the operator's view only (zero otherwise)
};

// ---- Transfers between daemons (docs/MULTINODE.md) --------------------------------------

// One layer of a sequence as it travels.
struct SequenceImageLayer {
  uint32_t num_tokens = 0;  // rows per KV head
  // Travels as a codebook (compress::CodedLayerImage), not as rows; arrives parked.
  bool coded = false;
  // Compressed sequences: rows per KV head Compress left and their original token positions
  // [num_kv_heads, compressed_rows]; rows past them were appended since (one position each).
  uint32_t compressed_rows = 0;
  std::vector<uint32_t> compressed_positions;
};

// A sequence's shape as it travels between daemons: enough to allocate it and to rebuild its
// compression state. The rows travel apart, layer by layer, in the dtype named here.
struct SequenceImageHeader {
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp32;
  uint64_t num_positions = 0;
  std::vector<SequenceImageLayer> layers;
  bool compressed = false;
  std::string compression_policy;
  uint32_t compressed_tokens = 0;  // tokens when compressed

  // Bytes of one row (one token of every KV head, K or V alone).
  uint64_t RowBytes() const { return uint64_t{num_kv_heads} * head_dim * DTypeBytes(dtype); }
  // Bytes of every row of the layers that are not coded, K and V: what the rows' messages
  // carry.
  uint64_t PayloadBytes() const;
};

// A sequence on its way out (BeginExport .. EndExport, marked busy meanwhile) or in
// (BeginImport .. CommitImport / AbortImport, marked busy "ReceiveSequence" meanwhile). Its rows
// are read and written through it outside the manager's lock.
struct SequenceInTransit {
  std::string sequence_id;
  uint64_t serial = 0;
  SequenceImageHeader header;
  std::shared_ptr<PoolMemory> memory;
  std::vector<std::vector<uint32_t>> block_tables;  // per layer
  uint32_t block_size = 0;
  compress::ModelShape shape;  // the pool's model, as the compression library sees it
  // Export: the coded form of each coded layer (null for the others).
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded;

  // Rows [first, first + count) of `layer` (not a coded one), K and V, token-major in the header's
  // dtype (each count * RowBytes() bytes). INVALID_ARGUMENT for a layer or range the sequence
  // lacks, or (WriteRows) byte strings of another size; nothing is written then.
  absl::Status ReadRows(uint32_t layer, uint32_t first, uint32_t count, std::string* keys,
                        std::string* values) const;
  absl::Status WriteRows(uint32_t layer, uint32_t first, uint32_t count, absl::string_view keys,
                         absl::string_view values) const;
  // ReadRows / WriteRows with the caller's buffers (count * RowBytes() bytes each): host
  // memory, or with `on_device` the pool's own CUDA device memory (PoolMemory::PackRowsOnDevice,
  // what a row link on that device moves).
  absl::Status ReadRowsInto(uint32_t layer, uint32_t first, uint32_t count, std::byte* keys,
                            std::byte* values, bool on_device) const;
  absl::Status WriteRowsFrom(uint32_t layer, uint32_t first, uint32_t count, const std::byte* keys,
                             const std::byte* values, bool on_device) const;
  // XXH3-64 of the layer's rows (kv_store_digest.h): the same on both sides of a transfer
  // whatever the block sizes.
  absl::StatusOr<uint64_t> DigestRows(uint32_t layer) const;
};

class CacheManager {
 public:
  // `backend` and `clock` must outlive the manager; `events` may be null.
  CacheManager(CacheManagerOptions options, DeviceBackend* backend, const Clock* clock,
               EventHub* events);
  // Pools on several devices of the node: one backend per device (distinct device_name()s; the
  // first is where an Attach naming no device goes), all outliving the manager.
  CacheManager(CacheManagerOptions options, std::vector<DeviceBackend*> backends,
               const Clock* clock, EventHub* events);
  ~CacheManager();
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;

  const CacheManagerOptions& options() const { return options_; }
  // 64 random bits as 16 hex digits, drawn when the manager is created (once per daemon start).
  // Every session token starts with it, so a token from an earlier start is told apart from a
  // forged or mistyped one.
  const std::string& boot_id() const { return boot_id_; }
  // The manager's clock: what the service stamps Caller::arrival with.
  absl::Time Now() const { return clock_->Now(); }
  // How long expired clients' blocks stay quarantined (options.quarantine resolved).
  absl::Duration quarantine() const { return quarantine_; }

  // Registers a client owned by `caller.owner()`. The owner's first client of a model name
  // creates its pool; the owner's later clients must describe the same model
  // (FAILED_PRECONDITION naming the fields that differ, not their values) and share the pool.
  // The pool's memory is charged to the budget, then created outside the lock; an Attach of the
  // same model meanwhile waits for it (without the lock).
  // A group member (params.group, size > 1) joins its group's pool (created by its first member
  // with every rank's memory; see GroupMembership).
  //   INVALID_ARGUMENT    num_blocks makes a pool whose size overflows; input_buffer_bytes;
  //                       group.name / group.size / group.rank
  //   ALREADY_EXISTS      group.rank is attached
  //   FAILED_PRECONDITION group.size differs from the group's
  //   RESOURCE_EXHAUSTED  the pool or the input buffer does not fit what the budget has left;
  //                       attached clients are at --max_clients / --max_clients_per_uid
  absl::StatusOr<AttachResult> Attach(const AttachParams& params, const Caller& caller = {});

  // Renews the lease; returns the time left on it.
  absl::StatusOr<absl::Duration> Heartbeat(const Caller& caller);

  // Frees every sequence of the client and forgets it; releases its pool when no client is left.
  absl::StatusOr<DetachResult> Detach(const Caller& caller);

  // Appends `num_new_tokens` to `sequence_id` in every layer, creating the sequence on first
  // use. A shared, partially filled tail block is first replaced by a private copy (copy on
  // write). All layers or none: RESOURCE_EXHAUSTED names the layer, the blocks it needs and the
  // blocks it has free.
  absl::StatusOr<AllocateResult> Allocate(const Caller& caller, const std::string& sequence_id,
                                          uint32_t num_new_tokens);

  // Drops the sequence; returns blocks whose last reference went away. An empty token is an
  // operator call on any client's sequence (needs Caller::operator_credential).
  absl::StatusOr<uint64_t> Free(const Caller& caller, const std::string& sequence_id);

  // New sequence `child` sharing every block of `parent` (refcounts +1).
  absl::StatusOr<SequenceSnapshot> Fork(const Caller& caller, const std::string& parent_sequence_id,
                                        const std::string& child_sequence_id);

  // One scheduler step (cache_manager_step.cc, docs/PERF.md "Step"): `ops` applied in order under
  // one acquisition of the lock, each exactly as its per-call version (Allocate, Free, Fork,
  // MatchPrefix: the same checks, all or nothing, the same errors) with its own status; an op
  // that fails changes nothing and the next ones still run. Allocations list slot mappings only
  // with `include_slot_mapping` (they follow from the block tables). The whole step is refused,
  // changing nothing, for the caller's session (as any call), more than options.max_step_ops
  // ops or more than kMaxPrefixHashesPerCall block hashes in its lookups together (those within
  // the bound each; INVALID_ARGUMENT naming ops), or a reply that could exceed max_reply_bytes
  // (RESOURCE_EXHAUSTED).
  absl::StatusOr<std::vector<StepOpResult>> Step(const Caller& caller, absl::Span<const StepOp> ops,
                                                 bool include_slot_mapping);

  // With a token, only the caller's sequences (PERMISSION_DENIED otherwise); with an empty token,
  // read-only inspection of any sequence for the operator, of the owner's sequences for anyone
  // else (NOT_FOUND for others'). A token renews the lease, as every call with one does.
  // `include_kv_digest` reads the KV bytes.
  absl::StatusOr<SequenceSnapshot> GetSequence(const Caller& caller, const std::string& sequence_id,
                                               bool include_kv_digest);

  // The caller's sequences; with an empty token every client's for the operator, the owner's
  // clients' for anyone else. Sorted by id.
  absl::StatusOr<std::vector<SequenceSummary>> ListSequences(const Caller& caller);

  // One page of ListSequences: at most `page_size` sequences (0: kDefaultListPageSize; at most
  // kMaxListPageSize) whose ids sort after `page_token` (empty: from the first), and the token
  // of the next page (empty after the last). INVALID_ARGUMENT naming page_token / page_size.
  static constexpr uint32_t kDefaultListPageSize = 1000;
  static constexpr uint32_t kMaxListPageSize = 4000;  // 4000 summaries < 2 MiB
  struct SequencePage {
    std::vector<SequenceSummary> sequences;
    std::string next_page_token;
  };
  absl::StatusOr<SequencePage> ListSequencesPage(const Caller& caller,
                                                 const std::string& page_token, uint32_t page_size);

  // Everything (the daemon's own view: metrics, shutdown).
  StatsSnapshot Stats() const;
  // What `caller` may see: everything with the operator credential; otherwise the pools and
  // clients of the caller's owner, the number of the owner's sequences, and the daemon-wide
  // memory_used_bytes.
  StatsSnapshot Stats(const Caller& caller) const;

  // Compresses the caller's sequence in place (docs/COMPRESSION.md). Inputs are read from the
  // caller's input buffer. Plain layers are compacted in place: row r of KV head h takes that
  // head's r-th kept token; the first ceil(rows / block_size) blocks of the table are kept and
  // the rest released (so Compress needs no free blocks). A layer sharing blocks with a fork
  // (a prefix-cached prompt, say) is instead written to ceil(rows / block_size) fresh blocks,
  // and the fork keeps the old ones. Codebook layers move to a per-sequence arena
  // (compress::CodedLayer) and release every block until Fetch.
  // An empty token is an operator call on any client's sequence, with no inputs (needs
  // Caller::operator_credential). With
  // params.cuda_ipc_event_handle the rows are read only after the client's event completed.
  //   FAILED_PRECONDITION  already compressed
  //   INVALID_ARGUMENT     policy.* / target.* / num_queries / input (operator calls: not NONE)
  //                        / cuda_ipc_event_handle (cannot be opened; operator calls: not empty)
  //   OUT_OF_RANGE         target.byte_ratio outside what the policy can reach here
  //   RESOURCE_EXHAUSTED   a shared layer needs more fresh blocks than are free; a background
  //                        Compress over max_background_compresses_per_client
  //
  // params.background (an owner's call only): the call validates, copies the inputs, keeps a
  // reference to every block the work reads, and returns CompressResult::pending at once; the
  // work runs on the manager's background thread. Meanwhile the sequence stays readable and
  // appendable in its uncompressed form: Allocate / Step append rows as usual (a partial last
  // block is copied on write, since the work holds it), Fork and GetSequence work; another
  // Compress is FAILED_PRECONDITION. A Watch event SEQUENCE_COMPRESS_READY says when the work is
  // done; FinishCompress applies it.
  absl::StatusOr<CompressResult> Compress(const Caller& caller, const std::string& sequence_id,
                                          const CompressParams& params);

  // Applies the caller's background Compress (see Compress) once its work is done: with `wait`
  // it waits for the work, without it returns CompressResult::pending while it is not done. Call
  // it when the KV writes into the rows appended since the Compress started are complete (or
  // pass the client's write event): those rows follow the kept ones in every layer, each
  // keeping its position. Codebook layers park in the arena when nothing was appended; when
  // rows were, they stay resident like plain layers, holding their kept rows as they were (not
  // yet the codebook's reconstruction) and the appended ones, until Park codes the appended
  // rows and releases the blocks. A refusal changes nothing (the Compress stays pending; retry,
  // or Free). A work that failed ended the background Compress when it failed, leaving the
  // sequence as it was: this answers its error (and so does GetSequence's compress_error) until
  // the next Compress.
  //   FAILED_PRECONDITION  no background Compress of the sequence is pending or failed
  //   ABORTED              another call works on the sequence (a concurrent FinishCompress)
  //   RESOURCE_EXHAUSTED   a layer shared with a fork needs more fresh blocks than are free,
  //                        or the reply would be too large
  //   the work's error     INVALID_ARGUMENT / OUT_OF_RANGE for a target the policy cannot
  //                        reach, UNAVAILABLE when the daemon's shutdown stopped it
  absl::StatusOr<CompressResult> FinishCompress(const Caller& caller,
                                                const std::string& sequence_id, bool wait,
                                                const std::string& cuda_ipc_event_handle);

  // Makes `layers` (empty: all) resident: codebook layers are reconstructed into newly
  // allocated blocks (all or nothing: RESOURCE_EXHAUSTED changes nothing); others are
  // returned as they are. A second Fetch allocates nothing.
  //   INVALID_ARGUMENT  a layer out of range or listed twice
  absl::StatusOr<std::vector<FetchedLayerResult>> Fetch(const Caller& caller,
                                                        const std::string& sequence_id,
                                                        const std::vector<uint32_t>& layers);

  // Returns fetched codebook layers (`layers`; empty: every codebook layer) to the arena and
  // releases their blocks. Rows appended since the last Fetch are coded first (paper §3.4):
  // each vector joins its codebook part's most similar entry when cos > theta, the rest queue
  // and are coded by Algorithm 1 in batches of policy.append_batch (compress::CodedLayer).
  // Layers already parked are reported unchanged.
  //   FAILED_PRECONDITION  never compressed, or a listed layer is not a codebook layer
  //   INVALID_ARGUMENT     a layer out of range or listed twice
  //   INVALID_ARGUMENT     cuda_ipc_event_handle cannot be opened (as for Compress)
  absl::StatusOr<std::vector<ParkedLayerResult>> Park(
      const Caller& caller, const std::string& sequence_id, const std::vector<uint32_t>& layers,
      const std::string& cuda_ipc_event_handle = {});

  // ---- Prefix store (docs/PREFIX_STORE.md) ----
  // Each pool keeps blocks under content hashes of the prefix they end (vLLM's chained block
  // hashes): an entry holds one reference on one block of every layer, so the KV outlives the
  // sequence and the client that wrote it and is shared by every client of the pool. Entries
  // are evicted least recently used first when Allocate, Fetch or Compress lacks free blocks
  // (only entries whose blocks nobody else holds, and only when that makes the call succeed)
  // and, across the pools that have clients, when any call's charge finds the budget short
  // (only when that makes the charge fit); a pool whose clients are all gone stays while it
  // has entries, until an Attach needs its budget. Entries stored with a codebook hold their
  // rows in host memory charged to the budget, no blocks. Hashes: 1-64 bytes each,
  // 1-kMaxPrefixHashesPerCall per call (INVALID_ARGUMENT naming block_hashes[i]).

  // Stores block first_block + i of the caller's sequence (every layer) under hashes[i]; hashes
  // already stored are kept as they are. The sequence must be uncompressed with every named
  // block full. Each new entry's per-layer digest is taken outside the lock (the sequence busy
  // meanwhile) and checked by LoadPrefix. With `codebook`, the new entries' layers are coded
  // outside the lock instead (PrefixCodebookOptions; K un-rotated at the tokens' positions
  // in the prefix, first_block * block_size on) and hold no block. The new entries are charged
  // to the budget.
  //   FAILED_PRECONDITION  the sequence is compressed (its rows are not its tokens)
  //   INVALID_ARGUMENT     a named block is not full in some layer; a theta outside (0, 1]
  //   RESOURCE_EXHAUSTED   the budget has no room for the entries (bookkeeping, codebooks)
  absl::StatusOr<StorePrefixResult> StorePrefix(
      const Caller& caller, const std::string& sequence_id, uint32_t first_block,
      const std::vector<std::string>& hashes,
      const std::optional<PrefixCodebookOptions>& codebook = std::nullopt);

  // How many leading hashes the caller's pool has stored. Read-only: changes no order.
  absl::StatusOr<uint32_t> MatchPrefix(const Caller& caller,
                                       const std::vector<std::string>& hashes);

  // Creates the caller's sequence `sequence_id` holding the blocks of the leading stored hashes
  // (a reference each, like Fork; a layer held as a codebook is reconstructed into a fresh
  // block, evicting other entries if that is what frees one), after checking their digests
  // outside the lock: an entry
  // whose KV changed since it was stored is dropped and the load stops before it. The client
  // reads the rows through its mapping, then frees the sequence. Nothing is created when no
  // hash is served. Served entries become the most recently used (the first hash last, so a
  // chain is evicted from its tail).
  //   ALREADY_EXISTS  sequence_id exists
  absl::StatusOr<LoadPrefixResult> LoadPrefix(const Caller& caller, const std::string& sequence_id,
                                              const std::vector<std::string>& hashes);

  // ---- Transfers between daemons (cache_manager_transfer.cc, docs/MULTINODE.md) ----
  // The service sends a sequence to a peer with BeginExport, SequenceInTransit::ReadRows (and
  // the coded layers' images) and EndExport; the peer receives it with BeginImport, WriteRows
  // and CommitImport (or AbortImport when the stream fails).

  // Marks the caller's sequence busy ("TransferSequence") and describes it. Every call that
  // would change it is refused meanwhile (ABORTED); Free is not. Parked codebook layers travel
  // coded (SequenceInTransit::coded).
  //   FAILED_PRECONDITION  a codebook layer is fetched (Park it first)
  absl::StatusOr<SequenceInTransit> BeginExport(const Caller& caller,
                                                const std::string& sequence_id);
  // Ends an export: the sequence is no longer busy, or with `release` (a move the peer
  // confirmed) it is freed. Returns the blocks released; 0 when Free took it meanwhile.
  uint64_t EndExport(const SequenceInTransit& exported, bool release);

  // Creates `sequence_id` in the session of `caller` (a peer daemon's call carries the
  // destination's token: Caller::peer_daemon) with blocks for every row `header` describes,
  // busy until CommitImport (every call but Free refused). All or nothing, as Allocate.
  //   INVALID_ARGUMENT     header.* does not fit the session's pool (naming the field)
  //   ALREADY_EXISTS       sequence_id exists
  //   RESOURCE_EXHAUSTED   a layer has too few free blocks, or the budget no room
  absl::StatusOr<SequenceInTransit> BeginImport(const Caller& caller,
                                                const std::string& sequence_id,
                                                const SequenceImageHeader& header);
  // Makes the imported sequence visible, with the header's compression state and `coded`, the
  // coded layers received (by layer; null for the others). INVALID_ARGUMENT when a coded layer
  // is missing or its rows are not the header's; ABORTED when the sequence was freed (or its
  // client detached) meanwhile.
  absl::StatusOr<SequenceSnapshot> CommitImport(
      const SequenceInTransit& imported,
      const std::vector<std::shared_ptr<const compress::CodedLayer>>& coded = {});
  // Frees an import that failed. Returns the blocks released.
  uint64_t AbortImport(const SequenceInTransit& imported);

  // Descriptors of the caller's pool regions, then of the caller's input buffer, duplicated
  // for the caller (who owns them).
  absl::StatusOr<std::vector<UniqueFd>> ShareFds(const Caller& caller);

  // Expires every client whose lease ran out (freeing what it held); returns their client ids.
  std::vector<std::string> ExpireLeases();

  // Shutdown begins: Compress, Fetch and Park working outside the lock stop before their next
  // layer and answer UNAVAILABLE, changing nothing. Thread-safe, idempotent; the daemon calls it
  // before it waits for calls in flight.
  void BeginShutdown();

  // Detaches every client and releases every pool, quarantined ones included (daemon
  // shutdown). Waits for pools being built.
  void Shutdown();

  // Checks every allocator (free + used + quarantined == capacity), that each block's refcount
  // equals the number of sequence layer tables referencing it, and the byte accounting: the
  // budget's charges equal pool memory + bookkeeping + input buffers and stay within the
  // budget; a pool with no client is held only by quarantined blocks. O(total blocks). For
  // tests.
  absl::Status CheckInvariants() const;

 private:
  struct Pool;
  struct Client;
  struct Sequence;
  struct Compression;
  struct CompressJob;

  // Compress in three steps (cache_manager_compress.cc): validates and copies under the lock
  // (marking the sequence busy, or for a background job pinning the blocks it reads); computes
  // outside it; applies under it again.
  absl::StatusOr<std::shared_ptr<CompressJob>> BeginCompressLocked(const Caller& caller,
                                                                   const std::string& sequence_id,
                                                                   const CompressParams& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ComputeCompress(CompressJob& job) const;
  // Codebook layers park in the arena, unless rows were appended since the job started: then
  // they stay resident like plain layers (see FinishCompress).
  absl::StatusOr<CompressResult> ApplyCompressLocked(Sequence& seq, CompressJob& job)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs a background job (on background_) and announces it ready.
  void RunBackgroundCompress(const std::shared_ptr<CompressJob>& job);
  // Ends the sequence's background Compress: drops its block references (into quarantine until
  // `quarantine_until`, if set). Returns the blocks whose last reference went away.
  uint64_t EndBackgroundLocked(Sequence& seq, std::optional<absl::Time> quarantine_until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The memory rank `rank` of `pool` maps: the pool's own when it is not a group's, else the
  // rank's shard of its ShardedPoolMemory.
  static const PoolMemory& RankMemory(const Pool& pool, uint32_t rank);
  // Whether `a` may act on the sequences of `b`: the same client, or members of one group.
  static bool SharesSequences(const Client& a, const Client& b);
  // The backend of `device` ("" : the first); INVALID_ARGUMENT naming `field` and the devices
  // there are otherwise.
  absl::StatusOr<DeviceBackend*> FindBackend(const std::string& device,
                                             const std::string& field) const;
  // RESOURCE_EXHAUSTED when one more client of `owner` would exceed a client cap.
  absl::Status CheckClientCapsLocked(const std::optional<uid_t>& owner) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Looks up a live client (an expired one is reaped here and reported NOT_FOUND) of the
  // caller's owner (PERMISSION_DENIED for another owner's token).
  absl::StatusOr<Client*> FindClientLocked(const Caller& caller) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Sequence*> FindOwnedSequenceLocked(const Client& client,
                                                    const std::string& sequence_id,
                                                    const char* field) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The caller's sequence, or with an empty token (an operator call, which needs the operator
  // credential) anyone's.
  absl::StatusOr<Sequence*> FindSequenceForCallerLocked(const Caller& caller,
                                                        const std::string& sequence_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The client's write event for `handle` (null for an empty one), opened on first use of a
  // handle; INVALID_ARGUMENT naming cuda_ipc_event_handle when the backend cannot open it.
  absl::StatusOr<std::shared_ptr<const ClientEvent>> WriteEventLocked(Client& client,
                                                                      const std::string& handle)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Allocate, Free and Fork for a client already found (Step applies many under one lock):
  // Allocate lists slot mappings only with `slot_mapping` (and checks its per-call reply size
  // only then); Fork checks the size of its per-call reply only with `reply`.
  absl::StatusOr<AllocateResult> AllocateLocked(Client& client, const std::string& sequence_id,
                                                uint32_t num_new_tokens, bool slot_mapping)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t FreeLocked(Sequence& seq, bool by_operator) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Sequence*> ForkLocked(Client& client, const std::string& parent_sequence_id,
                                       const std::string& child_sequence_id, bool reply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops the sequence's block references; returns the blocks whose last reference went away.
  // With `quarantine_until` those wait in quarantine until then instead of becoming free.
  uint64_t ReleaseSequenceLocked(Sequence& seq, std::optional<absl::Time> quarantine_until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What a sequence's own bookkeeping is charged (see kBookkeepingBytesPerBlockLayer): a Fork's
  // child also pays for the `duplicated_entries` block-table entries it copies.
  static uint64_t SequenceChargeBytes(const std::string& sequence_id, uint32_t num_layers,
                                      uint64_t duplicated_entries);
  // Charges `bytes` to the budget, or RESOURCE_EXHAUSTED naming `what` with what is left.
  // Stored prefixes give way first if that makes it fit (EvictForBudgetLocked).
  absl::Status ChargeLocked(uint64_t bytes, const std::string& what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops least recently used stored prefixes of the pools that have clients (across pools, by
  // PrefixStore::Entry::last_used) until their charges refunded add up to `bytes`; drops none
  // and returns false when all of them would not. Client-less pools are reclaimed whole
  // instead (ReclaimIdlePoolsLocked), where the caller can say which pool to keep.
  bool EvictForBudgetLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Registers a client of `pool` (built) with its input buffer (already charged).
  AttachResult AddClientLocked(Pool& pool, const std::optional<uid_t>& owner,
                               const std::string& client_name, uint32_t rank,
                               MemfdRegion input_buffer, uint64_t input_bytes,
                               uint64_t input_charge) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evicts least recently used prefix entries of `pool` whose blocks only the store holds until
  // every layer l has needed[l] free blocks; evicts nothing when that cannot be reached. Returns
  // whether the blocks are free now.
  bool MakeRoomLocked(Pool& pool, const std::vector<uint32_t>& needed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes the entry under `hash` from `pool`'s store, releasing its references and refunding
  // its charge; returns the blocks (summed over layers) whose last reference went away.
  uint64_t DropPrefixLocked(Pool& pool, const std::string& hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Releases client-less pools kept only by their prefix stores (never `keep`), least recently
  // used first, until the budget has `bytes` left; releases none when releasing them all would
  // not leave `bytes`.
  void ReclaimIdlePoolsLocked(uint64_t bytes, const Pool* keep = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops every stored prefix of `pool` (which has no client) and releases it unless quarantined
  // blocks keep it; `why` goes to the log. `pool` may be destroyed.
  void ReclaimIdlePoolLocked(Pool& pool, const char* why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Releases the pool keyed `pool_key` if no client, no build, no stored prefix and no
  // quarantined block holds it.
  void MaybeReleasePoolLocked(const std::string& pool_key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // RESOURCE_EXHAUSTED when a reply of `bytes` would exceed max_reply_bytes; `what` says which.
  absl::Status CheckReplyBytes(uint64_t bytes, const std::string& what) const;
  DetachResult RemoveClientLocked(const std::string& token, EventType why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SequenceSnapshot SnapshotLocked(const Sequence& seq) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The sequence created with `serial` if it still exists.
  Sequence* FindSerialLocked(const std::string& sequence_id, uint64_t serial)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Per layer, the position of each row (see FetchedLayerResult::positions).
  // Threads a Compress (and a Fetch's reconstruction) spreads its layers over.
  uint32_t CompressThreads() const;
  std::vector<uint32_t> RowPositionsLocked(const Sequence& seq, uint32_t layer) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void PublishLocked(EventType type, const std::string& client_id, const std::string& sequence_id,
                     const std::string& pool_id, std::string detail)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CacheManagerOptions options_;
  const std::string boot_id_;
  const absl::Duration quarantine_;
  // One per device, the default first.
  const std::vector<DeviceBackend*> backends_;
  const Clock* const clock_;
  EventHub* const events_;
  std::atomic<bool> shutting_down_{false};

  mutable absl::Mutex mu_;
  // Keyed by PoolKey(owner, model name).
  absl::flat_hash_map<std::string, std::unique_ptr<Pool>> pools_ ABSL_GUARDED_BY(mu_);
  // Keyed by session token.
  absl::flat_hash_map<std::string, std::unique_ptr<Client>> clients_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);
  // Charged to the budget (see the file comment); <= options_.memory_budget_bytes.
  uint64_t memory_used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // Pools whose memory is being created outside the lock.
  int builds_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_client_serial_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_sequence_serial_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_pool_serial_ ABSL_GUARDED_BY(mu_) = 1;
  PrefixCounters prefix_counters_ ABSL_GUARDED_BY(mu_);
  // One thread for background Compresses (each spreads over compress_threads): each client's in
  // start order, the clients with jobs waiting taking turns.
  // Last, so it is joined before anything its jobs use goes (the destructor joins it).
  std::unique_ptr<WorkerPool> background_;
};

}  // namespace cachemgr
