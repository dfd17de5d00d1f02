#include "cachemgr/service/coded_layer_wire.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/accounting.h"
#include "cachemgr/kernels/elem_convert.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace cachemgr {
namespace {

constexpr uint32_t kQueuedBit = compress::CodedLayerImage::kQueuedBit;

void AppendFloats(const std::vector<float>& values, DType dtype, std::string* out) {
  if (values.empty()) return;  // (data() may be null: no memcpy from it)
  const uint32_t elem = DTypeBytes(dtype);
  const size_t at = out->size();
  out->resize(at + values.size() * elem);
  kernels::FromF32(values.data(), elem, dtype == DType::kBf16, values.size(),
                   reinterpret_cast<std::byte*>(out->data() + at));
}

// `count` floats of `bytes` from `*offset` on; false when `bytes` is too short.
bool ReadFloats(const std::string& bytes, DType dtype, size_t count, size_t* offset,
                std::vector<float>* out) {
  const uint32_t elem = DTypeBytes(dtype);
  if (count > (bytes.size() - *offset) / elem) return false;
  out->resize(count);
  if (count == 0) return true;  // (data() may be null: no memcpy into it)
  kernels::ToF32(reinterpret_cast<const std::byte*>(bytes.data() + *offset), elem,
                 dtype == DType::kBf16, count, out->data());
  *offset += count * elem;
  return true;
}

}  // namespace

absl::Status CodedLayerImageToProto(const compress::CodedLayerImage& image, uint32_t layer,
                                    uint32_t num_kv_heads, uint32_t head_dim, DType dtype,
                                    v1::CodedLayerImage* proto) {
  proto->set_layer(layer);
  proto->set_num_parts(image.num_parts);
  proto->set_append_batch(image.append_batch);
  proto->mutable_positions()->Add(image.positions.begin(), image.positions.end());
  const uint32_t rows = num_kv_heads == 0 ? 0 : image.positions.size() / num_kv_heads;
  for (auto [plane, out] : {std::pair{&image.key, proto->mutable_key()},
                            std::pair{&image.value, proto->mutable_value()}}) {
    out->set_theta(plane->theta);
    std::vector<uint32_t> entries_of_part;
    for (uint32_t p = 0; p < plane->entries.size(); ++p) {
      entries_of_part.push_back(static_cast<uint32_t>(plane->entries[p].size() / head_dim));
      out->add_part_entries(entries_of_part.back());
      out->add_part_queued(static_cast<uint32_t>(plane->queues[p].size() / head_dim));
      AppendFloats(plane->entries[p], dtype, out->mutable_entries());
    }
    for (const std::vector<float>& queue : plane->queues) {
      AppendFloats(queue, dtype, out->mutable_queued());
    }
    std::string* bitmap = out->mutable_queued_rows();
    bitmap->assign((plane->codes.size() + 7) / 8, '\0');
    std::vector<float> magnitudes;
    // Queue indices are implied by (row, head) order: check that they are.
    std::vector<uint32_t> next_queued(image.num_parts, 0);
    for (uint32_t r = 0; r < rows; ++r) {
      for (uint32_t h = 0; h < num_kv_heads; ++h) {
        const uint32_t code = plane->codes[size_t{h} * rows + r];
        const uint32_t p = static_cast<uint32_t>(uint64_t{h} * image.num_parts / num_kv_heads);
        if ((code & kQueuedBit) && (code & ~kQueuedBit) != next_queued[p]++) {
          return absl::InternalError("a coded layer's queue is not in (row, head) order");
        }
      }
    }
    for (uint32_t h = 0; h < num_kv_heads; ++h) {
      const uint32_t p = static_cast<uint32_t>(uint64_t{h} * image.num_parts / num_kv_heads);
      const uint32_t ref_bytes = compress::CodebookRefBytes(entries_of_part[p]);
      for (uint32_t r = 0; r < rows; ++r) {
        const size_t v = size_t{h} * rows + r;
        const uint32_t code = plane->codes[v];
        if (code & kQueuedBit) {
          (*bitmap)[v / 8] = static_cast<char>((*bitmap)[v / 8] | (1 << (v % 8)));
          continue;
        }
        for (uint32_t b = 0; b < ref_bytes; ++b) {
          out->mutable_refs()->push_back(static_cast<char>((code >> (8 * b)) & 0xff));
        }
        magnitudes.push_back(plane->magnitudes[v]);
      }
    }
    AppendFloats(magnitudes, dtype, out->mutable_magnitudes());
  }
  return absl::OkStatus();
}

