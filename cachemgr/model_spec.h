// ModelSpec: what a client tells the daemon about its model's KV cache, validated once.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr {

enum class DType : uint8_t { kFp16, kBf16, kFp32 };
enum class RopeStyle : uint8_t { kNone, kInterleaved, kHalfSplit };

uint32_t DTypeBytes(DType dtype);
const char* DTypeName(DType dtype);

struct RopeSpec {
  RopeStyle style = RopeStyle::kInterleaved;
  double theta = 10000.0;
  double scaling_factor = 1.0;
  uint32_t rotary_dim = 0;  // 0 = head_dim

  bool operator==(const RopeSpec&) const = default;
};

// Largest values accepted; they catch garbage. They bound BlockBytes() (2 * 1024 * 4096 * 1024 *
// 4 = 2^35), not the products with num_blocks and num_layers, which are checked where computed.
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxHeads = 4096;
inline constexpr uint32_t kMaxHeadDim = 1024;
inline constexpr uint32_t kMaxBlockSize = 1024;
inline constexpr size_t kMaxNameLength = 128;

struct ModelSpec {
  std::string name;
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;
  uint32_t block_size = 0;
  kernels::KvOrder layout = kernels::KvOrder::kFlashAttn;
  RopeSpec rope;

  bool operator==(const ModelSpec&) const = default;

  // The per-layer layout of a pool of `num_blocks` blocks.
  kernels::KvLayerLayout LayerLayout(uint32_t num_blocks) const;
  // Bytes one block occupies in one layer (K and V). REQUIRES: a spec ValidateModelSpec
  // accepted (which also checks that this product fits).
  uint64_t BlockBytes() const;
  // Bytes of one layer's tensor of `num_blocks` blocks: INVALID_ARGUMENT naming num_blocks when
  // it does not fit 64 bits. REQUIRES: a validated spec.
  absl::StatusOr<uint64_t> LayerBytes(uint32_t num_blocks) const;
  kernels::KvElemType ElemType() const;
  // One line for logs: "stories260K L=5 H=8/4 D=8 fp32 bs=16 flash_attn rope=interleaved/10000/1/0"
  // (rope=style/theta/scaling_factor/rotary_dim, or rope=none). REQUIRES: a validated spec (its
  // name is short and printable).
  std::string Describe() const;
  // The fields (as named in the request: "num_kv_heads", "rope.theta", ...) whose values differ
  // from `other`'s, in declaration order; empty when the descriptions are equal.
  std::vector<std::string> DifferingFields(const ModelSpec& other) const;
};

// Checks every field; the message names the field as `<prefix>.<field>` (prefix e.g. "model").
// Expects defaults already applied (block_size != 0, scaling_factor != 0).
absl::Status ValidateModelSpec(const ModelSpec& spec, const std::string& prefix = "model");

// Returns true when `name` is 1..max_len printable ASCII without spaces or control characters.
bool IsValidIdentifier(const std::string& name, size_t max_len);

}  // namespace cachemgr
