// The backend seam: where pool memory comes from and how it is shared with clients.
//
// A DeviceBackend creates PoolMemory for a pool: one or more exported regions and, per layer,
// where that layer's KV tensor sits. The host backend uses one memfd region; the CUDA backend
// (CACHEMGR_CUDA) uses device allocations exported through CUDA IPC. Everything above this seam
// (allocator, sequences, service) is backend-agnostic.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "cachemgr/compress/coded_layer.h"
#include "cachemgr/kernels/block_copy_types.h"
#include "cachemgr/kernels/kv_layout.h"
#include "cachemgr/util/checked_math.h"

namespace cachemgr {

namespace compress {
class SimilarityGraphBuilder;  // cachemgr/compress/codebook_graph.h
class TopKRanker;              // cachemgr/compress/selection.h
}  // namespace compress

enum class BackendKind : uint8_t { kHost, kCuda };
enum class ShareMethod : uint8_t { kMemfd, kCudaIpcHandle, kCudaVmmFd };

struct RegionInfo {
  uint64_t bytes = 0;
  // ShareMethod::kCudaIpcHandle: the cudaIpcMemHandle_t of the region's base (64 bytes).
  std::string cuda_ipc_handle;
};

struct LayerPlacement {
  uint32_t region_index = 0;
  uint64_t offset = 0;  // bytes from the region start
  uint64_t bytes = 0;   // the layer tensor's bytes
};

// How a backend lays a pool's layers out in one region: layer l's tensor (layer_bytes) at
// l * stride, stride being layer_bytes rounded up to the backend's alignment.
struct PoolPlan {
  uint64_t layer_bytes = 0;
  uint64_t stride = 0;
  uint64_t total_bytes = 0;  // stride * num_layers
};

// The plan of `num_layers` layers of `layout` at `alignment` (> 0), every product
// overflow-checked: INVALID_ARGUMENT naming num_blocks when a size does not fit 64 bits (or,
// for the total, an off_t).
inline absl::StatusOr<PoolPlan> PlanPool(const kernels::KvLayerLayout& layout, uint32_t num_layers,
                                         uint64_t alignment) {
  PoolPlan plan;
  const std::optional<uint64_t> layer_bytes =
      CheckedProduct({layout.num_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim,
                      layout.elem_bytes});
  const std::optional<uint64_t> stride =
      layer_bytes.has_value() ? CheckedRoundUp(*layer_bytes, alignment) : std::nullopt;
  const std::optional<uint64_t> total =
      stride.has_value() ? CheckedMul<uint64_t>(*stride, num_layers) : std::nullopt;
  if (!total.has_value() || *total > static_cast<uint64_t>(INT64_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("num_blocks ", layout.num_blocks, " over ",
                                                   num_layers,
                                                   " layers makes a pool larger than 2^63 bytes"));
  }
  plan.layer_bytes = *layer_bytes;
  plan.stride = *stride;
  plan.total_bytes = *total;
  return plan;
}

// Which digest PoolMemory::DigestLayer takes.
enum class KvDigest : uint8_t {
  kFnv1a64,  // GetSequence's kv_digest, which clients compute too
  kXxh3,     // the prefix store's integrity check, internal to the daemon
};

// Memory of one pool. Released (unmapped / freed) on destruction. Thread-compatible: the
// CacheManager serializes calls, except the two compute calls below, which are thread-safe.
class PoolMemory {
 public:
  virtual ~PoolMemory() = default;

  virtual const kernels::KvLayerLayout& layout() const = 0;
  virtual const std::vector<RegionInfo>& regions() const = 0;
  virtual const std::vector<LayerPlacement>& layers() const = 0;

  // Descriptors to pass to a client for ShareMethod::kMemfd / kCudaVmmFd, in regions() order
  // (none for kCudaIpcHandle, whose handles travel in RegionInfo); borrowed (owned by this
  // object).
  virtual std::vector<int> ShareFds() const = 0;

  // Copies whole blocks (both planes) within one layer: the copy-on-write step.
  virtual absl::Status CopyBlocks(uint32_t layer,
                                  absl::Span<const kernels::BlockCopyPair> pairs) = 0;

