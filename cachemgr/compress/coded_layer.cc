#include "cachemgr/compress/coded_layer.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/accounting.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/compress/validation.h"
#include "cachemgr/kernels/elem_convert.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr::compress {

float RoundToStored(float x, StoredFloat stored) {
  switch (stored) {
    case StoredFloat::kFloat32:
      break;
    case StoredFloat::kFp16:
      return kernels::F16ToF32(kernels::F32ToF16(x));
    case StoredFloat::kBf16:
      return kernels::Bf16ToF32(kernels::F32ToBf16(x));
  }
  return x;
}

namespace {

void RoundAll(std::vector<float>& values, StoredFloat stored) {
  if (stored == StoredFloat::kFloat32) return;
  for (float& x : values) x = RoundToStored(x, stored);
}

// Part boundaries of a result codebook: its offsets, or one part over every entry.
std::vector<uint32_t> Offsets(const Codebook& codebook, const std::vector<uint32_t>& stored) {
  if (stored.size() >= 2) return stored;
  return {0, codebook.size()};
}

}  // namespace

absl::StatusOr<CodedLayer> CodedLayer::FromResult(const ModelShape& shape,
                                                  const PolicyConfig& policy,
                                                  const LayerResult& result,
                                                  absl::Span<const uint32_t> positions) {
  if (!result.key_codebook.has_value() || !result.value_codebook.has_value()) {
    return absl::InvalidArgumentError("result holds no codebooks: not a codebook layer");
  }
  RETURN_IF_ERROR(ValidateShape(shape));
  const uint32_t heads = shape.num_kv_heads;
  const uint32_t rows = result.kept_per_head;
  const uint32_t dim = shape.head_dim;
  const size_t vectors = size_t{heads} * rows;
  if (heads == 0 || dim == 0 || result.kept.size() != vectors) {
    return absl::InvalidArgumentError(
        absl::StrCat("result.kept has ", result.kept.size(),
                     " entries, expected num_kv_heads * kept = ", vectors));
  }
  CodedLayer layer;
  layer.shape_ = shape;
  layer.rope_ = RopeParamsFromShape(shape);
  layer.append_batch_ = std::max<uint32_t>(1, policy.append_batch);
  layer.key_.theta = policy.theta_k;
  layer.value_.theta = policy.theta_v;
  layer.positions_.assign(heads, std::vector<uint32_t>(rows));
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t r = 0; r < rows; ++r) {
      const uint32_t token = result.kept[size_t{h} * rows + r];
      if (!positions.empty() && token >= positions.size()) {
        return absl::InvalidArgumentError(absl::StrCat("result.kept holds token ", token,
                                                       " but positions has ", positions.size()));
      }
      layer.positions_[h][r] = positions.empty() ? token : positions[token];
    }
  }
  const std::vector<uint32_t> key_offsets = Offsets(*result.key_codebook, result.key_entry_offsets);
  const std::vector<uint32_t> value_offsets =
      Offsets(*result.value_codebook, result.value_entry_offsets);
  const uint32_t parts = static_cast<uint32_t>(key_offsets.size() - 1);
  if (value_offsets.size() != key_offsets.size() || (parts != 1 && parts != heads)) {
    return absl::InvalidArgumentError(
        absl::StrCat("result codebooks have ", parts, " key and ", value_offsets.size() - 1,
                     " value parts; expected 1 or num_kv_heads (", heads, ") of each"));
  }
  layer.num_parts_ = parts;
  for (auto [plane, codebook, offsets] :
       {std::tuple{&layer.key_, &*result.key_codebook, &key_offsets},
        std::tuple{&layer.value_, &*result.value_codebook, &value_offsets}}) {
    if (codebook->dim != dim || codebook->refs.size() != vectors ||
        codebook->magnitudes.size() != vectors || offsets->back() != codebook->size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("result codebook does not match the layer (dim ", codebook->dim, ", ",
                       codebook->refs.size(), " refs, ", codebook->magnitudes.size(),
                       " magnitudes; expected dim ", dim, " and ", vectors, ")"));
    }
    plane->parts.resize(parts);
    for (uint32_t p = 0; p < parts; ++p) {
      const uint32_t begin = (*offsets)[p], end = (*offsets)[p + 1];
      if (begin > end) return absl::InvalidArgumentError("result codebook offsets decrease");
      plane->parts[p].entries.assign(codebook->entries.begin() + size_t{begin} * dim,
                                     codebook->entries.begin() + size_t{end} * dim);
      RoundAll(plane->parts[p].entries, shape.stored_float);
    }
    plane->code.assign(heads, std::vector<uint32_t>(rows));
    plane->magnitude.assign(heads, std::vector<float>(rows));
    for (uint32_t h = 0; h < heads; ++h) {
      const uint32_t p = layer.PartOf(h);
      for (uint32_t r = 0; r < rows; ++r) {
        const size_t v = size_t{h} * rows + r;
        const uint32_t ref = codebook->refs[v];
        if (ref < (*offsets)[p] || ref >= (*offsets)[p + 1]) {
          return absl::InvalidArgumentError(
              absl::StrCat("result codebook ref ", ref, " of KV head ", h, " is outside its part [",
                           (*offsets)[p], ", ", (*offsets)[p + 1], ")"));
        }
        plane->code[h][r] = ref - (*offsets)[p];
        plane->magnitude[h][r] = RoundToStored(codebook->magnitudes[v], shape.stored_float);
      }
    }
  }
  return layer;
}

