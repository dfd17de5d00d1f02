// CodedLayer: one layer of one sequence held in codebook form (paper §3.4, eq. 8-14), the form
// the daemon keeps a codebook layer in while it is parked, able to take the rows a decoding
// engine appended.
//
// Per KV head the layer holds `rows()` rows, each with its RoPE position. For K and for V, the
// layer's codebook is split in parts (one per layer, or one per KV head: CodebookScope); part p
// serves an equal, consecutive share of the KV heads. A row of a head is either
//   coded:  a reference to an entry of its part and a magnitude (eq. 14: entry * magnitude;
//           K entries are pre-RoPE, so RoPE is re-applied at the row's position), or
//   queued: its vector verbatim (K as the engine stored it, post-RoPE), waiting to be coded.
// Append codes new rows the paper's way: each vector joins the most similar entry of its part
// when cos > theta (MatchEntry); the others queue, and once a part holds `append_batch` queued
// vectors they are coded together by Algorithm 1 (BuildCodebook) and their entries appended.
//
// Bytes (the honest accounting of accounting.h, extended by the queue): per plane and part,
//   entries * head_dim * elem_bytes + coded rows * (ref_bytes(entries) + elem_bytes)
//   + queued rows * head_dim * elem_bytes.
// Values are held as float32 in memory, each rounded to what the model's dtype stores
// (ModelShape::stored_float), so the layer holds exactly what its honest bytes count and can
// travel between daemons in them (ToImage / FromImage).
//
// Thread-compatible: const methods may run concurrently; Append needs exclusive access.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/compress/rope.h"

namespace cachemgr::compress {

struct AppendStats {
  uint32_t matched = 0;      // vectors (K and V counted apart) that joined an existing entry
  uint32_t queued = 0;       // vectors that matched nothing and were queued
  uint32_t batch_coded = 0;  // queued vectors coded by Algorithm 1 in this call
  uint32_t new_entries = 0;  // entries those batches added
};

// A coded layer flattened for reconstruction, on either side of PCIe (CodedLayer::Flatten):
// vectors in the pool's order, v = row * num_kv_heads + head. Per plane the entries of every
// part and then the queued vectors (verbatim) are concatenated, and each vector has an index
// into them and a magnitude (1 for a queued vector, so entry * 1 is the vector bit for bit).
// Coded K vectors, pre-RoPE, are then rotated at row key_angle_rows[v] of `angles`; queued K
// vectors are already post-RoPE and have kNoRotation. This is what a device reconstruction
// uploads: entries, 8 bytes per vector and the angle tables, instead of every row.
struct CodedRows {
  static constexpr uint32_t kNoRotation = 0xffffffffu;
  uint32_t rows = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  std::vector<float> key_entries, value_entries;        // [entries, head_dim]
  std::vector<uint32_t> key_refs, value_refs;           // [rows * num_kv_heads]
  std::vector<float> key_magnitudes, value_magnitudes;  // [rows * num_kv_heads]
  RopeParams rope;
  RopeAngles angles;                     // of the distinct positions of the coded K vectors
  std::vector<uint32_t> key_angle_rows;  // [rows * num_kv_heads]
};

// The CPU reconstruction of `coded` (eq. 14, then RoPE on the coded K vectors): keys and values
// [rows, num_kv_heads, head_dim], resized. The CUDA backend's twin runs ReconstructCodebookCuda
// and RotateRowsCuda on the same arrays, with the same float arithmetic.
void ReconstructCodedRows(const CodedRows& coded, std::vector<float>* keys,
                          std::vector<float>* values);

// A CodedLayer's whole state, as it travels between daemons (CodedLayer::ToImage / FromImage).
// Per plane: theta; per part its entries [E, head_dim] (K: pre-RoPE unit vectors) and its queue
// [Q, head_dim] (verbatim, K post-RoPE); per KV head and row (head-major) the row's code, an
// entry index within the head's part or kQueuedBit | its index in the part's queue, and its
// magnitude (0 for a queued row). A part's queue holds its queued rows ordered by (row, head).
struct CodedLayerImage {
  static constexpr uint32_t kQueuedBit = 0x80000000u;
  struct Plane {
    float theta = 1.0f;
    std::vector<std::vector<float>> entries;  // per part
    std::vector<std::vector<float>> queues;   // per part
    std::vector<uint32_t> codes;              // [num_kv_heads, rows]
    std::vector<float> magnitudes;            // [num_kv_heads, rows]
  };
  uint32_t num_parts = 1;
  uint32_t append_batch = 1;
  std::vector<uint32_t> positions;  // [num_kv_heads, rows]
  Plane key, value;
};

class CodedLayer {
 public:
  // The layer `result` (which must hold codebooks, as CompressSequence leaves a codebook layer)
  // of a sequence whose token t sat at RoPE position positions[t] (empty: t). `policy` gives
  // theta_k/theta_v, the scope and append_batch. INVALID_ARGUMENT when the result does not match
  // the shape (no codebooks, wrong sizes, refs out of range, kept token without a position).
  static absl::StatusOr<CodedLayer> FromResult(const ModelShape& shape, const PolicyConfig& policy,
                                               const LayerResult& result,
                                               absl::Span<const uint32_t> positions);

