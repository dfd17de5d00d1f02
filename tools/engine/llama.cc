#include "tools/engine/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/ops.h"

namespace cachemgr::engine {

LlamaEngine::LlamaEngine(const Checkpoint& checkpoint, SidecarCache* cache, ThreadPool* pool)
    : config_(checkpoint.config), weights_(checkpoint.weights), cache_(cache), pool_(pool) {}

absl::StatusOr<ForwardResult> LlamaEngine::Forward(const std::string& seq,
                                                   absl::Span<const uint32_t> tokens,
                                                   const ForwardOptions& options) {
  const size_t n = tokens.size();
  if (n == 0) return absl::InvalidArgumentError("tokens must not be empty");
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens[", i, "] = ", tokens[i], " >= vocab_size ", config_.vocab_size));
    }
  }
  if (options.window_queries > n) {
    return absl::InvalidArgumentError(absl::StrCat("window_queries ", options.window_queries,
                                                   " exceeds the ", n, " tokens of the call"));
  }
  const uint32_t L = config_.num_layers, H = config_.num_heads, hd = config_.head_dim();
  ForwardResult result;
  if (options.attention_sums) {
    const uint32_t rows0 = cache_->rows(seq, 0);
    for (uint32_t l = 1; l < L; ++l) {
      if (cache_->rows(seq, l) != rows0) {
        return absl::FailedPreconditionError(
            "attention_sums needs every layer to hold the same rows (an uncompressed sequence)");
      }
    }
    result.attention_sums.assign(size_t{L} * H * (rows0 + n), 0.0f);
  }
  result.window_queries.assign(size_t{L} * options.window_queries * H * hd, 0.0f);
  const uint32_t chunk = std::max<uint32_t>(1, options.chunk);
  const uint32_t queries_from = static_cast<uint32_t>(n) - options.window_queries;
  for (size_t begin = 0; begin < n; begin += chunk) {
    const size_t len = std::min<size_t>(chunk, n - begin);
    const bool last = begin + len == n;
    ForwardResult part;
    const LogitsMode mode = options.all_logits ? LogitsMode::kAll
                            : last             ? LogitsMode::kLast
                                               : LogitsMode::kNone;
    const uint32_t chunk_queries_from =
        queries_from > begin ? static_cast<uint32_t>(queries_from - begin) : 0;
    RETURN_IF_ERROR(ForwardChunk(seq, tokens.subspan(begin, len), mode, chunk_queries_from,
                                 options.attention_sums, &part));
    // Window queries of this chunk: its tokens from queries_from on.
    if (options.window_queries > 0 && begin + len > queries_from) {
      const size_t first = std::max<size_t>(begin, queries_from);
      const size_t count = begin + len - first;
      const size_t part_rows = part.window_queries.size() / (size_t{L} * H * hd);
      for (uint32_t l = 0; l < L; ++l) {
        std::memcpy(
            &result.window_queries[((size_t{l} * options.window_queries) + (first - queries_from)) *
                                   H * hd],
            &part.window_queries[(size_t{l} * part_rows) * H * hd], count * H * hd * 4);
      }
    }
    if (options.attention_sums) {
      const size_t rows_total = result.attention_sums.size() / (size_t{L} * H);
      const size_t part_rows = part.attention_sums.size() / (size_t{L} * H);
      for (size_t lh = 0; lh < size_t{L} * H; ++lh) {
        for (size_t j = 0; j < part_rows; ++j) {
          result.attention_sums[lh * rows_total + j] += part.attention_sums[lh * part_rows + j];
        }
      }
    }
    if (options.all_logits) {
      result.logits.insert(result.logits.end(), part.logits.begin(), part.logits.end());
    } else if (last) {
      result.logits = std::move(part.logits);
    }
  }
  // The pool was read through the session's mapping: if the session was lost meanwhile, some
  // reads may have come from the revoked (private) memory, and the result means nothing.
  RETURN_IF_ERROR(cache_->session().status());
  return result;
}

