#include <limits>

#include "absl/strings/str_cat.h"
#include "cachemgr/kernels/elem_convert.h"
#include "kernels/cpu/layout_check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/token_rows.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kThreads = 128;

uint32_t TypeBytes(KvElemType type) { return type == KvElemType::kF32 ? 4 : 2; }

absl::Status CheckTyped(const KvLayerLayout& layout, KvElemType type, const char* who) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  if (type != KvElemType::kF16 && type != KvElemType::kBf16 && type != KvElemType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": unknown element type"));
  }
  if (TypeBytes(type) != layout.elem_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": element type of ", TypeBytes(type),
                                                   " bytes but layout.elem_bytes is ",
                                                   layout.elem_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckCount(uint32_t count, const char* who) {
  if (count > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": ", count, " exceeds the grid limit"));
  }
  return absl::OkStatus();
}

// One CTA per slot; threads stride over the row's elements (both planes).
__global__ void GatherKernel(KvLayerLayout layout, KvElemType type, const std::byte* layer_base,
                             const int64_t* slots, float* keys, float* values) {
  const size_t i = blockIdx.x;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= int64_t{layout.num_blocks} * layout.block_size) return;
  const size_t row = size_t{layout.num_kv_heads} * layout.head_dim;
  const std::byte* k = layer_base + layout.slot_offset(KvPlane::kKey, slot);
  const std::byte* v = layer_base + layout.slot_offset(KvPlane::kValue, slot);
  for (size_t e = threadIdx.x; e < row; e += blockDim.x) {
    keys[i * row + e] = ElemToF32(k + e * layout.elem_bytes, type);
    values[i * row + e] = ElemToF32(v + e * layout.elem_bytes, type);
  }
}

__global__ void ScatterKernel(KvLayerLayout layout, KvElemType type, std::byte* layer_base,
                              const int64_t* slots, const float* keys, const float* values) {
  const size_t i = blockIdx.x;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= int64_t{layout.num_blocks} * layout.block_size) return;
  const size_t row = size_t{layout.num_kv_heads} * layout.head_dim;
  std::byte* k = layer_base + layout.slot_offset(KvPlane::kKey, slot);
  std::byte* v = layer_base + layout.slot_offset(KvPlane::kValue, slot);
  for (size_t e = threadIdx.x; e < row; e += blockDim.x) {
    F32ToElem(keys[i * row + e], type, k + e * layout.elem_bytes);
    F32ToElem(values[i * row + e], type, v + e * layout.elem_bytes);
  }
}

// Scratch layout: [num_kv_heads][rows][2 planes][head_bytes].
// Grid (rows, num_kv_heads): copies head h of token kept[h][r] to scratch, or back to row r.
// `Word` is uint4 when every head vector is 16-byte aligned (the launcher checks), else uint8_t.
template <typename Word>
__global__ void CompactGatherKernel(KvLayerLayout layout, const std::byte* layer_base,
                                    const uint32_t* block_table, const uint32_t* kept,
                                    uint32_t rows, std::byte* scratch) {
  const uint32_t r = blockIdx.x;
  const uint32_t h = blockIdx.y;
  const uint32_t t = kept[size_t{h} * rows + r];
  const uint32_t block = block_table[t / layout.block_size];
  if (block >= layout.num_blocks) return;
  const size_t head_bytes = layout.head_bytes();
  const size_t words = head_bytes / sizeof(Word);
  std::byte* dst = scratch + ((size_t{h} * rows + r) * 2) * head_bytes;
  for (int plane = 0; plane < 2; ++plane) {
    const Word* src = reinterpret_cast<const Word*>(
        layer_base +
        layout.head_offset(static_cast<KvPlane>(plane), block, t % layout.block_size, h));
    Word* out = reinterpret_cast<Word*>(dst + plane * head_bytes);
    for (size_t w = threadIdx.x; w < words; w += blockDim.x) out[w] = src[w];
  }
}

