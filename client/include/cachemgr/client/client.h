// The C++ client of cachemgrd. Hides gRPC and protobuf: every call returns absl::Status or
// absl::StatusOr carrying the daemon's status code and message unchanged.
//
//   ASSIGN_OR_RETURN(auto session, cachemgr::client::Session::Attach("/run/cachemgr/cachemgr.sock",
//                                                                    options));
//   ASSIGN_OR_RETURN(auto alloc, session->Allocate("req-1", 48));
//   if (!session->lease_ok()) return session->status();  // before each batch of writes
//   float* k = session->pool().key<float>(/*layer=*/0, alloc.layers[0].new_block_ids[0], 0, 0);
//
// Lease loss and daemon restarts. The client keeps a local lease deadline, renewed by every call
// that reached the daemon (send time + lease timeout - a margin, on CLOCK_BOOTTIME: never later
// than the daemon's own deadline). When it passes without renewal, or the daemon says it no
// longer knows the session (lease expired, or a token from an earlier daemon start), the session
// is *lost*: the pool mapping is revoked first (its addresses now reach private memory, never
// the pool: see MappedRegion::Revoke), then every call fails with status() (ABORTED "lease
// expired at ...; the daemon reclaimed this client's blocks", or UNAVAILABLE when the daemon was
// unreachable), lease_ok() is false, and on_event hears kLost. While the daemon is down, calls
// fail promptly with UNAVAILABLE (gRPC's own), and the lease runs out as usual.
// A lost session's sequences are gone. With auto_reattach the heartbeat thread attaches a new
// session as soon as the daemon answers (new token, the pool mapped again; on_event hears
// kReady); the engine adopts it with Reattach(), which bumps generation(), and then recomputes
// what it had (prefill again). Calls keep failing until Reattach(), so a request that started
// before the loss can never run against the new session by accident.
//
// Thread safety: a Session may be used from several threads at once. pool(), input_buffer() and
// the identity accessors change only at Reattach(); references they returned earlier stay valid
// (reaching the revoked memory of their generation) for the Session's lifetime.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/client/kv_pool_view.h"

namespace cachemgr::client {

enum class DType { kFp16, kBf16, kFp32 };
enum class CacheLayout { kFlashAttn, kFlashInfer };
enum class RopeStyle { kNone, kInterleaved, kHalfSplit };

// Bytes of one element of `dtype`.
uint32_t DTypeBytes(DType dtype);

struct RopeConfig {
  RopeStyle style = RopeStyle::kInterleaved;
  double theta = 10000.0;
  double scaling_factor = 1.0;
  uint32_t rotary_dim = 0;  // 0 = head_dim
};

struct ModelSpec {
  std::string name;
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;
  uint32_t block_size = 16;
  CacheLayout layout = CacheLayout::kFlashAttn;
  RopeConfig rope;
};

// What the heartbeat thread (or a call that noticed first) reports about the session.
struct SessionEvent {
  enum class Kind {
    // Generation `generation` is lost; its mapping was revoked before this was sent. `status`
    // is what calls now return.
    kLost,
    // A new session is attached and mapped in the background (auto_reattach); Reattach() adopts
    // it as generation `generation`.
    kReady,
  };
  Kind kind = Kind::kLost;
  uint64_t generation = 0;
  absl::Status status;
};

struct AttachOptions {
  std::string client_name;
  ModelSpec model;
  // Blocks per layer if this attach creates the pool; 0 lets the daemon decide.
  uint32_t num_blocks = 0;
  // Send heartbeats from a background thread at the interval the daemon asks for. The same
  // thread revokes the mapping when the local lease deadline passes and, with auto_reattach,
  // attaches a new session once a lost one's daemon answers again. Without it, the lease is
  // checked (and the mapping revoked) only by calls and lease_ok().
  bool auto_heartbeat = true;
  bool auto_reattach = true;
  // Send Allocate, Free, Fork and Step through the daemon's fast path socket when it offers one
  // (local Unix-socket clients; AttachResponse.fast_socket_path), gRPC otherwise: the calls
  // answer the same either way, the fast path in a fraction of gRPC's per-call cost
  // (docs/PERF.md, "The fast path"). A call made while another thread's call holds the fast
  // connection goes through gRPC.
  bool fast_path = true;
  // How long a fast-path call polls for its reply before it sleeps (microseconds; 0: sleeps at
  // once). Polling spends this much CPU at most per call and saves a thread wake-up.
  uint32_t fast_path_spin_us = 50;
  // Bytes of this client's Compress input buffer; 0: 64 float32 window queries of all layers
  // (a group member: of its rank's query heads).
  uint64_t input_buffer_bytes = 0;
  // Rank `group_rank` of the tensor-parallel engine `group_name` of `group_size` ranks
  // (docs/MULTINODE.md, "Groups"); empty name: no group. `model` is the whole model; the session
  // maps its rank's shard of the KV heads (model() is the shard's description), shares one block
  // table per layer with the other ranks, and may act on their sequences. Before a Compress
  // with inputs, every rank writes its share into its own input buffer.
  std::string group_name;
  uint32_t group_rank = 0;
  uint32_t group_size = 1;
  // The device of each rank's shard (group_size names, e.g. GPU UUIDs); empty: every shard on
  // `device`.
  std::vector<std::string> group_devices;
  // The daemon device the pool lives on ("host", a GPU's UUID); empty: the daemon's first.
  std::string device;
  // Called once per event, on the heartbeat thread or on the thread whose call noticed the loss
  // first. Must return quickly and must not call Reattach() or Detach() (it may call lease_ok()
  // and status()).
  std::function<void(const SessionEvent&)> on_event;
};

struct BlockCopy {
  uint32_t src_block = 0;
  uint32_t dst_block = 0;
};

struct LayerAllocation {
  uint32_t layer = 0;
  std::vector<uint32_t> new_block_ids;
  std::vector<int64_t> slot_mapping;  // one per new token
  uint32_t num_tokens = 0;            // tokens the layer holds after the call
  std::vector<BlockCopy> copies;      // copy-on-write the daemon performed
};

struct Allocation {
  std::string sequence_id;
  bool created = false;
  uint64_t first_position = 0;
  uint64_t num_positions = 0;
  std::vector<LayerAllocation> layers;
};

// One op of Session::Step (docs/PERF.md "Step").
struct StepOp {
  enum class Kind { kAllocate, kFree, kFork, kMatchPrefix };
  Kind kind = Kind::kAllocate;
  std::string sequence_id;                // kAllocate, kFree; kFork: the parent
  std::string child_sequence_id;          // kFork
  uint32_t num_new_tokens = 0;            // kAllocate
  std::vector<std::string> block_hashes;  // kMatchPrefix

