// Dequantization of GGUF tensor data to float32 (ggml's block formats), on load.
//
// Formats (ggml type id, elements per block, bytes per block):
//   F32 (0, 1, 4), F16 (1, 1, 2), BF16 (30, 1, 2),
//   Q4_0 (2, 32, 18):  fp16 d, 16 bytes of 4-bit q;   x = d * (q - 8)
//   Q4_1 (3, 32, 20):  fp16 d, fp16 m, 16 bytes q;    x = d * q + m
//   Q8_0 (8, 32, 34):  fp16 d, 32 int8 q;             x = d * q
// In the 4-bit formats byte j of a block holds element j in its low nibble and element j + 16
// in its high nibble.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace cachemgr::engine {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBf16 = 30,
};

// The name ("q4_1") of a supported type, or "type <id>".
const char* GgmlTypeName(uint32_t type);

// Bytes that `elements` elements of `type` occupy; UNIMPLEMENTED for an unsupported type,
// INVALID_ARGUMENT when `elements` is not a whole number of blocks or the bytes exceed 2^64.
absl::Status GgmlRowBytes(uint32_t type, uint64_t elements, uint64_t* bytes);

// Dequantizes out.size() elements of `type` from `data` (GgmlRowBytes(type, out.size()) bytes).
// REQUIRES: GgmlRowBytes succeeded for (type, out.size()).
void Dequantize(uint32_t type, const std::byte* data, absl::Span<float> out);

}  // namespace cachemgr::engine
