#include "kernels/cpu/write_kv.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/layout_check.h"

namespace cachemgr::kernels {

absl::Status ValidateSlotMapping(const KvLayerLayout& layout,
                                 absl::Span<const int64_t> slot_mapping) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  const int64_t num_slots = int64_t{layout.num_blocks} * layout.block_size;
  for (size_t t = 0; t < slot_mapping.size(); ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < -1 || slot >= num_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", t, ": slot ", slot, " out of range [-1, ", num_slots, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteKvBySlotCpu(const KvLayerLayout& layout, std::byte* layer_base,
                              const std::byte* key, const std::byte* value,
                              absl::Span<const int64_t> slot_mapping) {
  if (absl::Status s = ValidateSlotMapping(layout, slot_mapping); !s.ok()) return s;
  if (slot_mapping.empty()) return absl::OkStatus();
  if (layer_base == nullptr || key == nullptr || value == nullptr) {
    return absl::InvalidArgumentError("WriteKvBySlotCpu: null layer_base, key or value");
  }
  const size_t row_bytes = layout.token_bytes();
  for (size_t t = 0; t < slot_mapping.size(); ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot == -1) continue;
    std::memcpy(layer_base + layout.slot_offset(KvPlane::kKey, slot), key + t * row_bytes,
                row_bytes);
    std::memcpy(layer_base + layout.slot_offset(KvPlane::kValue, slot), value + t * row_bytes,
                row_bytes);
  }
  return absl::OkStatus();
}

absl::Status ReadKvBySlotCpu(const KvLayerLayout& layout, const std::byte* layer_base,
                             std::byte* key, std::byte* value,
                             absl::Span<const int64_t> slot_mapping) {
  if (absl::Status s = ValidateSlotMapping(layout, slot_mapping); !s.ok()) return s;
  if (slot_mapping.empty()) return absl::OkStatus();
  if (layer_base == nullptr || key == nullptr || value == nullptr) {
    return absl::InvalidArgumentError("ReadKvBySlotCpu: null layer_base, key or value");
  }
  const size_t row_bytes = layout.token_bytes();
  for (size_t t = 0; t < slot_mapping.size(); ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot == -1) continue;
    std::memcpy(key + t * row_bytes, layer_base + layout.slot_offset(KvPlane::kKey, slot),
                row_bytes);
    std::memcpy(value + t * row_bytes, layer_base + layout.slot_offset(KvPlane::kValue, slot),
                row_bytes);
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