  static StepOp Allocate(std::string sequence_id, uint32_t num_new_tokens) {
    return StepOp{Kind::kAllocate, std::move(sequence_id), "", num_new_tokens, {}};
  }
  static StepOp Free(std::string sequence_id) {
    return StepOp{Kind::kFree, std::move(sequence_id), "", 0, {}};
  }
  static StepOp Fork(std::string parent_sequence_id, std::string child_sequence_id) {
    return StepOp{Kind::kFork, std::move(parent_sequence_id), std::move(child_sequence_id), 0, {}};
  }
  // MatchPrefix's lookup: how many leading hashes the pool has stored (read-only).
  static StepOp MatchPrefix(std::vector<std::string> block_hashes) {
    return StepOp{Kind::kMatchPrefix, "", "", 0, std::move(block_hashes)};
  }
};

// What one op did: its status (what its own RPC would have answered) and, for an allocation,
// the layers that gained blocks or copies (every layer, with slot mappings, on request).
struct StepResult {
  absl::Status status;
  bool created = false;
  uint64_t first_position = 0;
  uint64_t num_positions = 0;
  std::vector<LayerAllocation> layers;
  uint64_t blocks_released = 0;  // a free
  uint32_t matched_blocks = 0;   // a prefix lookup
};

struct LayerBlockTable {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  std::vector<uint32_t> block_ids;
  uint64_t kv_digest = 0;  // set when requested
  bool codebook = false;   // held as a codebook in the daemon's arena
  bool parked = false;     // its rows in the arena, no blocks until Fetch
};

struct SequenceInfo {
  std::string sequence_id;
  std::string owner_client_id;
  std::string parent_sequence_id;
  uint64_t num_positions = 0;
  std::vector<LayerBlockTable> layers;
  bool compressed = false;
  std::string compression_policy;
  std::vector<uint32_t> kept_per_layer;
  std::string busy;  // "Compress", "Fetch" or "Park" while one works on it
  // A background Compress is unfinished; ready: its work is done (FinishCompress applies it).
  bool compress_pending = false;
  bool compress_ready = false;
  std::string compress_error;  // the last background Compress's work failed: its status
};

// ---- Compression (see docs/COMPRESSION.md) ---------------------------------------------------

enum class BudgetSchedule { kPreset, kFull, kUniform, kPyramid, kZigZag };
enum class Scoring { kPreset, kWindow, kAccumulated, kSinksRecent };
enum class WindowNormalization { kPreset, kLiteral, kSum };
enum class Pooling { kPreset, kNone, kAvg, kMax };
enum class GqaMode { kPreset, kGroupMean, kRepeat };
enum class CodebookScope { kPreset, kLayer, kKvHead };
enum class CodebookSearch { kPreset, kExact, kLsh };

// A preset plus overrides; kPreset / nullopt keep the preset's value.
struct CompressionPolicy {
  std::string preset;  // empty: the daemon's default ("snapkv")
  BudgetSchedule schedule = BudgetSchedule::kPreset;
  std::optional<double> beta, zigzag_tau, zigzag_min_fraction;
  Scoring scoring = Scoring::kPreset;
  std::optional<uint32_t> window;
  WindowNormalization normalization = WindowNormalization::kPreset;
  Pooling pooling = Pooling::kPreset;
  std::optional<uint32_t> pool_kernel, sinks;
  GqaMode gqa = GqaMode::kPreset;
  std::optional<bool> codebook;
  std::optional<float> theta_k, theta_v;
  CodebookScope codebook_scope = CodebookScope::kPreset;
  std::optional<bool> codebook_only_if_smaller;
  std::optional<uint32_t> append_batch;
  CodebookSearch codebook_search = CodebookSearch::kPreset;
};

enum class CompressTargetKind { kReserveRatio, kByteRatio };
// Where Compress reads its inputs: the input buffer holds window queries
// float32 [num_layers, num_queries, num_q_heads, head_dim] or scores
// float32 [num_layers, num_q_heads, num_tokens].
enum class CompressInputSource { kNone, kWindowQueries, kScores };

struct CompressOptions {
  CompressionPolicy policy;
  CompressTargetKind target_kind = CompressTargetKind::kReserveRatio;
  double target = 0.2;
  CompressInputSource input = CompressInputSource::kNone;
  uint32_t num_queries = 0;
  // Off the caller's critical path: Compress returns (CompressResult::pending) once the daemon
  // copied the inputs; the sequence stays readable and appendable meanwhile, and
  // Session::FinishCompress applies the result.
  bool background = false;
};

struct CompressedLayer {
  uint32_t layer = 0;
  double context_ratio = 1.0;
  uint32_t kept_per_head = 0;
  uint32_t num_tokens = 0;  // rows: the kept ones, then those appended during a background one
  std::vector<uint32_t> block_ids;
  std::vector<uint32_t> kept_positions;  // [num_kv_heads, num_tokens]: each row's position
  bool codebook = false;
  uint32_t key_codebook_size = 0;
  uint32_t value_codebook_size = 0;
  uint64_t bytes_held = 0;
  double eq15_ratio = 1.0;
};

struct CompressResult {
  // A background Compress started, or (FinishCompress without wait) still working: nothing
  // else is set.
  bool pending = false;
  // FinishCompress: rows each layer had appended since the background Compress started.
  uint32_t rows_appended = 0;
  std::vector<CompressedLayer> layers;
  uint64_t bytes_before = 0;
  uint64_t bytes_after = 0;
  double honest_ratio = 1.0;
  double eq15_ratio = 1.0;
  double reserve_ratio = 1.0;
  uint64_t blocks_released = 0;
};

struct FetchedLayer {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  std::vector<uint32_t> block_ids;
  // [num_kv_heads, num_tokens]: each row's position; empty if never compressed (row t is t).
  std::vector<uint32_t> positions;
  uint32_t new_blocks = 0;
};

// Session::TransferSequence (docs/MULTINODE.md).
struct TransferOptions {
  std::string sequence_id;
  // The receiving daemon: an address or node name from `cachemgrctl peers`.
  std::string peer;
  // The receiving session there (its Session::session_token()) and the new sequence's id there
  // (empty: sequence_id).
  std::string destination_session_token;
  std::string destination_sequence_id;
  // One per transfer: a retry with the same id is answered from the first attempt.
  std::string transfer_id;
  bool move = false;        // free this session's sequence once the peer holds it
  uint32_t timeout_ms = 0;  // 0: 30 s
};

struct TransferResult {
  std::string destination_sequence_id;
  uint64_t payload_bytes = 0;  // the honest bytes held: rows and codebooks as held
  uint64_t wire_bytes = 0;
  std::vector<uint64_t> layer_digests;
  bool source_released = false;
  bool replayed = false;
  // The row link the rows took ("nccl", "socket"; empty: the stream), and whether it had carried
  // an earlier transfer (docs/MULTINODE.md, "Row links").
  std::string row_link;
  bool row_link_reused = false;
};

struct ParkedLayer {
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  uint32_t rows_appended = 0;                                          // coded by this call
  uint32_t matched = 0, queued = 0, batch_coded = 0, new_entries = 0;  // K and V vectors
  uint32_t key_codebook_size = 0;
  uint32_t value_codebook_size = 0;
  uint32_t queued_total = 0;  // still waiting for a batch
  uint64_t arena_bytes = 0;
  uint32_t blocks_released = 0;
};

struct SequenceSummary {
  std::string sequence_id;
  std::string owner_client_id;
  std::string owner_client_name;
  uint64_t num_positions = 0;
  uint64_t num_blocks = 0;
};

struct LayerOccupancy {
  uint32_t layer = 0;
  uint32_t capacity_blocks = 0;
  uint32_t used_blocks = 0;
  uint32_t free_blocks = 0;
  uint32_t shared_blocks = 0;
  // Released by an expired client and held back until the daemon's quarantine ends:
  // free + used + quarantined == capacity.
  uint32_t quarantined_blocks = 0;
};

struct PoolStats {
  std::string pool_id;
  std::string model_name;
  std::string backend;  // "host" or "cuda"
  std::string device;
  uint64_t bytes = 0;
  uint32_t clients = 0;
  std::vector<LayerOccupancy> layers;
};

struct ClientInfo {
  std::string client_id;
  std::string client_name;
  std::string pool_id;
  uint32_t sequences = 0;
  uint32_t lease_remaining_ms = 0;
};

struct Stats {
  std::vector<PoolStats> pools;
  std::vector<ClientInfo> clients;
  uint32_t num_sequences = 0;
  uint64_t uptime_ms = 0;
  std::string version;
};

// How session-less calls reach the daemon and what they prove (docs/SECURITY.md).
struct ConnectOptions {
  // TCP "host:port" instead of the Unix socket (the socket path is then only used to find the
  // default operator credential file, and not even that when empty).
  std::string address;
  // TCP: the token of the daemon's --tcp_token_file, sent as "authorization: Bearer <token>".
  std::string bearer_token;
  // TCP over TLS (required unless the daemon serves plaintext on loopback). `tls_ca_file`: PEM
  // roots that verify the daemon's certificate (empty: the system's roots);
  // `tls_cert_file` / `tls_key_file`: this client's certificate and key for mutual TLS.
  bool tls = false;
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  // The operator credential: a file holding the token the daemon wrote at start. Empty: the
  // daemon's default, `<socket_path>.operator`, if this process can read it; a named file that
  // cannot be read is an error (INVALID_ARGUMENT).
  std::string operator_token_file;
};

// Session-less inspection. With the operator credential: every pool, client and sequence;
// without it: only those of this process's uid (TCP callers: those attached over TCP).
absl::StatusOr<Stats> GetStats(const std::string& socket_path, const ConnectOptions& options = {});
absl::StatusOr<std::vector<SequenceSummary>> ListAllSequences(const std::string& socket_path,
                                                              const ConnectOptions& options = {});

// One attached client: its lease, its mapping of the pool, and its calls.
class Session {
 public:
  // Connects to the daemon's gRPC socket, attaches, fetches the pool's descriptors over the
  // share channel and maps them. Starts the heartbeat thread if asked.
  static absl::StatusOr<std::unique_ptr<Session>> Attach(const std::string& socket_path,
                                                         const AttachOptions& options);