uint32_t CodedLayer::PartOf(uint32_t head) const {
  return static_cast<uint32_t>(uint64_t{head} * num_parts_ / num_kv_heads());
}

uint32_t CodedLayer::NumEntries(const Plane& plane) const {
  size_t entries = 0;
  for (const Plane::Part& part : plane.parts) entries += part.entries.size() / shape_.head_dim;
  return static_cast<uint32_t>(entries);
}

uint32_t CodedLayer::NumQueued(const Plane& plane) {
  size_t queued = 0;
  for (const Plane::Part& part : plane.parts) queued += part.queue_rows.size();
  return static_cast<uint32_t>(queued);
}

std::vector<uint32_t> CodedLayer::Positions() const {
  std::vector<uint32_t> out;
  out.reserve(size_t{num_kv_heads()} * rows());
  for (const auto& head : positions_) out.insert(out.end(), head.begin(), head.end());
  return out;
}

uint64_t CodedLayer::PlaneBytes(const Plane& plane) const {
  const uint32_t dim = shape_.head_dim;
  const uint64_t heads_per_part = num_kv_heads() / num_parts_;
  uint64_t bytes = 0;
  for (const Plane::Part& part : plane.parts) {
    const uint32_t entries = static_cast<uint32_t>(part.entries.size() / dim);
    const uint64_t queued = part.queue_rows.size();
    const uint64_t coded = heads_per_part * rows() - queued;
    bytes += CodebookPartBytes(entries, coded, dim, shape_.elem_bytes) +
             queued * dim * shape_.elem_bytes;
  }
  return bytes;
}

uint64_t CodedLayer::bytes() const { return PlaneBytes(key_) + PlaneBytes(value_); }

void CodedLayer::CodeRow(Plane& plane, uint32_t head, uint32_t row, const float* unit,
                         float magnitude, const float* raw, AppendStats& stats) {
  const uint32_t dim = shape_.head_dim;
  Plane::Part& part = plane.parts[PartOf(head)];
  const int64_t match = MatchEntry(part.entries, dim, unit, plane.theta);
  if (match >= 0) {
    plane.code[head].push_back(static_cast<uint32_t>(match));
    plane.magnitude[head].push_back(RoundToStored(magnitude, shape_.stored_float));
    ++stats.matched;
    return;
  }
  plane.code[head].push_back(Plane::kQueuedBit | static_cast<uint32_t>(part.queue_rows.size()));
  plane.magnitude[head].push_back(0.0f);
  for (uint32_t k = 0; k < dim; ++k) {
    part.queue.push_back(RoundToStored(raw[k], shape_.stored_float));
  }
  part.queue_rows.emplace_back(head, row);
  ++stats.queued;
}