  // Token rows as float32 (Compress reads a sequence through it, Fetch writes reconstructions,
  // Park reads appended rows): keys/values are host arrays [slots.size(), num_kv_heads,
  // head_dim]. The gather / scatter kernels of kernels/cpu/token_rows.h or their CUDA versions.
  virtual absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* keys,
                                    float* values) const = 0;
  virtual absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots,
                                     const float* keys, const float* values) = 0;
  // Token rows as stored (the pool's element type, layout().token_bytes() per row, no
  // conversion): what transfers between daemons carry. keys/values are host arrays
  // [slots.size(), token_bytes()]. The host backend copies the bytes (PackRowsCpu); the CUDA
  // backend goes through its float32 gather / scatter (exact both ways for every pool type).
  virtual absl::Status PackRows(uint32_t layer, absl::Span<const int64_t> slots, std::byte* keys,
                                std::byte* values) const = 0;
  virtual absl::Status UnpackRows(uint32_t layer, absl::Span<const int64_t> slots,
                                  const std::byte* keys, const std::byte* values) = 0;
  // The CUDA device this memory is on; -1 for host memory (or memory on several devices).
  virtual int cuda_device() const { return -1; }
  // PackRows / UnpackRows with keys and values in this memory's own device memory
  // (cuda_device() >= 0; each slots.size() * token_bytes()): what a row link on that device
  // sends and receives without a host hop (peers/row_link.h). UNIMPLEMENTED for host memory.
  virtual absl::Status PackRowsOnDevice(uint32_t /*layer*/, absl::Span<const int64_t> /*slots*/,
                                        std::byte* /*keys*/, std::byte* /*values*/) const {
    return absl::UnimplementedError("this pool's memory is not a single CUDA device's");
  }
  virtual absl::Status UnpackRowsOnDevice(uint32_t /*layer*/, absl::Span<const int64_t> /*slots*/,
                                          const std::byte* /*keys*/, const std::byte* /*values*/) {
    return absl::UnimplementedError("this pool's memory is not a single CUDA device's");
  }
  // In-place compaction of a layer's rows into whole blocks (CompactHeadsCpu's contract).
  virtual absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> block_table,
                                    uint32_t num_tokens, absl::Span<const uint32_t> kept,
                                    uint32_t rows) = 0;

  // Step 1 of the token scoring (compress::AttentionColumnSums, paper eq. 1-2) next to the pool:
  // the keys are the layer's rows at `slots` (one sequence in token order: slots.size() is its
  // num_tokens), `queries` host float32 [num_queries, num_q_heads, head_dim] post-RoPE, written
  // to host `sums` [num_q_heads, slots.size()]. The host backend gathers the keys and runs the
  // CPU twin; the CUDA backend runs kernels/cuda/attention_scores.h, so the keys never leave
  // the device (the two agree to ~1e-5 relative). INVALID_ARGUMENT for a bad layer, slot or
  // count (num_queries in [1, slots.size()], num_q_heads a multiple of num_kv_heads).
  // Thread-safe (Compress scores layers on several threads outside the manager's lock).
  virtual absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots,
                                           uint32_t num_q_heads, const float* queries,
                                           uint32_t num_queries, float* sums) const = 0;

  // Where this pool's codebooks build their similarity graphs (compress/codebook_graph.h):
  // null for the host (the CPU pass), the device for the CUDA backend. Thread-safe; lives as
  // long as this object.
  virtual const compress::SimilarityGraphBuilder* similarity_graph() const { return nullptr; }
  // Where this pool's selections rank query heads (compress/selection.h): null for the host,
  // the device for the CUDA backend. Thread-safe; lives as long as this object.
  virtual const compress::TopKRanker* ranker() const { return nullptr; }

  // True when this memory is a device's (CUDA): Fetch then hands codebook layers over in flat
  // form (ScatterCodedRows) so that only the codebook crosses PCIe. False (host): Fetch
  // reconstructs on the host outside the manager's lock and writes rows with ScatterTokens,
  // keeping the math out of the lock.
  virtual bool computes_on_device() const { return false; }

  // Fetch's write of a codebook layer: reconstructs `coded` (compress::ReconstructCodedRows:
  // eq. 14, RoPE re-applied to K) into the rows at `slots`, row r of `coded` at slots[r]. The
  // host backend runs the CPU twin and scatters; the CUDA backend uploads the flat codebook
  // (entries, 8 bytes per vector, the angle tables, not the rows) and reconstructs, rotates
  // and scatters on the device, bit for bit the same. INVALID_ARGUMENT for a bad layer or slot
  // or a `coded` that does not fit the pool (ValidateCodedRowsArgs).
  virtual absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                        const compress::CodedRows& coded) = 0;

  // Digest of the first `num_tokens` tokens of `block_table`: KvDigest::kFnv1a64 is the
  // client-visible kv_digest (kernels/kv_digest.h), kXxh3 the prefix store's internal one
  // (kv_store_digest.h).
  virtual absl::StatusOr<uint64_t> DigestLayer(uint32_t layer,
                                               absl::Span<const uint32_t> block_table,
                                               uint32_t num_tokens, KvDigest kind) const = 0;
};

// The argument checks of PoolMemory::AttentionColumnSums that do not depend on the backend
// (slots are checked by the gather). INVALID_ARGUMENT naming the argument.
inline absl::Status ValidateScoringArgs(const kernels::KvLayerLayout& layout, size_t num_slots,
                                        uint32_t num_q_heads, const float* queries,
                                        uint32_t num_queries, const float* sums) {
  if (num_slots == 0) return absl::InvalidArgumentError("slots must not be empty");
  if (num_queries == 0 || num_queries > num_slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_queries must be in [1, ", num_slots, "] (got ", num_queries, ")"));
  }
  if (num_q_heads == 0 || num_q_heads % layout.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads ", num_q_heads,
                                                   " is not a multiple of the pool's ",
                                                   layout.num_kv_heads, " KV heads"));
  }
  if (queries == nullptr || sums == nullptr) {
    return absl::InvalidArgumentError("queries and sums must not be null");
  }
  return absl::OkStatus();
}

