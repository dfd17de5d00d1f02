// Rotary position embedding (RoPE), applied or removed in place on float32 host arrays.
//
// The codebook of SpindleKV is built on pre-RoPE keys (paper §3.4): keys arrive post-RoPE as
// the engine stores them, are un-rotated at their original positions before the codebook is
// built, and are re-rotated at the same positions when materialized.
//
// Conventions (both match Hugging Face / vLLM):
//   rotary_dim R (0 means head_dim): only dims [0, R) of each head rotate; the rest pass through.
//   inv_freq[i] = theta^(-2i / R) for i in [0, R/2); angle(p, i) = (p / scaling) * inv_freq[i],
//   computed in double (cos/sin too), stored as float.
//   kInterleaved: pair i is (x[2i], x[2i+1])            (GPT-J, Llama's original checkpoints).
//   kHalfSplit:   pair i is (x[i], x[i + R/2])          (HF rotate_half, GPT-NeoX).
//   Apply:   (a, b) -> (a cos - b sin, a sin + b cos).  Unapply uses the negative angle.
//   kNone:   no-op.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

struct RopeParams {
  RopeStyle style = RopeStyle::kInterleaved;
  double theta = 10000.0;
  double scaling = 1.0;  // positions are divided by it (linear scaling)
  uint32_t head_dim = 0;
  uint32_t rotary_dim = 0;  // 0 = head_dim

  uint32_t EffectiveRotaryDim() const { return rotary_dim == 0 ? head_dim : rotary_dim; }
};

RopeParams RopeParamsFromShape(const ModelShape& shape);

// INVALID_ARGUMENT (naming "shape.<field>") unless head_dim > 0, the effective rotary_dim is even
// and <= head_dim, theta > 0 and scaling > 0. kNone is always valid when head_dim > 0.
absl::Status ValidateRope(const RopeParams& params);

// cos/sin of angle(positions[p], i), each [positions.size(), R/2] row-major. Computing these
// once per sequence and indexing them by token is what makes rotating gathered vectors cheap.
struct RopeAngles {
  uint32_t num_pairs = 0;  // R / 2
  std::vector<float> cos;
  std::vector<float> sin;
};

// REQUIRES: ValidateRope(params).ok().
RopeAngles ComputeRopeAngles(const RopeParams& params, absl::Span<const uint32_t> positions);

// Rotates `rows` rows of `heads` vectors of head_dim floats each (x is [rows, heads, head_dim]);
// row r uses the angles of angle_row[r] (an index into `angles`); a row whose angle_row is not
// below the number of positions `angles` was computed for is left as is (as RotateRowsCuda
// does). inverse = true removes RoPE.
// REQUIRES: x.size() == angle_row.size() * heads * head_dim, angles computed with the same
// params.
void RotateRows(const RopeParams& params, const RopeAngles& angles,
                absl::Span<const uint32_t> angle_row, uint32_t heads, absl::Span<float> x,
                bool inverse);

// Convenience forms on x [positions.size(), heads, head_dim] with row r at positions[r].
// INVALID_ARGUMENT for bad params or a size mismatch.
absl::Status ApplyRope(const RopeParams& params, absl::Span<const uint32_t> positions,
                       uint32_t heads, absl::Span<float> x);
absl::Status UnapplyRope(const RopeParams& params, absl::Span<const uint32_t> positions,
                         uint32_t heads, absl::Span<float> x);

}  // namespace cachemgr::compress
