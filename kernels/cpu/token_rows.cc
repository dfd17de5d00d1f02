#include "kernels/cpu/token_rows.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cachemgr/kernels/elem_convert.h"
#include "kernels/cpu/layout_check.h"

namespace cachemgr::kernels {
namespace {

uint32_t TypeBytes(KvElemType type) { return type == KvElemType::kF32 ? 4 : 2; }

}  // namespace

absl::Status ValidateTokenSlots(const KvLayerLayout& layout, KvElemType type,
                                absl::Span<const int64_t> slots) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  if (type != KvElemType::kF16 && type != KvElemType::kBf16 && type != KvElemType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown element type ", static_cast<int>(type)));
  }
  if (TypeBytes(type) != layout.elem_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("element type of ", TypeBytes(type),
                                                   " bytes but layout.elem_bytes is ",
                                                   layout.elem_bytes));
  }
  const int64_t num_slots = int64_t{layout.num_blocks} * layout.block_size;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i] < 0 || slots[i] >= num_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("slots[", i, "] = ", slots[i], " out of range [0, ", num_slots, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status GatherTokensF32Cpu(const KvLayerLayout& layout, KvElemType type,
                                const std::byte* layer_base, absl::Span<const int64_t> slots,
                                float* keys, float* values) {
  if (absl::Status s = ValidateTokenSlots(layout, type, slots); !s.ok()) return s;
  const size_t row = size_t{layout.num_kv_heads} * layout.head_dim;
  const bool bf16 = type == KvElemType::kBf16;
  for (size_t i = 0; i < slots.size(); ++i) {
    ToF32(layer_base + layout.slot_offset(KvPlane::kKey, slots[i]), layout.elem_bytes, bf16, row,
          keys + i * row);
    ToF32(layer_base + layout.slot_offset(KvPlane::kValue, slots[i]), layout.elem_bytes, bf16, row,
          values + i * row);
  }
  return absl::OkStatus();
}

absl::Status ScatterTokensF32Cpu(const KvLayerLayout& layout, KvElemType type,
                                 std::byte* layer_base, absl::Span<const int64_t> slots,
                                 const float* keys, const float* values) {
  if (absl::Status s = ValidateTokenSlots(layout, type, slots); !s.ok()) return s;
  const size_t row = size_t{layout.num_kv_heads} * layout.head_dim;
  const bool bf16 = type == KvElemType::kBf16;
  for (size_t i = 0; i < slots.size(); ++i) {
    FromF32(keys + i * row, layout.elem_bytes, bf16, row,
            layer_base + layout.slot_offset(KvPlane::kKey, slots[i]));
    FromF32(values + i * row, layout.elem_bytes, bf16, row,
            layer_base + layout.slot_offset(KvPlane::kValue, slots[i]));
  }
  return absl::OkStatus();
}

absl::Status ValidateCompaction(const KvLayerLayout& layout, absl::Span<const uint32_t> block_table,
                                uint32_t num_tokens, absl::Span<const uint32_t> kept,
                                uint32_t rows) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  const uint64_t blocks = (uint64_t{num_tokens} + layout.block_size - 1) / layout.block_size;
  if (block_table.size() < blocks) {
    return absl::InvalidArgumentError(absl::StrCat("block_table has ", block_table.size(),
                                                   " blocks for ", num_tokens, " tokens"));
  }
  for (size_t i = 0; i < blocks; ++i) {
    if (block_table[i] >= layout.num_blocks) {
      return absl::InvalidArgumentError(
          absl::StrCat("block_table[", i, "] = ", block_table[i], " >= num_blocks"));
    }
  }
  if (kept.size() != size_t{layout.num_kv_heads} * rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kept has ", kept.size(),
        " entries, expected num_kv_heads * rows = ", size_t{layout.num_kv_heads} * rows));
  }
  for (uint32_t h = 0; h < layout.num_kv_heads; ++h) {
    for (uint32_t r = 0; r < rows; ++r) {
      const uint32_t t = kept[size_t{h} * rows + r];
      if (t >= num_tokens || (r > 0 && t <= kept[size_t{h} * rows + r - 1])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "kept[", h, "][", r, "] = ", t, " is not strictly ascending below ", num_tokens));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CompactHeadsCpu(const KvLayerLayout& layout, std::byte* layer_base,
                             absl::Span<const uint32_t> block_table, uint32_t num_tokens,
                             absl::Span<const uint32_t> kept, uint32_t rows) {
  if (absl::Status s = ValidateCompaction(layout, block_table, num_tokens, kept, rows); !s.ok()) {
    return s;
  }
  const uint32_t bs = layout.block_size;
  const size_t head_bytes = layout.head_bytes();
  for (uint32_t r = 0; r < rows; ++r) {
    for (uint32_t h = 0; h < layout.num_kv_heads; ++h) {
      const uint32_t t = kept[size_t{h} * rows + r];
      if (t == r) continue;
      for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
        std::memcpy(layer_base + layout.head_offset(plane, block_table[r / bs], r % bs, h),
                    layer_base + layout.head_offset(plane, block_table[t / bs], t % bs, h),
                    head_bytes);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