  // Detaches (best effort) if Detach() was not called; stops the heartbeat thread; unmaps.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // ---- Lease and generations (see the file comment) ----
  // Cheap (an atomic load and a clock read): whether the session is usable and its local lease
  // deadline has not passed. Check it before each batch of writes into pool(), and after reads
  // whose results matter: true also means no revocation had begun, so what was read before came
  // from the pool. False means the mapping is revoked (a revocation in progress is waited for).
  bool lease_ok() const;
  // OK while usable; otherwise the status every call returns (why and when the session was
  // lost).
  absl::Status status() const;
  // 1 after Attach, +1 at each Reattach().
  uint64_t generation() const;
  // When the current generation's mapping was revoked; nullopt while it is not.
  std::optional<absl::Time> mapping_revoked_at() const;
  // After a loss: adopts the session the heartbeat thread attached in the background, or
  // attaches one now (UNAVAILABLE while the daemon is still down). Returns the new generation.
  // The lost generation's sequences are gone: the engine recomputes them. FAILED_PRECONDITION if
  // the session is not lost, or after Detach(). The caller must make sure no thread still works
  // with the old generation's allocations (their slots mean nothing in the new pool).
  absl::StatusOr<uint64_t> Reattach();
  // The daemon's boot id (AttachResponse.boot_id) for the current generation.
  const std::string& boot_id() const;
  // The current generation's session token: a secret. Hand it only to whoever may put
  // sequences into this session (a scheduler asking a peer daemon to transfer one here).
  const std::string& session_token() const;

