#include "cachemgr/compress/accounting.h"

#include <algorithm>
#include <vector>

namespace cachemgr::compress {
namespace {

// Part boundaries of one codebook: the stored offsets, or the whole codebook as one part.
std::vector<uint32_t> PartOffsets(const Codebook& codebook, const std::vector<uint32_t>& offsets) {
  if (offsets.size() >= 2) return offsets;
  return {0, codebook.size()};
}

uint64_t CodebookBytes(const ModelShape& shape, const Codebook& codebook,
                       const std::vector<uint32_t>& stored_offsets, uint64_t total_vectors) {
  const std::vector<uint32_t> offsets = PartOffsets(codebook, stored_offsets);
  const uint64_t parts = offsets.size() - 1;
  const uint64_t vectors_per_part = total_vectors / parts;
  uint64_t bytes = 0;
  for (size_t p = 0; p + 1 < offsets.size(); ++p) {
    bytes += CodebookPartBytes(offsets[p + 1] - offsets[p], vectors_per_part, shape.head_dim,
                               shape.elem_bytes);
  }
  return bytes;
}

uint32_t LargestPart(const Codebook& codebook, const std::vector<uint32_t>& stored_offsets) {
  const std::vector<uint32_t> offsets = PartOffsets(codebook, stored_offsets);
  uint32_t largest = 0;
  for (size_t p = 0; p + 1 < offsets.size(); ++p) {
    largest = std::max(largest, offsets[p + 1] - offsets[p]);
  }
  return largest;
}

}  // namespace

uint64_t FullKvBytes(const ModelShape& shape, uint32_t num_tokens) {
  return static_cast<uint64_t>(shape.num_layers) * num_tokens * shape.num_kv_heads *
         shape.head_dim * 2 * shape.elem_bytes;
}

uint64_t PlainLayerBytes(const ModelShape& shape, uint32_t kept_per_head) {
  return static_cast<uint64_t>(shape.num_kv_heads) * kept_per_head * shape.head_dim * 2 *
         shape.elem_bytes;
}

uint32_t CodebookRefBytes(uint32_t num_entries) { return num_entries < 65536 ? 2 : 4; }

uint64_t CodebookPartBytes(uint32_t num_entries, uint64_t num_vectors, uint32_t head_dim,
                           uint32_t elem_bytes) {
  return static_cast<uint64_t>(num_entries) * head_dim * elem_bytes +
         num_vectors * (CodebookRefBytes(num_entries) + elem_bytes);
}

uint64_t LayerBytes(const ModelShape& shape, const LayerResult& layer) {
  if (!layer.key_codebook.has_value() || !layer.value_codebook.has_value()) {
    return PlainLayerBytes(shape, layer.kept_per_head);
  }
  const uint64_t vectors = static_cast<uint64_t>(shape.num_kv_heads) * layer.kept_per_head;
  return CodebookBytes(shape, *layer.key_codebook, layer.key_entry_offsets, vectors) +
         CodebookBytes(shape, *layer.value_codebook, layer.value_entry_offsets, vectors);
}

double LayerEq15Ratio(const ModelShape& shape, const LayerResult& layer, uint32_t num_tokens) {
  if (num_tokens == 0) return 1.0;
  const double r1 = static_cast<double>(layer.kept_per_head) / num_tokens;
  if (!layer.key_codebook.has_value() || !layer.value_codebook.has_value()) return r1;
  const double vectors = static_cast<double>(shape.num_kv_heads) * layer.kept_per_head * 2.0;
  if (vectors == 0.0) return r1;
  const double r2 =
      static_cast<double>(layer.key_codebook->size() + layer.value_codebook->size()) / vectors;
  const uint32_t largest = std::max(LargestPart(*layer.key_codebook, layer.key_entry_offsets),
                                    LargestPart(*layer.value_codebook, layer.value_entry_offsets));
  const double index_bits = 8.0 * CodebookRefBytes(largest);
  const double elem_bits = 8.0 * shape.elem_bytes;
  const double d = shape.head_dim;
  const double r3 = (d + (index_bits + elem_bits) / elem_bits) / d;
  return r1 * r2 * r3;
}

}  // namespace cachemgr::compress
