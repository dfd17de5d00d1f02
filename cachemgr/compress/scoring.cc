#include "cachemgr/compress/scoring.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/vector_kernels.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace cachemgr::compress {
namespace {

// Query rows scored together against each key row: keeps the tile of queries in L1 and the
// logits buffer at kTileRows x num_tokens floats.
constexpr uint32_t kTileRows = 16;

// Keys scored together: a block of kKeyBlock keys is transposed to [head_dim][kKeyBlock] so
// that the kernel's inner loops run across keys (vector lanes) with no horizontal reductions.
constexpr uint32_t kKeyBlock = kLogitsKeyBlock;

// exp(x) for x <= 0 (softmax after subtracting the row maximum), relative error ~1e-7: Cody-Waite
// reduction x = n ln2 + r and the Cephes expf polynomial. Branch-free so loops vectorize.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// The loops below work in blocks of kLanes with a fixed-trip inner loop: GCC's -O2 cost model
// vectorizes those, but not loops that would need a scalar epilogue.
constexpr uint32_t kLanes = 8;

float RowMax(const float* row, uint32_t len) {
  float lane_max[kLanes];
  for (uint32_t j = 0; j < kLanes; ++j) lane_max[j] = -std::numeric_limits<float>::infinity();
  uint32_t a = 0;
  for (; a + kLanes <= len; a += kLanes) {
    for (uint32_t j = 0; j < kLanes; ++j) {
      lane_max[j] = lane_max[j] > row[a + j] ? lane_max[j] : row[a + j];
    }
  }
  float best = -std::numeric_limits<float>::infinity();
  for (uint32_t j = 0; j < kLanes; ++j) best = std::max(best, lane_max[j]);
  for (; a < len; ++a) best = std::max(best, row[a]);
  return best;
}

// row[a] <- exp(row[a] - shift); returns the sum (accumulated in double). The SSE2 path
// computes exactly what ExpNonPositive does, four lanes at a time (GCC does not vectorize the
// scalar form: its float compare may trap under the default -ftrapping-math).
double ExpShiftAndSum(float* row, uint32_t len, float shift) {
  uint32_t a = 0;
  double total = 0.0;
#if defined(__SSE2__)
  const __m128 v_shift = _mm_set1_ps(shift);
  const __m128 v_lowest = _mm_set1_ps(-87.0f);
  const __m128 v_log2e = _mm_set1_ps(1.44269504088896341f);
  const __m128 v_round = _mm_set1_ps(12582912.0f);
  const __m128 v_ln2_hi = _mm_set1_ps(0.693359375f);
  const __m128 v_ln2_lo = _mm_set1_ps(-2.12194440e-4f);
  const __m128 v_one = _mm_set1_ps(1.0f);
  const __m128i v_bias = _mm_set1_epi32(127);
  __m128d sum_lo = _mm_setzero_pd();
  __m128d sum_hi = _mm_setzero_pd();
  for (; a + 4 <= len; a += 4) {
    __m128 x = _mm_sub_ps(_mm_loadu_ps(row + a), v_shift);
    x = _mm_max_ps(x, v_lowest);
    const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, v_log2e), v_round), v_round);
    __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, v_ln2_hi));
    r = _mm_sub_ps(r, _mm_mul_ps(n, v_ln2_lo));
    const __m128 z = _mm_mul_ps(r, r);
    __m128 y = _mm_set1_ps(1.9875691500e-4f);
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.3981999507e-3f));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(8.3334519073e-3f));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(4.1665795894e-2f));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.6666665459e-1f));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(5.0000001201e-1f));
    y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(y, z), r), v_one);
    const __m128i bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(n), v_bias), 23);
    y = _mm_mul_ps(y, _mm_castsi128_ps(bits));
    _mm_storeu_ps(row + a, y);
    sum_lo = _mm_add_pd(sum_lo, _mm_cvtps_pd(y));
    sum_hi = _mm_add_pd(sum_hi, _mm_cvtps_pd(_mm_movehl_ps(y, y)));
  }
  double lanes[4];
  _mm_storeu_pd(lanes, sum_lo);
  _mm_storeu_pd(lanes + 2, sum_hi);
  total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; a < len; ++a) {
    row[a] = ExpNonPositive(row[a] - shift);
    total += row[a];
  }
  return total;
}

// out[a] += row[a] * scale.
void AddScaled(const float* row, uint32_t len, float scale, float* out) {
  uint32_t a = 0;
  for (; a + kLanes <= len; a += kLanes) {
    for (uint32_t j = 0; j < kLanes; ++j) out[a + j] += row[a + j] * scale;
  }
  for (; a < len; ++a) out[a] += row[a] * scale;
}