absl::Status CodedLayer::CodeQueue(Plane& plane, uint32_t part_index, bool is_key,
                                   AppendStats& stats) {
  const uint32_t dim = shape_.head_dim;
  Plane::Part& part = plane.parts[part_index];
  std::vector<float> vectors = part.queue;
  if (is_key) {  // queued K is post-RoPE; the codebook is built on pre-RoPE K
    std::vector<uint32_t> positions;
    positions.reserve(part.queue_rows.size());
    for (const auto& [head, row] : part.queue_rows) positions.push_back(positions_[head][row]);
    if (absl::Status s = UnapplyRope(rope_, positions, 1, absl::MakeSpan(vectors)); !s.ok()) {
      return s;
    }
  }
  absl::StatusOr<Codebook> batch = BuildCodebook(vectors, dim, plane.theta);
  if (!batch.ok()) return batch.status();
  const uint32_t base = static_cast<uint32_t>(part.entries.size() / dim);
  RoundAll(batch->entries, shape_.stored_float);
  part.entries.insert(part.entries.end(), batch->entries.begin(), batch->entries.end());
  for (size_t j = 0; j < part.queue_rows.size(); ++j) {
    const auto [head, row] = part.queue_rows[j];
    plane.code[head][row] = base + batch->refs[j];
    plane.magnitude[head][row] = RoundToStored(batch->magnitudes[j], shape_.stored_float);
  }
  stats.batch_coded += static_cast<uint32_t>(part.queue_rows.size());
  stats.new_entries += batch->size();
  part.queue.clear();
  part.queue_rows.clear();
  return absl::OkStatus();
}

absl::StatusOr<AppendStats> CodedLayer::Append(absl::Span<const float> keys,
                                               absl::Span<const float> values,
                                               absl::Span<const uint32_t> positions) {
  const uint32_t heads = num_kv_heads();
  const uint32_t dim = shape_.head_dim;
  const size_t count = positions.size();
  const size_t want = count * heads * dim;
  if (keys.size() != want || values.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("append of ", count, " rows needs ", want,
                                                   " key and value floats (got ", keys.size(),
                                                   " and ", values.size(), ")"));
  }
  for (absl::Span<const float> x : {keys, values}) {
    for (size_t i = 0; i < x.size(); ++i) {
      if (!std::isfinite(x[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("appended row ", i / (size_t{heads} * dim), " has a non-finite element"));
      }
    }
  }
  std::vector<float> pre_rope(keys.begin(), keys.end());
  if (absl::Status s = UnapplyRope(rope_, positions, heads, absl::MakeSpan(pre_rope)); !s.ok()) {
    return s;
  }
  AppendStats stats;
  std::vector<float> unit(dim);
  for (size_t i = 0; i < count; ++i) {
    for (uint32_t h = 0; h < heads; ++h) {
      const uint32_t row = static_cast<uint32_t>(positions_[h].size());
      positions_[h].push_back(positions[i]);
      const size_t at = (i * heads + h) * dim;
      float magnitude = 0.0f;
      NormalizeVector(&pre_rope[at], dim, unit.data(), &magnitude);  // finite: checked above
      CodeRow(key_, h, row, unit.data(), magnitude, &keys[at], stats);
      NormalizeVector(&values[at], dim, unit.data(), &magnitude);
      CodeRow(value_, h, row, unit.data(), magnitude, &values[at], stats);
    }
  }
  for (uint32_t p = 0; p < num_parts_; ++p) {
    for (Plane* plane : {&key_, &value_}) {
      if (plane->parts[p].queue_rows.size() >= append_batch_) {
        if (absl::Status s = CodeQueue(*plane, p, plane == &key_, stats); !s.ok()) return s;
      }
    }
  }
  return stats;
}

void ReconstructCodedRows(const CodedRows& coded, std::vector<float>* keys,
                          std::vector<float>* values) {
  const size_t vectors = size_t{coded.rows} * coded.num_kv_heads;
  const uint32_t dim = coded.head_dim;
  for (auto [entries, refs, magnitudes, out] :
       {std::tuple{&coded.key_entries, &coded.key_refs, &coded.key_magnitudes, keys},
        std::tuple{&coded.value_entries, &coded.value_refs, &coded.value_magnitudes, values}}) {
    out->resize(vectors * dim);
    for (size_t v = 0; v < vectors; ++v) {
      const float* entry = entries->data() + size_t{(*refs)[v]} * dim;
      const float m = (*magnitudes)[v];
      float* dst = out->data() + v * dim;
      for (uint32_t k = 0; k < dim; ++k) dst[k] = entry[k] * m;
    }
  }
  RotateRows(coded.rope, coded.angles, coded.key_angle_rows, /*heads=*/1, absl::MakeSpan(*keys),
             /*inverse=*/false);
}

void CodedLayer::Reconstruct(std::vector<float>* keys, std::vector<float>* values) const {
  ReconstructCodedRows(Flatten(), keys, values);
}

