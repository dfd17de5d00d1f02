#include "cachemgr/model_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cachemgr {

uint32_t DTypeBytes(DType dtype) { return dtype == DType::kFp32 ? 4 : 2; }

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
      return "fp16";
    case DType::kBf16:
      return "bf16";
    case DType::kFp32:
      return "fp32";
  }
  return "?";
}

kernels::KvLayerLayout ModelSpec::LayerLayout(uint32_t num_blocks) const {
  kernels::KvLayerLayout l;
  l.order = layout;
  l.num_blocks = num_blocks;
  l.block_size = block_size;
  l.num_kv_heads = num_kv_heads;
  l.head_dim = head_dim;
  l.elem_bytes = DTypeBytes(dtype);
  return l;
}

uint64_t ModelSpec::BlockBytes() const { return LayerLayout(0).block_bytes(); }

kernels::KvElemType ModelSpec::ElemType() const {
  switch (dtype) {
    case DType::kFp16:
      return kernels::KvElemType::kF16;
    case DType::kBf16:
      return kernels::KvElemType::kBf16;
    case DType::kFp32:
      break;
  }
  return kernels::KvElemType::kF32;
}

std::string ModelSpec::Describe() const {
  return absl::StrFormat("%s L=%u H=%u/%u D=%u %s bs=%u %s", name, num_layers, num_q_heads,
                         num_kv_heads, head_dim, DTypeName(dtype), block_size,
                         layout == kernels::KvOrder::kFlashAttn ? "flash_attn" : "flashinfer");
}

bool IsValidIdentifier(const std::string& name, size_t max_len) {
  if (name.empty() || name.size() > max_len) return false;
  for (char c : name) {
    if (c <= ' ' || c > '~') return false;
  }
  return true;
}

namespace {

absl::Status Bad(const std::string& prefix, const char* field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(prefix, ".", field, " ", why));
}

absl::Status CheckRange(const std::string& prefix, const char* field, uint32_t value,
                        uint32_t max) {
  if (value == 0 || value > max) {
    return Bad(prefix, field, absl::StrCat("must be in [1, ", max, "] (got ", value, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateModelSpec(const ModelSpec& spec, const std::string& prefix) {
  if (!IsValidIdentifier(spec.name, kMaxNameLength)) {
    return Bad(prefix, "name",
               absl::StrCat("must be 1-", kMaxNameLength,
                            " printable characters without spaces (got \"", spec.name, "\")"));
  }
  if (auto s = CheckRange(prefix, "num_layers", spec.num_layers, kMaxLayers); !s.ok()) return s;
  if (auto s = CheckRange(prefix, "num_q_heads", spec.num_q_heads, kMaxHeads); !s.ok()) return s;
  if (auto s = CheckRange(prefix, "num_kv_heads", spec.num_kv_heads, kMaxHeads); !s.ok()) return s;
  if (spec.num_q_heads % spec.num_kv_heads != 0) {
    return Bad(prefix, "num_kv_heads",
               absl::StrCat("must divide num_q_heads (got ", spec.num_kv_heads, " and ",
                            spec.num_q_heads, ")"));
  }
  if (auto s = CheckRange(prefix, "head_dim", spec.head_dim, kMaxHeadDim); !s.ok()) return s;
  if (auto s = CheckRange(prefix, "block_size", spec.block_size, kMaxBlockSize); !s.ok()) return s;
  if (spec.rope.style != RopeStyle::kNone) {
    if (!(spec.rope.theta > 0) || !std::isfinite(spec.rope.theta)) {
      return Bad(prefix, "rope.theta",
                 absl::StrCat("must be a finite number > 0 (got ", spec.rope.theta, ")"));
    }
    if (!(spec.rope.scaling_factor > 0) || !std::isfinite(spec.rope.scaling_factor)) {
      return Bad(prefix, "rope.scaling_factor",
                 absl::StrCat("must be a finite number > 0 (got ", spec.rope.scaling_factor, ")"));
    }
    if (spec.rope.rotary_dim % 2 != 0 || spec.rope.rotary_dim > spec.head_dim) {
      return Bad(prefix, "rope.rotary_dim",
                 absl::StrCat("must be even and <= head_dim ", spec.head_dim, " (got ",
                              spec.rope.rotary_dim, ")"));
    }
    if (spec.rope.rotary_dim == 0 && spec.head_dim % 2 != 0) {
      return Bad(
          prefix, "head_dim",
          absl::StrCat("must be even when RoPE rotates the whole head (got ", spec.head_dim, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