  const std::string& client_id() const;
  // The negotiated model description (defaults filled in by the daemon).
  const ModelSpec& model() const;
  const std::string& pool_id() const;
  // This session's rank and its group's size (0 and 1 outside a group).
  uint32_t group_rank() const;
  uint32_t group_size() const;
  uint32_t num_blocks() const;
  uint32_t heartbeat_interval_ms() const;
  uint32_t lease_timeout_ms() const;
  // The pool memory, mapped into this process.
  const KvPoolView& pool() const;
  // This client's Compress input buffer (shared with the daemon), as float32.
  std::span<float> input_buffer() const;

  absl::StatusOr<Allocation> Allocate(std::string_view sequence_id, uint32_t num_new_tokens);
  // Returns blocks whose last reference went away.
  absl::StatusOr<uint64_t> Free(std::string_view sequence_id);
  absl::StatusOr<SequenceInfo> Fork(std::string_view parent_sequence_id,
                                    std::string_view child_sequence_id);
  // A scheduler step in one call: `ops` applied in order by the daemon, each as its own call
  // would be (all or nothing) with its own status in the result; the call itself fails only
  // for the session, more than 4096 ops, or a reply too large. Slot mappings only with
  // `include_slot_mapping` (else derive them from the block tables).
  absl::StatusOr<std::vector<StepResult>> Step(std::span<const StepOp> ops,
                                               bool include_slot_mapping = false);
  absl::StatusOr<SequenceInfo> GetSequence(std::string_view sequence_id,
                                           bool include_kv_digest = false);
  // This client's sequences.
  absl::StatusOr<std::vector<SequenceSummary>> ListSequences();
  // CUDA pools: records this session's interprocess write event on `stream` (a cudaStream_t;
  // null: the legacy default stream), after the KV writes enqueued there. Every later Compress
  // and Park passes the event, and the daemon waits for its latest record before it reads the
  // pool, so the engine need not synchronise the stream first. The event is created on the
  // pool's device at the first call. FAILED_PRECONDITION for a pool in host memory (whose
  // writes are complete when the stores return); UNIMPLEMENTED in a client built without CUDA.
  absl::Status RecordKvWrites(void* stream);
  // Compresses a sequence in place; inputs are read from input_buffer() (which may be written
  // again once this returns, background or not).
  absl::StatusOr<CompressResult> Compress(std::string_view sequence_id,
                                          const CompressOptions& options);
  // Applies a background Compress (CompressOptions::background): with `wait` once its work is
  // done, without it CompressResult::pending while it works. Call it when the KV writes into the
  // rows appended since are complete (a CUDA pool: RecordKvWrites first): those rows follow the
  // kept ones. A refusal changes nothing (still pending: retry, or Free); a work that failed
  // left the sequence as it was, uncompressed, and its error is answered until the next
  // Compress.
  absl::StatusOr<CompressResult> FinishCompress(std::string_view sequence_id, bool wait = true);
  // Makes layers (empty: all) resident: codebook layers are reconstructed into new blocks.
  absl::StatusOr<std::vector<FetchedLayer>> Fetch(std::string_view sequence_id,
                                                  const std::vector<uint32_t>& layers = {});
  // Returns fetched codebook layers (empty: all) to the daemon's arena, coding rows appended
  // since Fetch; their blocks are released.
  absl::StatusOr<std::vector<ParkedLayer>> Park(std::string_view sequence_id,
                                                const std::vector<uint32_t>& layers = {});
  // Copies (or moves) one of this session's sequences to a session of a peer daemon.
  absl::StatusOr<TransferResult> TransferSequence(const TransferOptions& options);
  // Renews the lease; returns the milliseconds left.
  absl::StatusOr<uint32_t> Heartbeat();
  // Ends the session; the daemon frees every sequence it owned. Later calls fail. A lost
  // session has nothing left to end: OK.
  absl::Status Detach();
  // Calls of this session the daemon answered (OK or not) through the fast path.
  uint64_t fast_path_calls() const;

  struct Impl;

 private:
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cachemgr::client
