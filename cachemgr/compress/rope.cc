#include "cachemgr/compress/rope.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace cachemgr::compress {

RopeParams RopeParamsFromShape(const ModelShape& shape) {
  RopeParams params;
  params.style = shape.rope_style;
  params.theta = shape.rope_theta;
  params.scaling = shape.rope_scaling;
  params.head_dim = shape.head_dim;
  params.rotary_dim = shape.rotary_dim;
  return params;
}

absl::Status ValidateRope(const RopeParams& params) {
  if (params.head_dim == 0) return absl::InvalidArgumentError("shape.head_dim must be > 0");
  if (params.style == RopeStyle::kNone) return absl::OkStatus();
  if (params.style != RopeStyle::kInterleaved && params.style != RopeStyle::kHalfSplit) {
    return absl::InvalidArgumentError(absl::StrCat("shape.rope_style is not a known style (got ",
                                                   static_cast<int>(params.style), ")"));
  }
  const uint32_t rotary_dim = params.EffectiveRotaryDim();
  if (rotary_dim % 2 != 0 || rotary_dim > params.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("shape.rotary_dim must be even and <= head_dim ",
                                                   params.head_dim, " (got ", rotary_dim, ")"));
  }
  if (!(params.theta > 0.0) || !std::isfinite(params.theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.rope_theta must be > 0 (got ", params.theta, ")"));
  }
  if (!(params.scaling > 0.0) || !std::isfinite(params.scaling)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.rope_scaling must be > 0 (got ", params.scaling, ")"));
  }
  return absl::OkStatus();
}

RopeAngles ComputeRopeAngles(const RopeParams& params, absl::Span<const uint32_t> positions) {
  RopeAngles angles;
  if (params.style == RopeStyle::kNone) return angles;
  const uint32_t rotary_dim = params.EffectiveRotaryDim();
  angles.num_pairs = rotary_dim / 2;
  std::vector<double> inv_freq(angles.num_pairs);
  for (uint32_t i = 0; i < angles.num_pairs; ++i) {
    inv_freq[i] = std::pow(params.theta, -2.0 * i / static_cast<double>(rotary_dim));
  }
  angles.cos.resize(positions.size() * angles.num_pairs);
  angles.sin.resize(positions.size() * angles.num_pairs);
  for (size_t p = 0; p < positions.size(); ++p) {
    const double position = positions[p] / params.scaling;
    float* cos_row = angles.cos.data() + p * angles.num_pairs;
    float* sin_row = angles.sin.data() + p * angles.num_pairs;
    for (uint32_t i = 0; i < angles.num_pairs; ++i) {
      const double angle = position * inv_freq[i];
      cos_row[i] = static_cast<float>(std::cos(angle));
      sin_row[i] = static_cast<float>(std::sin(angle));
    }
  }
  return angles;
}

namespace {

// One head vector: pairs (x[lo[i]], x[hi[i]]) rotate by (cos[i], sign * sin[i]).
inline void RotateInterleaved(float* x, const float* cos, const float* sin, uint32_t pairs,
                              float sign) {
  for (uint32_t i = 0; i < pairs; ++i) {
    const float a = x[2 * i];
    const float b = x[2 * i + 1];
    const float s = sign * sin[i];
    x[2 * i] = a * cos[i] - b * s;
    x[2 * i + 1] = a * s + b * cos[i];
  }
}

inline void RotateHalfSplit(float* x, const float* cos, const float* sin, uint32_t pairs,
                            float sign) {
  float* lo = x;
  float* hi = x + pairs;
  for (uint32_t i = 0; i < pairs; ++i) {
    const float a = lo[i];
    const float b = hi[i];
    const float s = sign * sin[i];
    lo[i] = a * cos[i] - b * s;
    hi[i] = a * s + b * cos[i];
  }
}

}  // namespace

void RotateRows(const RopeParams& params, const RopeAngles& angles,
                absl::Span<const uint32_t> angle_row, uint32_t heads, absl::Span<float> x,
                bool inverse) {
  if (params.style == RopeStyle::kNone || angles.num_pairs == 0) return;
  const uint32_t pairs = angles.num_pairs;
  const float sign = inverse ? -1.0f : 1.0f;
  const size_t row_stride = static_cast<size_t>(heads) * params.head_dim;
  const size_t table_rows = angles.cos.size() / pairs;
  for (size_t r = 0; r < angle_row.size(); ++r) {
    if (angle_row[r] >= table_rows) continue;  // left as is
    const float* cos = angles.cos.data() + static_cast<size_t>(angle_row[r]) * pairs;
    const float* sin = angles.sin.data() + static_cast<size_t>(angle_row[r]) * pairs;
    float* row = x.data() + r * row_stride;
    for (uint32_t h = 0; h < heads; ++h) {
      float* head = row + static_cast<size_t>(h) * params.head_dim;
      if (params.style == RopeStyle::kInterleaved) {
        RotateInterleaved(head, cos, sin, pairs, sign);
      } else {
        RotateHalfSplit(head, cos, sin, pairs, sign);
      }
    }
  }
}

namespace {

absl::Status Rotate(const RopeParams& params, absl::Span<const uint32_t> positions, uint32_t heads,
                    absl::Span<float> x, bool inverse) {
  if (absl::Status status = ValidateRope(params); !status.ok()) return status;
  const size_t expected = positions.size() * heads * params.head_dim;
  if (x.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("x has ", x.size(), " floats, expected ",
                                                   positions.size(), " x ", heads, " x ",
                                                   params.head_dim, " = ", expected));
  }
  const RopeAngles angles = ComputeRopeAngles(params, positions);
  std::vector<uint32_t> rows(positions.size());
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = static_cast<uint32_t>(r);
  RotateRows(params, angles, rows, heads, x, inverse);
  return absl::OkStatus();
}

}  // namespace

absl::Status ApplyRope(const RopeParams& params, absl::Span<const uint32_t> positions,
                       uint32_t heads, absl::Span<float> x) {
  return Rotate(params, positions, heads, x, /*inverse=*/false);
}

absl::Status UnapplyRope(const RopeParams& params, absl::Span<const uint32_t> positions,
                         uint32_t heads, absl::Span<float> x) {
  return Rotate(params, positions, heads, x, /*inverse=*/true);
}

}  // namespace cachemgr::compress