  uint32_t num_kv_heads() const { return static_cast<uint32_t>(positions_.size()); }
  uint32_t rows() const {
    return positions_.empty() ? 0 : static_cast<uint32_t>(positions_[0].size());
  }
  // [num_kv_heads, rows]: the RoPE position of every row.
  std::vector<uint32_t> Positions() const;
  uint32_t key_entries() const { return NumEntries(key_); }
  uint32_t value_entries() const { return NumEntries(value_); }
  // Vectors (K and V counted apart) waiting in a queue.
  uint32_t queued() const { return NumQueued(key_) + NumQueued(value_); }
  uint64_t bytes() const;

  // Appends `count` rows to every KV head: keys and values [count, num_kv_heads, head_dim]
  // (keys post-RoPE), row i at RoPE position positions[i]. INVALID_ARGUMENT for a size mismatch
  // or a non-finite element (nothing is appended then).
  absl::StatusOr<AppendStats> Append(absl::Span<const float> keys, absl::Span<const float> values,
                                     absl::Span<const uint32_t> positions);

  // Every row as it would be attended to: keys (post-RoPE at each row's position) and values,
  // each [rows, num_kv_heads, head_dim] (the pool's token-major order), resized. The same as
  // ReconstructCodedRows(Flatten()).
  void Reconstruct(std::vector<float>* keys, std::vector<float>* values) const;

  // The layer as CodedRows.
  CodedRows Flatten() const;

  // Its whole state; FromImage(shape, ToImage()) is the same layer.
  CodedLayerImage ToImage() const;
  // The layer an image describes for a model of `shape`. INVALID_ARGUMENT naming what does not
  // fit: parts (1 or num_kv_heads), sizes, a code outside its part's entries or queue, a queue
  // index not in (row, head) order, a non-finite value, a value `shape` does not store exactly,
  // a theta outside (0, 1], append_batch 0.
  static absl::StatusOr<CodedLayer> FromImage(const ModelShape& shape, CodedLayerImage image);

 private:
  // One of K and V.
  struct Plane {
    static constexpr uint32_t kQueuedBit = 0x80000000u;
    struct Part {
      std::vector<float> entries;  // [E, head_dim], unit vectors (K: pre-RoPE)
      std::vector<float> queue;    // [Q, head_dim], verbatim (K: post-RoPE)
      std::vector<std::pair<uint32_t, uint32_t>> queue_rows;  // (head, row) of each queued one
    };
    float theta = 1.0f;
    std::vector<Part> parts;
    // [head][row]: entry index within the head's part, or kQueuedBit | index into its queue.
    std::vector<std::vector<uint32_t>> code;
    std::vector<std::vector<float>> magnitude;  // [head][row], coded rows only
  };

  CodedLayer() = default;
  uint32_t NumEntries(const Plane& plane) const;
  static uint32_t NumQueued(const Plane& plane);
  uint32_t PartOf(uint32_t head) const;
  // Codes `unit` (magnitude m) of `head`'s new row `row` in `plane`, or queues `raw`.
  void CodeRow(Plane& plane, uint32_t head, uint32_t row, const float* unit, float magnitude,
               const float* raw, AppendStats& stats);
  // Codes a part's queue by Algorithm 1 (K un-rotated first) and empties it.
  absl::Status CodeQueue(Plane& plane, uint32_t part, bool is_key, AppendStats& stats);
  uint64_t PlaneBytes(const Plane& plane) const;

  ModelShape shape_;
  RopeParams rope_;
  uint32_t num_parts_ = 1;
  uint32_t append_batch_ = 1;
  std::vector<std::vector<uint32_t>> positions_;  // [head][row]
  Plane key_;
  Plane value_;
};

}  // namespace cachemgr::compress
