// Overflow-checked size arithmetic: every size or offset the daemon and its clients compute from
// request or reply fields goes through these, so a product that does not fit 64 bits is refused
// instead of wrapping to a small number (a pool described as larger than the memory behind it).
//
// Each function returns std::nullopt when the exact result does not fit in T. Header-only,
// constexpr, thread-safe. T is an unsigned integer type (size_t and uint64_t are the same type on
// the platforms we build for).
#pragma once

#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <optional>

namespace cachemgr {

template <std::unsigned_integral T>
constexpr std::optional<T> CheckedMul(T a, T b) {
  T out;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

template <std::unsigned_integral T>
constexpr std::optional<T> CheckedAdd(T a, T b) {
  T out;
  if (__builtin_add_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// The product of every factor (1 for none).
constexpr std::optional<uint64_t> CheckedProduct(std::initializer_list<uint64_t> factors) {
  uint64_t out = 1;
  for (uint64_t f : factors) {
    if (__builtin_mul_overflow(out, f, &out)) return std::nullopt;
  }
  return out;
}

// The smallest multiple of `multiple` (> 0) that is >= value.
constexpr std::optional<uint64_t> CheckedRoundUp(uint64_t value, uint64_t multiple) {
  const uint64_t rem = value % multiple;
  if (rem == 0) return value;
  return CheckedAdd<uint64_t>(value, multiple - rem);
}

// a * b, or the largest T when that overflows: for upper bounds that are only compared against a
// limit (a saturated bound is always over it).
template <std::unsigned_integral T>
constexpr T SaturatingMul(T a, T b) {
  T out;
  return __builtin_mul_overflow(a, b, &out) ? static_cast<T>(~T{0}) : out;
}

template <std::unsigned_integral T>
constexpr T SaturatingAdd(T a, T b) {
  T out;
  return __builtin_add_overflow(a, b, &out) ? static_cast<T>(~T{0}) : out;
}

}  // namespace cachemgr
