#include "cachemgr/model_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/quote.h"

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

namespace {

// 2 (K and V) * block_size * num_kv_heads * head_dim * elem_bytes, if it fits.
std::optional<uint64_t> CheckedBlockBytes(const ModelSpec& m) {
  return CheckedProduct({2, m.block_size, m.num_kv_heads, m.head_dim, DTypeBytes(m.dtype)});
}

const char* RopeStyleName(RopeStyle style) {
  switch (style) {
    case RopeStyle::kNone:
      return "none";
    case RopeStyle::kInterleaved:
      return "interleaved";
    case RopeStyle::kHalfSplit:
      return "half_split";
  }
  return "?";
}

}  // namespace

// Validation checked the product; the field maxima keep it below 2^36 anyway.
uint64_t ModelSpec::BlockBytes() const { return CheckedBlockBytes(*this).value_or(UINT64_MAX); }

absl::StatusOr<uint64_t> ModelSpec::LayerBytes(uint32_t num_blocks) const {
  const std::optional<uint64_t> bytes = CheckedMul<uint64_t>(num_blocks, BlockBytes());
  if (!bytes.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", num_blocks, " of ", BlockBytes(),
                     " bytes each make a layer larger than 2^64 bytes"));
  }
  return *bytes;
}

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
  const std::string rope_text = rope.style == RopeStyle::kNone
                                    ? std::string("none")
                                    : absl::StrCat(RopeStyleName(rope.style), "/", rope.theta, "/",
                                                   rope.scaling_factor, "/", rope.rotary_dim);
  return absl::StrFormat("%s L=%u H=%u/%u D=%u %s bs=%u %s rope=%s", name, num_layers, num_q_heads,
                         num_kv_heads, head_dim, DTypeName(dtype), block_size,
                         layout == kernels::KvOrder::kFlashAttn ? "flash_attn" : "flashinfer",
                         rope_text);
}

std::vector<std::string> ModelSpec::DifferingFields(const ModelSpec& other) const {
  std::vector<std::string> out;
  auto check = [&out](bool differ, const char* field) {
    if (differ) out.emplace_back(field);
  };
  check(name != other.name, "name");
  check(num_layers != other.num_layers, "num_layers");
  check(num_q_heads != other.num_q_heads, "num_q_heads");
  check(num_kv_heads != other.num_kv_heads, "num_kv_heads");
  check(head_dim != other.head_dim, "head_dim");
  check(dtype != other.dtype, "dtype");
  check(block_size != other.block_size, "block_size");
  check(layout != other.layout, "layout");
  check(rope.style != other.rope.style, "rope.style");
  check(rope.theta != other.rope.theta, "rope.theta");
  check(rope.scaling_factor != other.rope.scaling_factor, "rope.scaling_factor");
  check(rope.rotary_dim != other.rope.rotary_dim, "rope.rotary_dim");
  return out;
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
    return Bad(
        prefix, "name",
        absl::StrCat("must be 1-", kMaxNameLength, " printable characters without spaces (got ",
                     QuoteForMessage(spec.name), ")"));
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
  if (!CheckedBlockBytes(spec).has_value()) {
    return Bad(prefix, "block_size", "makes one block larger than 2^64 bytes");
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