absl::Status LlamaEngine::ForwardChunk(const std::string& seq, absl::Span<const uint32_t> tokens,
                                       LogitsMode logits, uint32_t queries_from,
                                       bool attention_sums, ForwardResult* result) {
  const LlamaConfig& c = config_;
  const size_t T = tokens.size();
  const uint32_t dim = c.dim, H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim();
  const uint32_t group = H / KV, hidden = c.hidden_dim;
  const size_t q_width = size_t{H} * hd, kv_width = size_t{KV} * hd;
  ASSIGN_OR_RETURN(AppendedRows rows, cache_->Append(seq, static_cast<uint32_t>(T)));

  std::vector<float> x(T * dim), xb(T * dim), q(T * q_width), k(T * kv_width), v(T * kv_width),
      att(T * q_width), proj(T * dim), gate(T * hidden), up(T * hidden);
  for (size_t t = 0; t < T; ++t) {
    std::memcpy(&x[t * dim], &weights_.token_embedding[size_t{tokens[t]} * dim], dim * 4);
  }
  const size_t captured = queries_from < T ? T - queries_from : 0;
  result->window_queries.assign(size_t{c.num_layers} * captured * q_width, 0.0f);
  const uint32_t rows_after = rows.first_row[0] + static_cast<uint32_t>(T);
  if (attention_sums) result->attention_sums.assign(size_t{c.num_layers} * H * rows_after, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (uint32_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    for (size_t t = 0; t < T; ++t)
      RmsNorm(&x[t * dim], w.attn_norm.data(), dim, c.rms_eps, &xb[t * dim]);
    MatMul(*pool_, xb.data(), T, dim, w.wq.data(), q_width, q.data());
    MatMul(*pool_, xb.data(), T, dim, w.wk.data(), kv_width, k.data());
    MatMul(*pool_, xb.data(), T, dim, w.wv.data(), kv_width, v.data());
    for (size_t t = 0; t < T; ++t) {
      const uint64_t pos = rows.first_position + t;
      ApplyRope(&q[t * q_width], H, hd, pos, c.rope_theta, c.rope_style);
      ApplyRope(&k[t * kv_width], KV, hd, pos, c.rope_theta, c.rope_style);
    }
    if (captured > 0) {
      std::memcpy(&result->window_queries[size_t{l} * captured * q_width],
                  &q[size_t{queries_from} * q_width], captured * q_width * 4);
    }
    cache_->Write(l, rows.slots[l], k.data(), v.data());
    const uint32_t layer_rows = cache_->Read(seq, l, &rows_k_, &rows_v_);
    const uint32_t first = rows.first_row[l];
    float* sums = attention_sums ? &result->attention_sums[size_t{l} * H * rows_after] : nullptr;
    pool_->ParallelFor(H, [&](size_t h0, size_t h1) {
      std::vector<float> scores(layer_rows);
      for (size_t h = h0; h < h1; ++h) {
        const size_t g = h / group;
        for (size_t t = 0; t < T; ++t) {
          const float* qv = &q[t * q_width + h * hd];
          const uint32_t visible = first + static_cast<uint32_t>(t) + 1;
          for (uint32_t j = 0; j < visible; ++j) {
            scores[j] = Dot(qv, &rows_k_[j * kv_width + g * hd], hd) * scale;
          }
          Softmax(scores.data(), visible);
          float* out = &att[t * q_width + h * hd];
          std::fill(out, out + hd, 0.0f);
          for (uint32_t j = 0; j < visible; ++j) {
            Axpy(scores[j], &rows_v_[j * kv_width + g * hd], out, hd);
          }
          if (sums != nullptr) {
            for (uint32_t j = 0; j < visible; ++j) sums[h * rows_after + j] += scores[j];
          }
        }
      }
    });
    MatMul(*pool_, att.data(), T, q_width, w.wo.data(), dim, proj.data());
    for (size_t i = 0; i < T * dim; ++i) x[i] += proj[i];
    for (size_t t = 0; t < T; ++t)
      RmsNorm(&x[t * dim], w.ffn_norm.data(), dim, c.rms_eps, &xb[t * dim]);
    MatMul(*pool_, xb.data(), T, dim, w.w_gate.data(), hidden, gate.data());
    MatMul(*pool_, xb.data(), T, dim, w.w_up.data(), hidden, up.data());
    SwiGlu(gate.data(), up.data(), T * hidden);
    MatMul(*pool_, gate.data(), T, hidden, w.w_down.data(), dim, proj.data());
    for (size_t i = 0; i < T * dim; ++i) x[i] += proj[i];
  }

  if (logits == LogitsMode::kNone) return absl::OkStatus();
  // Every row when teacher forcing, else the last row only.
  const size_t first_out = logits == LogitsMode::kAll ? 0 : T - 1;
  const size_t out_rows = T - first_out;
  for (size_t t = 0; t < out_rows; ++t) {
    RmsNorm(&x[(first_out + t) * dim], weights_.final_norm.data(), dim, c.rms_eps, &xb[t * dim]);
  }
  result->logits.resize(out_rows * c.vocab_size);
  MatMul(*pool_, xb.data(), out_rows, dim, weights_.classifier().data(), c.vocab_size,
         result->logits.data());
  return absl::OkStatus();
}

}  // namespace cachemgr::engine
