#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/layout_check.h"
#include "kernels/cuda/block_copy.h"
#include "kernels/cuda/cuda_check.h"

namespace cachemgr::kernels {
namespace {

constexpr unsigned kThreadsPerBlock = 256;

// One CTA per pair. `Word` is uint4 (16-byte copies; caller guarantees alignment) or uint8_t.
// layer_base: [layout.layer_bytes()] bytes; pairs: [gridDim.x].
template <typename Word>
__global__ void CopyBlocksKernel(KvLayerLayout layout, std::byte* layer_base,
                                 const BlockCopyPair* pairs) {
  const BlockCopyPair p = pairs[blockIdx.x];
  if (p.src >= layout.num_blocks || p.dst >= layout.num_blocks || p.src == p.dst) return;
  const size_t words = layout.plane_block_bytes() / sizeof(Word);
  for (int plane = 0; plane < 2; ++plane) {
    const KvPlane kv = static_cast<KvPlane>(plane);
    const Word* src = reinterpret_cast<const Word*>(layer_base + layout.block_offset(kv, p.src));
    Word* dst = reinterpret_cast<Word*>(layer_base + layout.block_offset(kv, p.dst));
    for (size_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
  }
}

}  // namespace

absl::Status CopyBlocksCuda(const KvLayerLayout& layout, std::byte* layer_base,
                            const BlockCopyPair* pairs, uint32_t num_pairs, cudaStream_t stream) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  if (num_pairs == 0) return absl::OkStatus();
  if (layer_base == nullptr || pairs == nullptr) {
    return absl::InvalidArgumentError("CopyBlocksCuda: null layer_base or pairs");
  }
  if (num_pairs > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyBlocksCuda: num_pairs ", num_pairs, " exceeds the grid limit"));
  }
  const bool vectorized = reinterpret_cast<uintptr_t>(layer_base) % sizeof(uint4) == 0 &&
                          layout.plane_block_bytes() % sizeof(uint4) == 0;
  const dim3 grid(num_pairs);
  const dim3 block(kThreadsPerBlock);
  if (vectorized) {
    CopyBlocksKernel<uint4><<<grid, block, 0, stream>>>(layout, layer_base, pairs);
  } else {
    CopyBlocksKernel<uint8_t><<<grid, block, 0, stream>>>(layout, layer_base, pairs);
  }
  CACHEMGR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
