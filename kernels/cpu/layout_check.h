// Host-side sanity checks of a KvLayerLayout, shared by the CPU twins and the CUDA launchers.
// Header-only so both libraries use the same rules without one linking the other.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/kernels/kv_layout.h"

namespace cachemgr::kernels {

// OK iff `layout` names a known order and every extent (num_blocks, block_size, num_kv_heads,
// head_dim, elem_bytes) is non-zero; INVALID_ARGUMENT naming the first bad field otherwise.
inline absl::Status CheckKvLayerLayout(const KvLayerLayout& layout) {
  if (layout.order != KvOrder::kFlashAttn && layout.order != KvOrder::kFlashInfer) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvLayerLayout: unknown order ", static_cast<int>(layout.order)));
  }
  struct Field {
    const char* name;
    uint32_t value;
  };
  const Field fields[] = {{"num_blocks", layout.num_blocks},
                          {"block_size", layout.block_size},
                          {"num_kv_heads", layout.num_kv_heads},
                          {"head_dim", layout.head_dim},
                          {"elem_bytes", layout.elem_bytes}};
  for (const Field& f : fields) {
    if (f.value == 0) {
      return absl::InvalidArgumentError(absl::StrCat("KvLayerLayout: ", f.name, " is 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
