#include "cachemgr/compress/coded_layer.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "cachemgr/compress/accounting.h"
#include "cachemgr/compress/rope.h"
#include "tests/cachemgr/compress/test_sequence.h"

namespace cachemgr::compress {
namespace {

PolicyConfig Spindle(CodebookScope scope, uint32_t batch) {
  PolicyConfig policy = *PresetPolicy("spindlekv");
  policy.window = 8;
  policy.codebook_scope = scope;
  policy.codebook_only_if_smaller = false;
  policy.append_batch = batch;
  return policy;
}

double Cosine(const float* a, const float* b, uint32_t d) {
  double dot = 0, na = 0, nb = 0;
  for (uint32_t i = 0; i < d; ++i) {
    dot += double{a[i]} * b[i];
    na += double{a[i]} * a[i];
    nb += double{b[i]} * b[i];
  }
  return dot / std::sqrt(na * nb);
}

TEST_CASE("a coded layer holds what Compress built: bytes, positions, reconstruction", "[cpu]") {
  const auto scope = GENERATE(CodebookScope::kLayer, CodebookScope::kKvHead);
  const ModelShape shape = Shape(2, 4, 2, 16);
  const Sequence s = MakeSequence(shape, 120, 8, 31, /*clusters=*/5, 0.0f, /*offset=*/7);
  const PolicyConfig policy = Spindle(scope, 4);
  auto result = CompressSequence(shape, policy, s.input, {TargetKind::kReserveRatio, 0.5});
  REQUIRE(result.ok());
  const LayerResult& lr = result->layers[0];
  REQUIRE(lr.key_codebook.has_value());
  auto coded = CodedLayer::FromResult(shape, policy, lr, s.input.positions);
  REQUIRE(coded.ok());
  CHECK(coded->rows() == lr.kept_per_head);
  CHECK(coded->bytes() == lr.bytes_held);
  CHECK(coded->key_entries() == lr.key_codebook->size());
  CHECK(coded->queued() == 0);
  const std::vector<uint32_t> positions = coded->Positions();
  REQUIRE(positions.size() == lr.kept.size());
  for (size_t i = 0; i < positions.size(); ++i) CHECK(positions[i] == lr.kept[i] + 7);

  // MaterializeLayer is head-major [heads, rows, d]; the coded layer token-major.
  std::vector<float> want_k, want_v, k, v;
  REQUIRE(MaterializeLayer(shape, s.input, 0, lr, &want_k, &want_v).ok());
  coded->Reconstruct(&k, &v);
  REQUIRE(k.size() == want_k.size());
  const uint32_t rows = coded->rows(), d = shape.head_dim;
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    for (uint32_t r = 0; r < rows; ++r) {
      for (uint32_t i = 0; i < d; ++i) {
        const size_t head_major = (size_t{h} * rows + r) * d + i;
        const size_t token_major = (size_t{r} * shape.num_kv_heads + h) * d + i;
        CHECK(k[token_major] == Approx(want_k[head_major]).margin(1e-5));
        CHECK(v[token_major] == Approx(want_v[head_major]).margin(1e-5));
      }
    }
  }

