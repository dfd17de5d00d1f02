// BlockCopyPair: one copy-on-write block copy inside a layer tensor (vLLM's copy_blocks mapping).
// Plain data shared by the CPU twin and the CUDA kernel (device arrays hold these directly).
#pragma once

#include <cstdint>

namespace cachemgr::kernels {

// Copy both planes (K and V) of block `src` onto block `dst` of the same layer.
struct BlockCopyPair {
  uint32_t src;
  uint32_t dst;
};

static_assert(sizeof(BlockCopyPair) == 8, "BlockCopyPair is shared with device code as 2 x u32");

}  // namespace cachemgr::kernels
