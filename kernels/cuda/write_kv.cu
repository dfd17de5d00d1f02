#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/layout_check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/write_kv.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kMaxThreadsPerBlock = 256;
constexpr unsigned kWarp = 32;

// One CTA per token. `Word` is uint4 (16-byte copies; caller guarantees alignment) or uint8_t.
// layer_base: [layout.layer_bytes()] bytes; key, value: [gridDim.x, token_bytes] bytes;
// slot_mapping: [gridDim.x].
template <typename Word>
__global__ void WriteKvBySlotKernel(KvLayerLayout layout, std::byte* layer_base,
                                    const std::byte* key, const std::byte* value,
                                    const int64_t* slot_mapping) {
  const size_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  const int64_t num_slots = static_cast<int64_t>(layout.num_blocks) * layout.block_size;
  if (slot < 0 || slot >= num_slots) return;  // -1 is padding; others are caller bugs.
  const size_t row_bytes = layout.token_bytes();
  const size_t words = row_bytes / sizeof(Word);
  const Word* k_src = reinterpret_cast<const Word*>(key + token * row_bytes);
  const Word* v_src = reinterpret_cast<const Word*>(value + token * row_bytes);
  Word* k_dst = reinterpret_cast<Word*>(layer_base + layout.slot_offset(KvPlane::kKey, slot));
  Word* v_dst = reinterpret_cast<Word*>(layer_base + layout.slot_offset(KvPlane::kValue, slot));
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

// The inverse: the rows at the slots -> key, value.
template <typename Word>
__global__ void ReadKvBySlotKernel(KvLayerLayout layout, const std::byte* layer_base,
                                   std::byte* key, std::byte* value, const int64_t* slot_mapping) {
  const size_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  const int64_t num_slots = static_cast<int64_t>(layout.num_blocks) * layout.block_size;
  if (slot < 0 || slot >= num_slots) return;
  const size_t row_bytes = layout.token_bytes();
  const size_t words = row_bytes / sizeof(Word);
  const Word* k_src =
      reinterpret_cast<const Word*>(layer_base + layout.slot_offset(KvPlane::kKey, slot));
  const Word* v_src =
      reinterpret_cast<const Word*>(layer_base + layout.slot_offset(KvPlane::kValue, slot));
  Word* k_dst = reinterpret_cast<Word*>(key + token * row_bytes);
  Word* v_dst = reinterpret_cast<Word*>(value + token * row_bytes);
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(uint4) == 0; }

// The checks and launch geometry both directions share; `launch(vectorized, grid, block)`
// enqueues the kernel.
template <typename Launch>
absl::Status LaunchBySlot(const char* who, const KvLayerLayout& layout, const void* layer_base,
                          const void* key, const void* value, const int64_t* slot_mapping,
                          uint32_t num_tokens, Launch launch) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  if (num_tokens == 0) return absl::OkStatus();
  if (layer_base == nullptr || key == nullptr || value == nullptr || slot_mapping == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": null layer_base, key, value or slot_mapping"));
  }
  if (num_tokens > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": num_tokens ", num_tokens, " exceeds the grid limit"));
  }
  const size_t row_bytes = layout.token_bytes();
  const bool vectorized =
      Aligned16(layer_base) && Aligned16(key) && Aligned16(value) && row_bytes % sizeof(uint4) == 0;
  const size_t words = vectorized ? row_bytes / sizeof(uint4) : row_bytes;
  // Enough warps to cover the row once, capped; the kernel strides over longer rows.
  size_t threads = (words + kWarp - 1) / kWarp * kWarp;
  if (threads > kMaxThreadsPerBlock) threads = kMaxThreadsPerBlock;
  launch(vectorized, dim3(num_tokens), dim3(static_cast<unsigned>(threads)));
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteKvBySlotCuda(const KvLayerLayout& layout, std::byte* layer_base,
                               const std::byte* key, const std::byte* value,
                               const int64_t* slot_mapping, uint32_t num_tokens,
                               cudaStream_t stream) {
  return LaunchBySlot("WriteKvBySlotCuda", layout, layer_base, key, value, slot_mapping, num_tokens,
                      [&](bool vectorized, dim3 grid, dim3 block) {
                        if (vectorized) {
                          WriteKvBySlotKernel<uint4><<<grid, block, 0, stream>>>(
                              layout, layer_base, key, value, slot_mapping);
                        } else {
                          WriteKvBySlotKernel<uint8_t><<<grid, block, 0, stream>>>(
                              layout, layer_base, key, value, slot_mapping);
                        }
                      });
}

absl::Status ReadKvBySlotCuda(const KvLayerLayout& layout, const std::byte* layer_base,
                              std::byte* key, std::byte* value, const int64_t* slot_mapping,
                              uint32_t num_tokens, cudaStream_t stream) {
  return LaunchBySlot("ReadKvBySlotCuda", layout, layer_base, key, value, slot_mapping, num_tokens,
                      [&](bool vectorized, dim3 grid, dim3 block) {
                        if (vectorized) {
                          ReadKvBySlotKernel<uint4><<<grid, block, 0, stream>>>(
                              layout, layer_base, key, value, slot_mapping);
                        } else {
                          ReadKvBySlotKernel<uint8_t><<<grid, block, 0, stream>>>(
                              layout, layer_base, key, value, slot_mapping);
                        }
                      });
}

}  // namespace cachemgr::kernels