// The checks of PoolMemory::ScatterCodedRows shared by the backends: `coded` matches the
// pool's heads and head_dim and holds one row per slot, its arrays have consistent sizes, and
// every ref and angle row is in range (kNoRotation allowed).
inline absl::Status ValidateCodedRowsArgs(const kernels::KvLayerLayout& layout, size_t num_slots,
                                          const compress::CodedRows& coded) {
  if (coded.num_kv_heads != layout.num_kv_heads || coded.head_dim != layout.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("coded rows have ", coded.num_kv_heads,
                                                   " heads of ", coded.head_dim, " dims, the pool ",
                                                   layout.num_kv_heads, " of ", layout.head_dim));
  }
  if (coded.rows != num_slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("coded rows hold ", coded.rows, " rows for ", num_slots, " slots"));
  }
  const size_t vectors = size_t{coded.rows} * coded.num_kv_heads;
  const size_t table =
      coded.angles.num_pairs == 0 ? 0 : coded.angles.cos.size() / coded.angles.num_pairs;
  if (coded.key_refs.size() != vectors || coded.value_refs.size() != vectors ||
      coded.key_magnitudes.size() != vectors || coded.value_magnitudes.size() != vectors ||
      coded.key_angle_rows.size() != vectors ||
      coded.angles.sin.size() != coded.angles.cos.size() ||
      coded.key_entries.size() % coded.head_dim != 0 ||
      coded.value_entries.size() % coded.head_dim != 0) {
    return absl::InvalidArgumentError("coded rows: array sizes do not match rows x heads");
  }
  for (auto [refs, entries] : {std::pair{&coded.key_refs, coded.key_entries.size()},
                               std::pair{&coded.value_refs, coded.value_entries.size()}}) {
    for (uint32_t ref : *refs) {
      if (ref >= entries / coded.head_dim) {
        return absl::InvalidArgumentError(absl::StrCat("coded rows: ref ", ref, " out of range"));
      }
    }
  }
  for (uint32_t a : coded.key_angle_rows) {
    if (a != compress::CodedRows::kNoRotation && a >= table && coded.angles.num_pairs > 0) {
      return absl::InvalidArgumentError(absl::StrCat("coded rows: angle row ", a, " out of range"));
    }
  }
  return absl::OkStatus();
}

// A client's CUDA interprocess event, opened in the daemon (DeviceBackend::OpenClientEvent).
// The client records it on the stream that wrote its KV just before Compress or Park; the
// daemon waits for it before reading the pool, so the client need not synchronise. Destroyed
// (closed) with the object.
class ClientEvent {
 public:
  virtual ~ClientEvent() = default;
  // Returns once the work captured by the client's latest record of the event has completed
  // (at once if it was never recorded). Thread-safe.
  virtual absl::Status Wait() const = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // Opens a client's event from its 64-byte cudaIpcEventHandle_t (on this backend's device).
  // INVALID_ARGUMENT naming "cuda_ipc_event_handle" when it cannot be opened; the host backend
  // has no device events and always refuses.
  virtual absl::StatusOr<std::unique_ptr<ClientEvent>> OpenClientEvent(
      const std::string& handle) const {
    (void)handle;
    return absl::InvalidArgumentError(
        "cuda_ipc_event_handle is for CUDA pools; this daemon's pools are in host memory, where "
        "a client's writes are complete when its stores return");
  }

  virtual BackendKind kind() const = 0;
  virtual ShareMethod share_method() const = 0;
  // Human-readable device identity ("host", or a GPU UUID).
  virtual std::string device_name() const = 0;

  // The bytes CreatePool(layout, num_layers) allocates (its alignment and rounding included),
  // computed without allocating: the manager charges them to its memory budget before the pool
  // is built. INVALID_ARGUMENT naming num_blocks when the size overflows (PlanPool).
  // Thread-safe.
  virtual absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                             uint32_t num_layers) const = 0;

  // Allocates `num_layers` layer tensors of `layout` holding elements of `type` (zero-filled),
  // exactly PoolBytes() of them. INVALID_ARGUMENT as PoolBytes; RESOURCE_EXHAUSTED when the
  // memory cannot be had. Thread-safe: the manager calls it outside its lock, possibly for two
  // pools at once.
  virtual absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(
      const std::string& pool_id, const kernels::KvLayerLayout& layout, kernels::KvElemType type,
      uint32_t num_layers) = 0;
};

}  // namespace cachemgr