template <typename Word>
__global__ void CompactWriteKernel(KvLayerLayout layout, std::byte* layer_base,
                                   const uint32_t* block_table, uint32_t rows,
                                   const std::byte* scratch) {
  const uint32_t r = blockIdx.x;
  const uint32_t h = blockIdx.y;
  const uint32_t block = block_table[r / layout.block_size];
  if (block >= layout.num_blocks) return;
  const size_t head_bytes = layout.head_bytes();
  const size_t words = head_bytes / sizeof(Word);
  const std::byte* src = scratch + ((size_t{h} * rows + r) * 2) * head_bytes;
  for (int plane = 0; plane < 2; ++plane) {
    Word* dst =
        reinterpret_cast<Word*>(layer_base + layout.head_offset(static_cast<KvPlane>(plane), block,
                                                                r % layout.block_size, h));
    const Word* in = reinterpret_cast<const Word*>(src + plane * head_bytes);
    for (size_t w = threadIdx.x; w < words; w += blockDim.x) dst[w] = in[w];
  }
}

}  // namespace

absl::Status GatherTokensF32Cuda(const KvLayerLayout& layout, KvElemType type,
                                 const std::byte* layer_base, const int64_t* slots,
                                 uint32_t num_slots, float* keys, float* values,
                                 cudaStream_t stream) {
  if (absl::Status s = CheckTyped(layout, type, "GatherTokensF32Cuda"); !s.ok()) return s;
  if (absl::Status s = CheckCount(num_slots, "GatherTokensF32Cuda"); !s.ok()) return s;
  if (num_slots == 0) return absl::OkStatus();
  if (layer_base == nullptr || slots == nullptr || keys == nullptr || values == nullptr) {
    return absl::InvalidArgumentError("GatherTokensF32Cuda: null pointer");
  }
  GatherKernel<<<num_slots, kThreads, 0, stream>>>(layout, type, layer_base, slots, keys, values);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status ScatterTokensF32Cuda(const KvLayerLayout& layout, KvElemType type,
                                  std::byte* layer_base, const int64_t* slots, uint32_t num_slots,
                                  const float* keys, const float* values, cudaStream_t stream) {
  if (absl::Status s = CheckTyped(layout, type, "ScatterTokensF32Cuda"); !s.ok()) return s;
  if (absl::Status s = CheckCount(num_slots, "ScatterTokensF32Cuda"); !s.ok()) return s;
  if (num_slots == 0) return absl::OkStatus();
  if (layer_base == nullptr || slots == nullptr || keys == nullptr || values == nullptr) {
    return absl::InvalidArgumentError("ScatterTokensF32Cuda: null pointer");
  }
  ScatterKernel<<<num_slots, kThreads, 0, stream>>>(layout, type, layer_base, slots, keys, values);
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

size_t CompactHeadsScratchBytes(const KvLayerLayout& layout, uint32_t rows) {
  return size_t{layout.num_kv_heads} * rows * 2 * layout.head_bytes();
}

absl::Status CompactHeadsCuda(const KvLayerLayout& layout, std::byte* layer_base,
                              const uint32_t* block_table, const uint32_t* kept, uint32_t rows,
                              std::byte* scratch, cudaStream_t stream) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  if (absl::Status s = CheckCount(rows, "CompactHeadsCuda"); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  if (layer_base == nullptr || block_table == nullptr || kept == nullptr || scratch == nullptr) {
    return absl::InvalidArgumentError("CompactHeadsCuda: null pointer");
  }
  const dim3 grid(rows, layout.num_kv_heads);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (aligned(layer_base) && aligned(scratch) && layout.head_bytes() % 16 == 0) {
    CompactGatherKernel<uint4>
        <<<grid, kThreads, 0, stream>>>(layout, layer_base, block_table, kept, rows, scratch);
    CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    CompactWriteKernel<uint4>
        <<<grid, kThreads, 0, stream>>>(layout, layer_base, block_table, rows, scratch);
  } else {
    CompactGatherKernel<uint8_t>
        <<<grid, kThreads, 0, stream>>>(layout, layer_base, block_table, kept, rows, scratch);
    CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    CompactWriteKernel<uint8_t>
        <<<grid, kThreads, 0, stream>>>(layout, layer_base, block_table, rows, scratch);
  }
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
