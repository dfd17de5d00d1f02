// Exact scalar conversions between the pool's element types and float32, written once for the
// CPU twins and the CUDA kernels (every function is usable from host and device code).
// f16/bf16 -> f32 is exact; f32 -> f16/bf16 rounds to nearest, ties to even (NaN stays NaN,
// overflow gives infinity, f16 subnormals are produced exactly) -- what __float2half_rn and
// __float2bfloat16_rn do, in portable integer arithmetic so both sides agree bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cachemgr/kernels/kv_layout.h"  // CACHEMGR_HD

namespace cachemgr::kernels {

CACHEMGR_HD uint32_t FloatToBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
#endif
}

CACHEMGR_HD float BitsToFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

CACHEMGR_HD float Bf16ToF32(uint16_t h) { return BitsToFloat(uint32_t{h} << 16); }

CACHEMGR_HD uint16_t F32ToBf16(float f) {
  uint32_t bits = FloatToBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

CACHEMGR_HD float F16ToF32(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return BitsToFloat(bits);
}

CACHEMGR_HD uint16_t F32ToF16(float f) {
  const uint32_t bits = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520
  const int32_t exp = static_cast<int32_t>(abs >> 23) - 127;
  if (exp < -25) return sign;  // below half the smallest subnormal: rounds to zero
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  // Target: 10 mantissa bits; shift depends on normal (exp >= -14) or subnormal.
  const int shift = exp >= -14 ? 13 : 13 + (-14 - exp);
  uint32_t result_mant = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (result_mant & 1u))) ++result_mant;
  if (exp >= -14) {
    // result_mant includes the implicit bit (0x400..0x800); a carry to 0x800 bumps the exponent.
    uint32_t e = static_cast<uint32_t>(exp + 15);
    if (result_mant == 0x800u) {
      result_mant = 0x400u;
      ++e;
    }
    if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | (e << 10) | (result_mant & 0x3ffu));
  }
  // Subnormal (a carry into 0x400 gives the smallest normal, which the encoding handles).
  return static_cast<uint16_t>(sign | result_mant);
}

// One element of `type` at `src` to float32, and back (device and host).
CACHEMGR_HD float ElemToF32(const std::byte* src, KvElemType type) {
  if (type == KvElemType::kF32) return *reinterpret_cast<const float*>(src);
  const uint16_t h = *reinterpret_cast<const uint16_t*>(src);
  return type == KvElemType::kBf16 ? Bf16ToF32(h) : F16ToF32(h);
}

CACHEMGR_HD void F32ToElem(float f, KvElemType type, std::byte* dst) {
  if (type == KvElemType::kF32) {
    *reinterpret_cast<float*>(dst) = f;
    return;
  }
  *reinterpret_cast<uint16_t*>(dst) = type == KvElemType::kBf16 ? F32ToBf16(f) : F32ToF16(f);
}

// Host loops: `n` elements of `elem_bytes` (2: fp16 or bf16 per `bf16`; 4: fp32) to float32 and
// back.
inline void ToF32(const std::byte* src, uint32_t elem_bytes, bool bf16, size_t n, float* dst) {
  if (elem_bytes == 4) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = bf16 ? Bf16ToF32(h) : F16ToF32(h);
  }
}

inline void FromF32(const float* src, uint32_t elem_bytes, bool bf16, size_t n, std::byte* dst) {
  if (elem_bytes == 4) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = bf16 ? F32ToBf16(src[i]) : F32ToF16(src[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

}  // namespace cachemgr::kernels