absl::StatusOr<compress::CodedLayerImage> CodedLayerImageFromProto(const v1::CodedLayerImage& proto,
                                                                   uint32_t num_kv_heads,
                                                                   uint32_t head_dim, DType dtype) {
  compress::CodedLayerImage image;
  image.num_parts = proto.num_parts();
  image.append_batch = proto.append_batch();
  image.positions.assign(proto.positions().begin(), proto.positions().end());
  if (num_kv_heads == 0 || head_dim == 0 || image.positions.size() % num_kv_heads != 0 ||
      (image.num_parts != 1 && image.num_parts != num_kv_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("coded.positions (", image.positions.size(),
                                                   ") and coded.num_parts (", image.num_parts,
                                                   ") do not fit ", num_kv_heads, " KV heads"));
  }
  const uint32_t rows = static_cast<uint32_t>(image.positions.size() / num_kv_heads);
  const size_t vectors = image.positions.size();
  for (auto [in, plane, name] : {std::tuple{&proto.key(), &image.key, "coded.key"},
                                 std::tuple{&proto.value(), &image.value, "coded.value"}}) {
    // Lambdas may not capture structured bindings (clang 14): copies.
    const std::string where = name;
    const v1::CodedPlaneImage& bits = *in;
    auto bad = [&where](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".", what));
    };
    plane->theta = in->theta();
    if (in->part_entries_size() != static_cast<int>(image.num_parts) ||
        in->part_queued_size() != static_cast<int>(image.num_parts)) {
      return bad(
          absl::StrCat("part_entries and part_queued must hold ", image.num_parts, " counts"));
    }
    size_t entries_at = 0, queued_at = 0;
    for (uint32_t p = 0; p < image.num_parts; ++p) {
      plane->entries.emplace_back();
      plane->queues.emplace_back();
      if (!ReadFloats(in->entries(), dtype, uint64_t{in->part_entries(p)} * head_dim, &entries_at,
                      &plane->entries.back())) {
        return bad(absl::StrCat("entries is shorter than part_entries says (part ", p, ")"));
      }
      if (!ReadFloats(in->queued(), dtype, uint64_t{in->part_queued(p)} * head_dim, &queued_at,
                      &plane->queues.back())) {
        return bad(absl::StrCat("queued is shorter than part_queued says (part ", p, ")"));
      }
    }
    if (entries_at != in->entries().size() || queued_at != in->queued().size()) {
      return bad("entries or queued is longer than its counts say");
    }
    if (in->queued_rows().size() != (vectors + 7) / 8) {
      return bad(absl::StrCat("queued_rows must be a bitmap of ", vectors, " rows"));
    }
    auto queued_row = [&bits](size_t v) { return (bits.queued_rows()[v / 8] >> (v % 8)) & 1; };
    for (size_t v = vectors; v < in->queued_rows().size() * 8; ++v) {
      if (queued_row(v)) return bad("queued_rows has bits set past the last row");
    }
    plane->codes.assign(vectors, 0);
    plane->magnitudes.assign(vectors, 0.0f);
    std::vector<uint32_t> next_queued(image.num_parts, 0);
    for (uint32_t r = 0; r < rows; ++r) {
      for (uint32_t h = 0; h < num_kv_heads; ++h) {
        const size_t v = size_t{h} * rows + r;
        const uint32_t p = static_cast<uint32_t>(uint64_t{h} * image.num_parts / num_kv_heads);
        if (queued_row(v)) plane->codes[v] = kQueuedBit | next_queued[p]++;
      }
    }
    size_t refs_at = 0;
    std::vector<size_t> coded_rows;
    for (uint32_t h = 0; h < num_kv_heads; ++h) {
      const uint32_t p = static_cast<uint32_t>(uint64_t{h} * image.num_parts / num_kv_heads);
      const uint32_t ref_bytes = compress::CodebookRefBytes(in->part_entries(p));
      for (uint32_t r = 0; r < rows; ++r) {
        const size_t v = size_t{h} * rows + r;
        if (queued_row(v)) continue;
        if (in->refs().size() - refs_at < ref_bytes) return bad("refs is too short");
        uint32_t code = 0;
        for (uint32_t b = 0; b < ref_bytes; ++b) {
          code |= uint32_t{static_cast<uint8_t>(in->refs()[refs_at++])} << (8 * b);
        }
        plane->codes[v] = code;
        coded_rows.push_back(v);
      }
    }
    if (refs_at != in->refs().size()) return bad("refs is longer than the coded rows need");
    std::vector<float> magnitudes;
    size_t magnitudes_at = 0;
    if (!ReadFloats(in->magnitudes(), dtype, coded_rows.size(), &magnitudes_at, &magnitudes) ||
        magnitudes_at != in->magnitudes().size()) {
      return bad(absl::StrCat("magnitudes must hold one per coded row (", coded_rows.size(), ")"));
    }
    for (size_t i = 0; i < coded_rows.size(); ++i) plane->magnitudes[coded_rows[i]] = magnitudes[i];
  }
  return image;
}

uint64_t CodedLayerPayloadBytes(const v1::CodedLayerImage& proto) {
  uint64_t bytes = 0;
  for (const v1::CodedPlaneImage* plane : {&proto.key(), &proto.value()}) {
    bytes += plane->entries().size() + plane->queued().size() + plane->refs().size() +
             plane->magnitudes().size();
  }
  return bytes;
}

uint64_t CodedLayerDigest(const v1::CodedLayerImage& proto) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  auto add = [&](const void* data, size_t size) { XXH3_64bits_update(state, data, size); };
  const uint32_t header[] = {proto.num_parts(), proto.append_batch(),
                             static_cast<uint32_t>(proto.positions_size())};
  add(header, sizeof(header));
  add(proto.positions().data(), proto.positions_size() * sizeof(uint32_t));
  for (const v1::CodedPlaneImage* plane : {&proto.key(), &proto.value()}) {
    const float theta = plane->theta();
    add(&theta, sizeof(theta));
    add(plane->part_entries().data(), plane->part_entries_size() * sizeof(uint32_t));
    add(plane->part_queued().data(), plane->part_queued_size() * sizeof(uint32_t));
    for (const std::string* bytes : {&plane->entries(), &plane->queued(), &plane->refs(),
                                     &plane->magnitudes(), &plane->queued_rows()}) {
      const uint64_t size = bytes->size();
      add(&size, sizeof(size));
      add(bytes->data(), bytes->size());
    }
  }
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return digest;
}

}  // namespace cachemgr
