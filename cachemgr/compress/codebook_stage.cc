#include "cachemgr/compress/codebook_stage.h"

#include <algorithm>
#include <vector>

#include "cachemgr/compress/accounting.h"

namespace cachemgr::compress {
namespace {

// Builds one codebook per part of `vectors` ([parts * per_part, dim]) and concatenates them.
absl::Status BuildParts(const std::vector<float>& vectors, uint32_t dim, uint32_t parts,
                        float theta, const CodebookOptions& options, Codebook* merged,
                        std::vector<uint32_t>* offsets) {
  const size_t total = vectors.size() / dim;
  const size_t per_part = total / parts;
  merged->dim = dim;
  merged->entries.clear();
  merged->refs.clear();
  merged->magnitudes.clear();
  merged->refs.reserve(total);
  merged->magnitudes.reserve(total);
  offsets->assign(1, 0);
  for (uint32_t p = 0; p < parts; ++p) {
    absl::Span<const float> part(vectors.data() + p * per_part * dim, per_part * dim);
    absl::StatusOr<Codebook> built = BuildCodebook(part, dim, theta, options);
    if (!built.ok()) return built.status();
    const uint32_t base = merged->size();
    merged->entries.insert(merged->entries.end(), built->entries.begin(), built->entries.end());
    for (uint32_t ref : built->refs) merged->refs.push_back(base + ref);
    merged->magnitudes.insert(merged->magnitudes.end(), built->magnitudes.begin(),
                              built->magnitudes.end());
    offsets->push_back(merged->size());
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status BuildLayerCodebooks(const ModelShape& shape, const PolicyConfig& policy,
                                 const LayerInput& layer, const RopeParams& rope,
                                 const RopeAngles& angles, const SimilarityGraphBuilder* graph,
                                 CodebookScratch* scratch, LayerResult* result) {
  result->key_codebook.reset();
  result->value_codebook.reset();
  result->key_entry_offsets.clear();
  result->value_entry_offsets.clear();
  const uint32_t heads = shape.num_kv_heads;
  const uint32_t per_head = result->kept_per_head;
  const uint32_t dim = shape.head_dim;
  if (heads == 0 || per_head == 0) return absl::OkStatus();

  const size_t num_vectors = static_cast<size_t>(heads) * per_head;
  std::vector<float> keys(num_vectors * dim);
  std::vector<float> values(num_vectors * dim);
  for (uint32_t head = 0; head < heads; ++head) {
    for (uint32_t i = 0; i < per_head; ++i) {
      const size_t row = static_cast<size_t>(head) * per_head + i;
      const size_t src = (static_cast<size_t>(result->kept[row]) * heads + head) * dim;
      std::copy_n(layer.keys + src, dim, keys.data() + row * dim);
      std::copy_n(layer.values + src, dim, values.data() + row * dim);
    }
  }
  // The kept token ids are exactly the angle rows of the vectors, in order.
  RotateRows(rope, angles, result->kept, /*heads=*/1, absl::MakeSpan(keys), /*inverse=*/true);

  const uint32_t parts = policy.codebook_scope == CodebookScope::kKvHead ? heads : 1;
  CodebookOptions options;
  options.search = policy.codebook_search;
  options.graph = graph;
  options.scratch = scratch;
  Codebook key_codebook;
  Codebook value_codebook;
  std::vector<uint32_t> key_offsets;
  std::vector<uint32_t> value_offsets;
  if (absl::Status s =
          BuildParts(keys, dim, parts, policy.theta_k, options, &key_codebook, &key_offsets);
      !s.ok()) {
    return s;
  }
  keys = {};  // release before the V build
  if (absl::Status s =
          BuildParts(values, dim, parts, policy.theta_v, options, &value_codebook, &value_offsets);
      !s.ok()) {
    return s;
  }
  result->key_codebook = std::move(key_codebook);
  result->value_codebook = std::move(value_codebook);
  result->key_entry_offsets = std::move(key_offsets);
  result->value_entry_offsets = std::move(value_offsets);
  if (policy.codebook_only_if_smaller &&
      LayerBytes(shape, *result) >= PlainLayerBytes(shape, per_head)) {
    result->key_codebook.reset();
    result->value_codebook.reset();
    result->key_entry_offsets.clear();
    result->value_entry_offsets.clear();
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::compress
