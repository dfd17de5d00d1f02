// SidecarCache: the engine's KV cache, held by cachemgrd and reached through one client Session,
// the way a vLLM-style engine uses the sidecar: it allocates rows as tokens arrive, writes K/V
// into the shared pool at the slots the daemon hands out, reads every layer through that
// layer's block table, and asks the daemon to compress, fetch, park, fork and free sequences.
//
// Per sequence it mirrors the per-layer block tables (updated from Allocate, refreshed from the
// daemon after Compress / Fetch / Park / Fork) and the next RoPE position. K is stored post-RoPE,
// so attention over the rows Compress kept needs no positions; new rows get the sequence's next
// positions, whatever was evicted before them.
//
// Thread-compatible: one thread drives it (the engine parallelizes inside its math).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cachemgr/client/client.h"
#include "tools/engine/checkpoint.h"

namespace cachemgr::engine {

struct SidecarOptions {
  std::string socket_path;
  std::string client_name = "cachemgr-engine";
  std::string model_name;  // pool name; default "<checkpoint file name>"
  client::DType dtype = client::DType::kFp32;
  client::CacheLayout layout = client::CacheLayout::kFlashAttn;
  uint32_t block_size = 16;
  uint32_t num_blocks = 0;          // per layer; 0 lets the daemon decide
  uint64_t input_buffer_bytes = 0;  // Compress inputs; 0: the daemon's default
  // Ranks of a tensor-parallel engine: one session per rank, attached as a group
  // (docs/MULTINODE.md, "Groups"), each holding its shard of the KV heads. 1: one session.
  uint32_t tensor_parallel = 1;
};

struct AppendedRows {
  uint64_t first_position = 0;              // RoPE position of the first new row
  std::vector<uint32_t> first_row;          // per layer (compressed layers hold fewer rows)
  std::vector<std::vector<int64_t>> slots;  // [layer][new row]
};

class SidecarCache {
 public:
  static absl::StatusOr<std::unique_ptr<SidecarCache>> Attach(const SidecarOptions& options,
                                                              const LlamaConfig& config);

  // Rank 0's session: calls on sequences act on every rank (the group shares its block tables).
  client::Session& session() { return *sessions_[0]; }
  uint32_t tensor_parallel() const { return static_cast<uint32_t>(sessions_.size()); }

  // Writes Compress inputs for the whole model into the ranks' input buffers, each its share of
  // the query heads: window queries [num_layers, num_queries, num_heads, head_dim] (`inner` =
  // head_dim, `outer_per_layer` = num_queries) or scores [num_layers, num_heads, n] (`inner` = n,
  // `outer_per_layer` = 1). RESOURCE_EXHAUSTED when a rank's buffer is too small.
  absl::Status WriteInputs(const std::vector<float>& input, size_t outer_per_layer, size_t inner);
  const LlamaConfig& config() const { return config_; }

  // Appends `n` rows to every layer (creating the sequence); each layer's new rows follow its
  // own (after Compress, layers hold different numbers of rows).
  absl::StatusOr<AppendedRows> Append(const std::string& seq, uint32_t n);

  // Writes rows at `slots` of `layer`: keys, values [slots.size(), num_kv_heads * head_dim] (all
  // heads; each rank's mapping gets its share).
  void Write(uint32_t layer, absl::Span<const int64_t> slots, const float* keys,
             const float* values);
  // Every row of `layer` of `seq` as float32 [rows, num_kv_heads * head_dim]; returns rows.
  uint32_t Read(const std::string& seq, uint32_t layer, std::vector<float>* keys,
                std::vector<float>* values) const;

  uint32_t rows(const std::string& seq, uint32_t layer) const;
  uint64_t positions(const std::string& seq) const;
  bool has(const std::string& seq) const { return sequences_.contains(seq); }

  absl::Status Fork(const std::string& parent, const std::string& child);
  absl::Status Free(const std::string& seq);
  // With options.background the result is pending and the tables stay as they were until
  // FinishCompress applies it.
  absl::StatusOr<client::CompressResult> Compress(const std::string& seq,
                                                  const client::CompressOptions& options);
  absl::StatusOr<client::CompressResult> FinishCompress(const std::string& seq, bool wait);
  absl::StatusOr<std::vector<client::FetchedLayer>> Fetch(const std::string& seq);
  absl::StatusOr<std::vector<client::ParkedLayer>> Park(const std::string& seq);
  // A sequence that arrived in this session from another daemon (TransferSequence): makes its
  // codebook layers resident (Fetch) and mirrors its tables; it then decodes like any other.
  absl::Status Adopt(const std::string& seq);

  // Bytes of blocks the sequence references now (whole blocks, K and V, every layer).
  uint64_t ResidentBytes(const std::string& seq) const;

  // After a call failed with `why`: if the sidecar is at fault (the daemon unreachable or
  // restarted, the session lost), waits up to `timeout` until the session is usable again, the
  // same one if it survived, else a new one (client::Session::Reattach), and forgets every
  // sequence: the caller recomputes their KV (prefills again). Returns `why` itself when the
  // sidecar is fine (the call's own error), DEADLINE_EXCEEDED when it is not back in time.
  absl::Status Recover(const absl::Status& why, absl::Duration timeout);

 private:
  struct Layer {
    std::vector<uint32_t> blocks;
    uint32_t rows = 0;
  };
  struct Sequence {
    std::vector<Layer> layers;
    uint64_t positions = 0;
  };

  SidecarCache(std::vector<std::unique_ptr<client::Session>> sessions, const LlamaConfig& config);
  absl::Status Refresh(const std::string& seq);

  std::vector<std::unique_ptr<client::Session>> sessions_;  // one per rank
  LlamaConfig config_;
  kernels::KvLayerLayout layout_;  // of one rank's shard (all heads with one rank)
  client::DType dtype_;
  absl::flat_hash_map<std::string, Sequence> sequences_;
};

}  // namespace cachemgr::engine