CodedRows CodedLayer::Flatten() const {
  CodedRows out;
  const uint32_t heads = num_kv_heads();
  out.rows = rows();
  out.num_kv_heads = heads;
  out.head_dim = shape_.head_dim;
  out.rope = rope_;
  const size_t vectors = size_t{out.rows} * heads;
  const uint32_t dim = shape_.head_dim;
  for (auto [plane, entries, refs, magnitudes] :
       {std::tuple{&key_, &out.key_entries, &out.key_refs, &out.key_magnitudes},
        std::tuple{&value_, &out.value_entries, &out.value_refs, &out.value_magnitudes}}) {
    // Per part: where its entries and its queue start in the concatenation.
    std::vector<uint32_t> entry_base, queue_base;
    for (const Plane::Part& part : plane->parts) {
      entry_base.push_back(static_cast<uint32_t>(entries->size() / dim));
      entries->insert(entries->end(), part.entries.begin(), part.entries.end());
      queue_base.push_back(static_cast<uint32_t>(entries->size() / dim));
      entries->insert(entries->end(), part.queue.begin(), part.queue.end());
    }
    refs->resize(vectors);
    magnitudes->resize(vectors);
    for (uint32_t r = 0; r < out.rows; ++r) {
      for (uint32_t h = 0; h < heads; ++h) {
        const size_t v = size_t{r} * heads + h;
        const uint32_t p = PartOf(h);
        const uint32_t code = plane->code[h][r];
        const bool queued = (code & Plane::kQueuedBit) != 0;
        (*refs)[v] = queued ? queue_base[p] + (code & ~Plane::kQueuedBit) : entry_base[p] + code;
        (*magnitudes)[v] = queued ? 1.0f : plane->magnitude[h][r];
      }
    }
  }
  // Angle rows: one per distinct position of a coded K vector.
  std::vector<uint32_t> positions;
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t r = 0; r < out.rows; ++r) {
      if (!(key_.code[h][r] & Plane::kQueuedBit)) positions.push_back(positions_[h][r]);
    }
  }
  std::sort(positions.begin(), positions.end());
  positions.erase(std::unique(positions.begin(), positions.end()), positions.end());
  out.key_angle_rows.assign(vectors, CodedRows::kNoRotation);
  for (uint32_t r = 0; r < out.rows; ++r) {
    for (uint32_t h = 0; h < heads; ++h) {
      if (key_.code[h][r] & Plane::kQueuedBit) continue;
      out.key_angle_rows[size_t{r} * heads + h] = static_cast<uint32_t>(
          std::lower_bound(positions.begin(), positions.end(), positions_[h][r]) -
          positions.begin());
    }
  }
  out.angles = ComputeRopeAngles(rope_, positions);
  return out;
}

CodedLayerImage CodedLayer::ToImage() const {
  CodedLayerImage image;
  image.num_parts = num_parts_;
  image.append_batch = append_batch_;
  image.positions = Positions();
  for (auto [plane, out] : {std::pair{&key_, &image.key}, std::pair{&value_, &image.value}}) {
    out->theta = plane->theta;
    for (const Plane::Part& part : plane->parts) {
      out->entries.push_back(part.entries);
      out->queues.push_back(part.queue);
    }
    for (uint32_t h = 0; h < num_kv_heads(); ++h) {
      out->codes.insert(out->codes.end(), plane->code[h].begin(), plane->code[h].end());
      out->magnitudes.insert(out->magnitudes.end(), plane->magnitude[h].begin(),
                             plane->magnitude[h].end());
    }
  }
  return image;
}

