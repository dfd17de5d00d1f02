#include "tools/engine/quant.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cachemgr/kernels/elem_convert.h"

namespace cachemgr::engine {
namespace {

constexpr uint64_t kBlock = 32;

uint16_t Load16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

float Half(const std::byte* p) { return kernels::F16ToF32(Load16(p)); }

}  // namespace

const char* GgmlTypeName(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return "f32";
    case GgmlType::kF16:
      return "f16";
    case GgmlType::kQ4_0:
      return "q4_0";
    case GgmlType::kQ4_1:
      return "q4_1";
    case GgmlType::kQ8_0:
      return "q8_0";
    case GgmlType::kBf16:
      return "bf16";
  }
  return "unsupported type";
}

absl::Status GgmlRowBytes(uint32_t type, uint64_t elements, uint64_t* bytes) {
  uint64_t block_elems = 1, block_bytes = 0;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      block_bytes = 4;
      break;
    case GgmlType::kF16:
    case GgmlType::kBf16:
      block_bytes = 2;
      break;
    case GgmlType::kQ4_0:
      block_elems = kBlock;
      block_bytes = 18;
      break;
    case GgmlType::kQ4_1:
      block_elems = kBlock;
      block_bytes = 20;
      break;
    case GgmlType::kQ8_0:
      block_elems = kBlock;
      block_bytes = 34;
      break;
    default:
      return absl::UnimplementedError(absl::StrCat(
          "ggml type ", type, " is not supported (f32, f16, bf16, q4_0, q4_1, q8_0 are)"));
  }
  if (elements % block_elems != 0) {
    return absl::InvalidArgumentError(absl::StrCat(elements, " elements of ", GgmlTypeName(type),
                                                   " are not whole blocks of ", block_elems));
  }
  if (__builtin_mul_overflow(elements / block_elems, block_bytes, bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(elements, " elements of ", GgmlTypeName(type), " are more than 2^64 bytes"));
  }
  return absl::OkStatus();
}

void Dequantize(uint32_t type, const std::byte* data, absl::Span<float> out) {
  const size_t n = out.size();
  if (n == 0) return;  // a tensor with a zero dimension: nothing to read (`data` may be null)
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(out.data(), data, n * 4);
      return;
    case GgmlType::kF16:
      for (size_t i = 0; i < n; ++i) out[i] = Half(data + 2 * i);
      return;
    case GgmlType::kBf16:
      for (size_t i = 0; i < n; ++i) out[i] = kernels::Bf16ToF32(Load16(data + 2 * i));
      return;
    case GgmlType::kQ4_0:
      for (size_t b = 0; b < n / kBlock; ++b) {
        const std::byte* block = data + b * 18;
        const float d = Half(block);
        for (size_t j = 0; j < 16; ++j) {
          const auto q = static_cast<uint8_t>(block[2 + j]);
          out[b * kBlock + j] = d * static_cast<float>((q & 0x0f) - 8);
          out[b * kBlock + j + 16] = d * static_cast<float>((q >> 4) - 8);
        }
      }
      return;
    case GgmlType::kQ4_1:
      for (size_t b = 0; b < n / kBlock; ++b) {
        const std::byte* block = data + b * 20;
        const float d = Half(block);
        const float m = Half(block + 2);
        for (size_t j = 0; j < 16; ++j) {
          const auto q = static_cast<uint8_t>(block[4 + j]);
          out[b * kBlock + j] = d * static_cast<float>(q & 0x0f) + m;
          out[b * kBlock + j + 16] = d * static_cast<float>(q >> 4) + m;
        }
      }
      return;
    case GgmlType::kQ8_0:
      for (size_t b = 0; b < n / kBlock; ++b) {
        const std::byte* block = data + b * 34;
        const float d = Half(block);
        for (size_t j = 0; j < kBlock; ++j) {
          out[b * kBlock + j] = d * static_cast<float>(static_cast<int8_t>(block[2 + j]));
        }
      }
      return;
  }
}

}  // namespace cachemgr::engine