// Adds softmax(row[0, len)) into out[0, len). Clobbers row.
void AddSoftmax(float* row, uint32_t len, float* out) {
  const float max_logit = RowMax(row, len);
  if (!std::isfinite(max_logit)) {
    // Infinite or NaN logits: the exact library form (NaNs propagate to the scores).
    double total = 0.0;
    for (uint32_t a = 0; a < len; ++a) total += std::exp(static_cast<double>(row[a] - max_logit));
    for (uint32_t a = 0; a < len; ++a) {
      out[a] += static_cast<float>(std::exp(static_cast<double>(row[a] - max_logit)) / total);
    }
    return;
  }
  const double total = ExpShiftAndSum(row, len, max_logit);
  AddScaled(row, len, static_cast<float>(1.0 / total), out);
}

}  // namespace

void AttentionColumnSums(const ModelShape& shape, uint32_t num_tokens, const float* keys,
                         const float* queries, uint32_t num_queries, std::vector<float>* sums) {
  const uint32_t num_q_heads = shape.num_q_heads;
  const uint32_t num_kv_heads = shape.num_kv_heads;
  const uint32_t head_dim = shape.head_dim;
  const uint32_t group = num_q_heads / num_kv_heads;
  sums->assign(static_cast<size_t>(num_q_heads) * num_tokens, 0.0f);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const uint32_t first_position = num_tokens - num_queries;
  const uint32_t rows_per_kv_head = group * num_queries;

  std::vector<float> query_tile(static_cast<size_t>(kTileRows) * head_dim);
  const size_t logits_stride = (num_tokens + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  std::vector<float> logits(static_cast<size_t>(kTileRows) * logits_stride);
  std::vector<float> packed_keys(logits_stride * head_dim);
  uint32_t row_head[kTileRows];
  uint32_t row_last_key[kTileRows];
  const VectorKernels& kernels = SelectedVectorKernels();

  for (uint32_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
    // This KV head's keys, packed once as [block][head_dim][kKeyBlock] (zero-padded) so every
    // query tile streams them sequentially.
    for (uint32_t t0 = 0; t0 < num_tokens; t0 += kKeyBlock) {
      float* block = packed_keys.data() + static_cast<size_t>(t0) * head_dim;
      for (uint32_t j = 0; j < kKeyBlock; ++j) {
        if (t0 + j < num_tokens) {
          const float* k = keys + (static_cast<size_t>(t0 + j) * num_kv_heads + kv_head) * head_dim;
          for (uint32_t i = 0; i < head_dim; ++i) block[i * kKeyBlock + j] = k[i];
        } else {
          for (uint32_t i = 0; i < head_dim; ++i) block[i * kKeyBlock + j] = 0.0f;
        }
      }
    }
    // Rows are ordered (query, head in group), so a tile spans few positions and little of
    // its logits buffer is computed past a row's causal limit.
    for (uint32_t row0 = 0; row0 < rows_per_kv_head; row0 += kTileRows) {
      const uint32_t rows = std::min(kTileRows, rows_per_kv_head - row0);
      uint32_t last_key = 0;
      for (uint32_t r = 0; r < rows; ++r) {
        const uint32_t query = (row0 + r) / group;
        const uint32_t head = kv_head * group + (row0 + r) % group;
        row_head[r] = head;
        row_last_key[r] = first_position + query;
        last_key = std::max(last_key, row_last_key[r]);
        const float* q = queries + (static_cast<size_t>(query) * num_q_heads + head) * head_dim;
        float* dst = query_tile.data() + static_cast<size_t>(r) * head_dim;
        for (uint32_t i = 0; i < head_dim; ++i) dst[i] = q[i] * scale;
      }
      // Logits for keys [0, last_key]; the buffer rows are padded to a whole key block.
      for (uint32_t t0 = 0; t0 <= last_key; t0 += kKeyBlock) {
        kernels.block_logits(query_tile.data(), rows, head_dim,
                             packed_keys.data() + static_cast<size_t>(t0) * head_dim,
                             logits.data() + t0, logits_stride);
      }
      for (uint32_t r = 0; r < rows; ++r) {
        AddSoftmax(logits.data() + r * logits_stride, row_last_key[r] + 1,
                   sums->data() + static_cast<size_t>(row_head[r]) * num_tokens);
      }
    }
  }
}

void DivideByDistanceToEnd(uint32_t num_tokens, absl::Span<float> row) {
  for (size_t a = 0; a < row.size(); ++a) row[a] /= static_cast<float>(num_tokens - a);
}

void Pool1d(Pooling pooling, uint32_t kernel, absl::Span<const float> in, absl::Span<float> out) {
  const int64_t n = static_cast<int64_t>(in.size());
  const int64_t half = kernel / 2;
  if (pooling == Pooling::kNone || kernel <= 1) {
    std::copy(in.begin(), in.end(), out.begin());
    return;
  }
  if (pooling == Pooling::kAvg) {
    // Sliding window sum in double; zero padding counts in the divisor (count_include_pad).
    const double inv_kernel = 1.0 / static_cast<double>(kernel);
    double window = 0.0;
    for (int64_t j = 0; j <= std::min(half, n - 1); ++j) window += in[j];
    for (int64_t a = 0; a < n; ++a) {
      out[a] = static_cast<float>(window * inv_kernel);
      const int64_t enter = a + half + 1;
      const int64_t leave = a - half;
      if (enter < n) window += in[enter];
      if (leave >= 0) window -= in[leave];
    }
    return;
  }
  // kMax: kernels are small (SnapKV: 5), so the direct form is fine.
  for (int64_t a = 0; a < n; ++a) {
    const int64_t lo = std::max<int64_t>(0, a - half);
    const int64_t hi = std::min<int64_t>(n - 1, a + half);
    float best = in[lo];
    for (int64_t j = lo + 1; j <= hi; ++j) best = std::max(best, in[j]);
    out[a] = best;
  }
}

absl::StatusOr<LayerScores> ScoreLayer(const ModelShape& shape, const PolicyConfig& policy,
                                       const LayerInput& layer, uint32_t layer_index,
                                       const WindowSplit& split, bool want_lmba) {
  const uint32_t num_tokens = split.num_tokens;
  const uint32_t context = split.context;
  const uint32_t num_q_heads = shape.num_q_heads;
  const uint32_t group = num_q_heads / shape.num_kv_heads;

  // Step 1.
  std::vector<float> sums;
  if (layer.queries != nullptr) {
    if (layer.num_queries == 0 || layer.num_queries > num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("input.layers[", layer_index,
                                                     "].num_queries must be in [1, ", num_tokens,
                                                     "] (got ", layer.num_queries, ")"));
    }
    AttentionColumnSums(shape, num_tokens, layer.keys, layer.queries, layer.num_queries, &sums);
  } else if (layer.scores != nullptr) {
    sums.assign(layer.scores, layer.scores + static_cast<size_t>(num_q_heads) * num_tokens);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "input.layers[", layer_index, "].queries or .scores is required for attention scoring"));
  }

  LayerScores out;
  out.context = context;
  if (want_lmba && context > 0) {
    std::vector<float> scratch;
    double total = 0.0;
    for (uint32_t h = 0; h < num_q_heads; ++h) {
      total += HeadMinimumBudget(
          absl::MakeConstSpan(sums.data() + static_cast<size_t>(h) * num_tokens, context),
          policy.zigzag_tau, &scratch);
    }
    out.lmba = total / num_q_heads;
  }

  // Steps 2-3, per query head, on the context columns, in place into `per_head`.
  const bool is_window = policy.scoring == Scoring::kWindow;
  std::vector<float> per_head(static_cast<size_t>(num_q_heads) * context);
  for (uint32_t h = 0; h < num_q_heads; ++h) {
    float* row = sums.data() + static_cast<size_t>(h) * num_tokens;
    absl::Span<float> context_row(row, context);
    if (is_window && policy.normalization == WindowNormalization::kLiteral) {
      DivideByDistanceToEnd(num_tokens, context_row);
    }
    absl::Span<float> dst(per_head.data() + static_cast<size_t>(h) * context, context);
    Pool1d(is_window ? policy.pooling : Pooling::kNone, policy.pool_kernel, context_row, dst);
  }

  // Step 4.
  if (policy.gqa == GqaMode::kRepeat || group == 1) {
    out.num_heads = num_q_heads;
    out.scores = std::move(per_head);
  } else {
    out.num_heads = shape.num_kv_heads;
    out.scores.assign(static_cast<size_t>(shape.num_kv_heads) * context, 0.0f);
    const float inv_group = 1.0f / static_cast<float>(group);
    for (uint32_t h = 0; h < num_q_heads; ++h) {
      const float* src = per_head.data() + static_cast<size_t>(h) * context;
      float* dst = out.scores.data() + static_cast<size_t>(h / group) * context;
      for (uint32_t a = 0; a < context; ++a) dst[a] += src[a];
    }
    for (float& v : out.scores) v *= inv_group;
  }
  for (float& v : out.scores) {
    if (std::isnan(v)) v = -std::numeric_limits<float>::infinity();
  }
  return out;
}

}  // namespace cachemgr::compress