absl::StatusOr<CodedLayer> CodedLayer::FromImage(const ModelShape& shape, CodedLayerImage image) {
  RETURN_IF_ERROR(ValidateShape(shape));
  const uint32_t heads = shape.num_kv_heads;
  const uint32_t dim = shape.head_dim;
  if (image.num_parts != 1 && image.num_parts != heads) {
    return absl::InvalidArgumentError(absl::StrCat("coded.num_parts must be 1 or num_kv_heads (",
                                                   heads, "), got ", image.num_parts));
  }
  if (image.append_batch == 0) {
    return absl::InvalidArgumentError("coded.append_batch must be at least 1");
  }
  if (image.positions.size() % heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("coded.positions holds ", image.positions.size(),
                                                   " positions, not a multiple of ", heads));
  }
  const uint32_t rows = static_cast<uint32_t>(image.positions.size() / heads);
  CodedLayer layer;
  layer.shape_ = shape;
  layer.rope_ = RopeParamsFromShape(shape);
  layer.num_parts_ = image.num_parts;
  layer.append_batch_ = image.append_batch;
  layer.positions_.assign(heads, {});
  for (uint32_t h = 0; h < heads; ++h) {
    layer.positions_[h].assign(image.positions.begin() + size_t{h} * rows,
                               image.positions.begin() + size_t{h + 1} * rows);
  }
  auto stored_exactly = [&](const std::vector<float>& values) {
    for (float x : values) {
      if (!std::isfinite(x) || RoundToStored(x, shape.stored_float) != x) return false;
    }
    return true;
  };
  for (auto [in, plane, name] : {std::tuple{&image.key, &layer.key_, "coded.key"},
                                 std::tuple{&image.value, &layer.value_, "coded.value"}}) {
    const std::string where = name;  // lambdas may not capture structured bindings (clang 14)
    auto bad = [&where](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
    };
    if (!(in->theta > 0.0f && in->theta <= 1.0f)) return bad("theta must be in (0, 1]");
    plane->theta = in->theta;
    if (in->entries.size() != image.num_parts || in->queues.size() != image.num_parts) {
      return bad(absl::StrCat("entries and queues must hold ", image.num_parts, " parts"));
    }
    if (in->codes.size() != size_t{heads} * rows || in->magnitudes.size() != in->codes.size()) {
      return bad(absl::StrCat("codes and magnitudes must hold ", heads, " x ", rows, " rows"));
    }
    plane->parts.resize(image.num_parts);
    for (uint32_t p = 0; p < image.num_parts; ++p) {
      Plane::Part& part = plane->parts[p];
      if (in->entries[p].size() % dim != 0 || in->queues[p].size() % dim != 0) {
        return bad(absl::StrCat("part ", p, "'s entries or queue are not whole vectors of ", dim));
      }
      if (!stored_exactly(in->entries[p]) || !stored_exactly(in->queues[p])) {
        return bad(absl::StrCat("part ", p, " holds a value its dtype does not store exactly"));
      }
      part.entries = std::move(in->entries[p]);
      part.queue = std::move(in->queues[p]);
      part.queue_rows.resize(part.queue.size() / dim);
    }
    if (!stored_exactly(in->magnitudes)) {
      return bad("a magnitude is not finite or not stored exactly by the dtype");
    }
    plane->code.assign(heads, {});
    plane->magnitude.assign(heads, {});
    std::vector<uint32_t> next_queued(image.num_parts, 0);
    // Queues are ordered by (row, head): walk rows outermost to check each index.
    for (uint32_t r = 0; r < rows; ++r) {
      for (uint32_t h = 0; h < heads; ++h) {
        const size_t v = size_t{h} * rows + r;
        const uint32_t code = in->codes[v];
        const uint32_t p = layer.PartOf(h);
        Plane::Part& part = plane->parts[p];
        if (code & Plane::kQueuedBit) {
          const uint32_t q = code & ~Plane::kQueuedBit;
          if (q != next_queued[p] || q >= part.queue_rows.size()) {
            return bad(absl::StrCat("row ", r, " of KV head ", h, " has queue index ", q,
                                    "; the next queued vector of part ", p, " is ", next_queued[p],
                                    " of ", part.queue_rows.size()));
          }
          part.queue_rows[q] = {h, r};
          ++next_queued[p];
        } else if (code >= part.entries.size() / dim) {
          return bad(absl::StrCat("row ", r, " of KV head ", h, " refers to entry ", code, " of ",
                                  part.entries.size() / dim));
        }
      }
    }
    for (uint32_t p = 0; p < image.num_parts; ++p) {
      if (next_queued[p] != plane->parts[p].queue_rows.size()) {
        return bad(absl::StrCat("part ", p, " queues ", plane->parts[p].queue_rows.size(),
                                " vectors but ", next_queued[p], " rows refer to them"));
      }
    }
    for (uint32_t h = 0; h < heads; ++h) {
      plane->code[h].assign(in->codes.begin() + size_t{h} * rows,
                            in->codes.begin() + size_t{h + 1} * rows);
      plane->magnitude[h].assign(in->magnitudes.begin() + size_t{h} * rows,
                                 in->magnitudes.begin() + size_t{h + 1} * rows);
    }
  }
  return layer;
}

}  // namespace cachemgr::compress