  // Not a codebook layer; a result that does not match the shape.
  LayerResult plain = lr;
  plain.key_codebook.reset();
  CHECK(CodedLayer::FromResult(shape, policy, plain, {}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  LayerResult short_kept = lr;
  short_kept.kept.pop_back();
  CHECK(CodedLayer::FromResult(shape, policy, short_kept, {}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("appended rows join similar entries, queue otherwise, and code in batches", "[cpu]") {
  const auto scope = GENERATE(CodebookScope::kLayer, CodebookScope::kKvHead);
  INFO("scope " << static_cast<int>(scope));
  const ModelShape shape = Shape(1, 2, 2, 16);
  const uint32_t d = 16, heads = 2;
  const Sequence s = MakeSequence(shape, 64, 8, 32, /*clusters=*/3);
  const PolicyConfig policy = Spindle(scope, /*batch=*/3);
  auto result = CompressSequence(shape, policy, s.input, {TargetKind::kReserveRatio, 0.5});
  REQUIRE(result.ok());
  auto coded = CodedLayer::FromResult(shape, policy, result->layers[0], s.input.positions);
  REQUIRE(coded.ok());
  const uint32_t rows0 = coded->rows();
  const uint32_t key_entries0 = coded->key_entries();
  const uint64_t bytes0 = coded->bytes();
  const RopeParams rope = RopeParamsFromShape(shape);

  // Row A: token 0's pre-RoPE K/V (a cluster direction) scaled by 3, re-rotated at position 64:
  // matches for K and V. Rows B, C: fresh random directions: queue (1 each per plane and head).
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> keys(3 * heads * d), values(3 * heads * d);
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t i = 0; i < d; ++i) {
      keys[h * d + i] = 3.0f * s.pre_rope_keys[0][h * d + i];
      values[h * d + i] = 3.0f * s.values[0][h * d + i];
    }
  }
  for (size_t i = heads * d; i < keys.size(); ++i) {
    keys[i] = normal(rng);
    values[i] = normal(rng);
  }
  const std::vector<float> pre_rope = keys;
  const std::vector<uint32_t> positions = {64, 65, 66};
  REQUIRE(ApplyRope(rope, positions, heads, absl::MakeSpan(keys)).ok());

  // Two rows first: A matches (2 heads x K and V), B queues (4 vectors); no part reaches 3.
  auto first = coded->Append(absl::MakeConstSpan(keys.data(), 2 * heads * d),
                             absl::MakeConstSpan(values.data(), 2 * heads * d), {64, 65});
  REQUIRE(first.ok());
  CHECK(first->matched == 4);
  CHECK(first->queued == 4);
  CHECK(first->batch_coded == 0);
  CHECK(coded->rows() == rows0 + 2);
  CHECK(coded->queued() == 4);
  CHECK(coded->key_entries() == key_entries0);
  // Matched rows cost a ref and a magnitude, queued ones their raw vector.
  const uint64_t per_coded = 2 + 2, per_queued = d * 2;
  CHECK(coded->bytes() == bytes0 + 4 * per_coded + 4 * per_queued);

  // The flat form a device uploads: entries then queued vectors per part; a queued vector is
  // referenced with magnitude 1 and its K is not rotated (it is stored post-RoPE).
  const CodedRows flat = coded->Flatten();
  const size_t vectors = size_t{coded->rows()} * heads;
  REQUIRE(flat.rows == coded->rows());
  REQUIRE(flat.key_refs.size() == vectors);
  REQUIRE(flat.key_angle_rows.size() == vectors);
  CHECK(flat.key_entries.size() / d == coded->key_entries() + 2);  // B's K, one per head
  CHECK(flat.value_entries.size() / d == coded->value_entries() + 2);
  for (uint32_t h = 0; h < heads; ++h) {
    const size_t b = size_t{rows0 + 1} * heads + h;  // row B of head h
    CHECK(flat.key_magnitudes[b] == 1.0f);
    CHECK(flat.value_magnitudes[b] == 1.0f);
    CHECK(flat.key_angle_rows[b] == CodedRows::kNoRotation);
    const size_t a = size_t{rows0} * heads + h;  // row A: coded, rotated at position 64
    REQUIRE(flat.key_angle_rows[a] != CodedRows::kNoRotation);
    const RopeAngles at64 = ComputeRopeAngles(rope, std::vector<uint32_t>{64});
    for (uint32_t i = 0; i < flat.angles.num_pairs; ++i) {
      CHECK(flat.angles.cos[size_t{flat.key_angle_rows[a]} * flat.angles.num_pairs + i] ==
            at64.cos[i]);
    }
  }

  std::vector<float> k, v;
  coded->Reconstruct(&k, &v);
  for (uint32_t h = 0; h < heads; ++h) {
    const float* ka = &k[(size_t{rows0} * heads + h) * d];
    const float* kb = &k[(size_t{rows0 + 1} * heads + h) * d];
    CHECK(Cosine(ka, &keys[h * d], d) > 0.999);  // the same direction, re-rotated at 64
    for (uint32_t i = 0; i < d; ++i) CHECK(kb[i] == keys[(heads + h) * d + i]);  // verbatim
    const float* va = &v[(size_t{rows0} * heads + h) * d];
    double norm_a = 0, norm_want = 0;
    for (uint32_t i = 0; i < d; ++i) {
      norm_a += double{va[i]} * va[i];
      norm_want += double{values[h * d + i]} * values[h * d + i];
    }
    CHECK(std::sqrt(norm_a) == Approx(std::sqrt(norm_want)).epsilon(1e-5));  // magnitude kept
  }
  const std::vector<uint32_t> pos = coded->Positions();  // [heads, rows]
  for (uint32_t h = 0; h < heads; ++h) {
    CHECK(pos[size_t{h} * coded->rows() + rows0] == 64);
    CHECK(pos[size_t{h} * coded->rows() + rows0 + 1] == 65);
  }

  // Row C: a layer-scope part now holds 2 + 2 >= 3 queued K (and V) vectors -> coded; a
  // per-head part holds 1 + 1 < 3 -> still queued.
  auto second = coded->Append(absl::MakeConstSpan(keys.data() + 2 * heads * d, heads * d),
                              absl::MakeConstSpan(values.data() + 2 * heads * d, heads * d), {66});
  REQUIRE(second.ok());
  CHECK(second->queued == 4);
  if (scope == CodebookScope::kLayer) {
    CHECK(second->batch_coded == 8);
    CHECK(coded->queued() == 0);
    CHECK(coded->key_entries() > key_entries0);
  } else {
    CHECK(second->batch_coded == 0);
    CHECK(coded->queued() == 8);
  }
  coded->Reconstruct(&k, &v);
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t j = 1; j < 3; ++j) {
      const float* got = &k[(size_t{rows0 + j} * heads + h) * d];
      CHECK(Cosine(got, &keys[(j * heads + h) * d], d) > 0.98 - 1e-5);
      const float* got_v = &v[(size_t{rows0 + j} * heads + h) * d];
      CHECK(Cosine(got_v, &values[(j * heads + h) * d], d) > 0.95 - 1e-5);
    }
  }
  (void)pre_rope;
}

TEST_CASE("bad appends change nothing", "[cpu]") {
  const ModelShape shape = Shape(1, 2, 2, 16);
  const Sequence s = MakeSequence(shape, 40, 8, 33, 3);
  const PolicyConfig policy = Spindle(CodebookScope::kLayer, 2);
  auto result = CompressSequence(shape, policy, s.input, {TargetKind::kReserveRatio, 0.6});
  REQUIRE(result.ok());
  auto coded = CodedLayer::FromResult(shape, policy, result->layers[0], {});
  REQUIRE(coded.ok());
  const uint32_t rows = coded->rows();
  const uint64_t bytes = coded->bytes();
  std::vector<float> row(2 * 16, 1.0f);
  CHECK(coded->Append(row, row, {1, 2}).status().code() == absl::StatusCode::kInvalidArgument);
  std::vector<float> bad = row;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  auto nan = coded->Append(bad, row, {40});
  CHECK(nan.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(coded->rows() == rows);
  CHECK(coded->bytes() == bytes);
  REQUIRE(coded->Append(row, row, {40}).ok());
  CHECK(coded->rows() == rows + 1);
}

}  // namespace
}  // namespace cachemgr::compress

namespace cachemgr::compress {
namespace {

// A coded layer with coded rows, matched appends and queued vectors, of `stored` floats.
CodedLayer QueuedLayer(CodebookScope scope, StoredFloat stored) {
  ModelShape shape = Shape(1, 2, 2, 16);
  shape.stored_float = stored;
  const Sequence s = MakeSequence(shape, 64, 8, 32, /*clusters=*/3);
  const PolicyConfig policy = Spindle(scope, /*batch=*/100);
  auto result = CompressSequence(shape, policy, s.input, {TargetKind::kReserveRatio, 0.5});
  REQUIRE(result.ok());
  auto coded = CodedLayer::FromResult(shape, policy, result->layers[0], s.input.positions);
  REQUIRE(coded.ok());
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::vector<float> keys(5 * 2 * 16), values(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    keys[i] = normal(rng);
    values[i] = normal(rng);
  }
  for (uint32_t i = 0; i < 32; ++i) values[i] = 2.0f * s.values[0][i];  // row 64's V matches
  if (stored != StoredFloat::kFloat32) {  // the engine stores rows in the pool's dtype
    for (float& x : keys) x = RoundToStored(x, stored);
    for (float& x : values) x = RoundToStored(x, stored);
  }
  REQUIRE(coded->Append(keys, values, {64, 65, 66, 67, 68}).ok());
  REQUIRE(coded->queued() > 0);
  return *std::move(coded);
}

TEST_CASE("a coded layer's image rebuilds the same layer", "[cpu]") {
  const auto scope = GENERATE(CodebookScope::kLayer, CodebookScope::kKvHead);
  const auto stored = GENERATE(StoredFloat::kFloat32, StoredFloat::kBf16, StoredFloat::kFp16);
  const CodedLayer layer = QueuedLayer(scope, stored);
  ModelShape shape = Shape(1, 2, 2, 16);
  shape.stored_float = stored;
  const CodedLayerImage image = layer.ToImage();
  // Everything it holds is stored exactly by the dtype.
  for (const auto* plane : {&image.key, &image.value}) {
    for (const auto& part : plane->entries) {
      for (float x : part) CHECK(RoundToStored(x, stored) == x);
    }
    for (float x : plane->magnitudes) CHECK(RoundToStored(x, stored) == x);
  }
  auto rebuilt = CodedLayer::FromImage(shape, image);
  REQUIRE(rebuilt.ok());
  CHECK(rebuilt->rows() == layer.rows());
  CHECK(rebuilt->bytes() == layer.bytes());
  CHECK(rebuilt->queued() == layer.queued());
  CHECK(rebuilt->Positions() == layer.Positions());
  std::vector<float> k0, v0, k1, v1;
  layer.Reconstruct(&k0, &v0);
  rebuilt->Reconstruct(&k1, &v1);
  CHECK(k0 == k1);
  CHECK(v0 == v1);
  // And it goes on the same way: the same append codes the same (the queues fill a batch).
  CodedLayer a = layer;
  std::vector<float> more(2 * 2 * 16, 0.5f);
  auto sa = a.Append(more, more, {70, 71});
  auto sb = rebuilt->Append(more, more, {70, 71});
  REQUIRE(sa.ok());
  REQUIRE(sb.ok());
  CHECK(sa->matched == sb->matched);
  CHECK(a.ToImage().key.codes == rebuilt->ToImage().key.codes);
}

TEST_CASE("FromImage refuses an image that does not describe a layer", "[cpu]") {
  const CodedLayer layer = QueuedLayer(CodebookScope::kLayer, StoredFloat::kBf16);
  ModelShape shape = Shape(1, 2, 2, 16);
  shape.stored_float = StoredFloat::kBf16;
  const CodedLayerImage good = layer.ToImage();
  REQUIRE(CodedLayer::FromImage(shape, good).ok());
  auto refused = [&](const std::function<void(CodedLayerImage&)>& spoil, const char* words) {
    CodedLayerImage image = good;
    spoil(image);
    auto r = CodedLayer::FromImage(shape, image);
    INFO(words << ": " << r.status());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(r.status().message(), words));
  };
  refused([](CodedLayerImage& i) { i.num_parts = 3; }, "num_parts");
  refused([](CodedLayerImage& i) { i.append_batch = 0; }, "append_batch");
  refused([](CodedLayerImage& i) { i.positions.pop_back(); }, "positions");
  refused([](CodedLayerImage& i) { i.key.theta = 1.5f; }, "theta");
  refused([](CodedLayerImage& i) { i.value.codes.pop_back(); }, "codes");
  refused([](CodedLayerImage& i) { i.key.entries[0].pop_back(); }, "whole vectors");
  refused([](CodedLayerImage& i) { i.key.entries[0][0] = 0.1f; }, "store exactly");  // not bf16
  refused([](CodedLayerImage& i) { i.value.magnitudes[0] = std::nanf(""); }, "magnitude");
  refused(
      [](CodedLayerImage& i) {
        for (uint32_t& c : i.key.codes) {
          if (!(c & CodedLayerImage::kQueuedBit)) c = 1u << 20;  // past every entry
        }
      },
      "refers to entry");
  refused(
      [](CodedLayerImage& i) {
        for (uint32_t& c : i.value.codes) {
          if (c & CodedLayerImage::kQueuedBit) c += 1;  // queue indices shifted
        }
      },
      "queue index");
  refused([](CodedLayerImage& i) { i.key.queues[0].resize(i.key.queues[0].size() + 16); },
          "rows refer to them");
}

}  // namespace
}  // namespace cachemgr::compress
