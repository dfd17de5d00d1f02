#include "tools/soak/sequence_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/kernels/kv_digest.h"

namespace cachemgr::soak {
namespace {

using kernels::KvPlane;

uint32_t CeilDiv(uint64_t a, uint32_t b) { return static_cast<uint32_t>((a + b - 1) / b); }

// Collects at most kMaxProblems sentences.
class Problems {
 public:
  template <typename... Args>
  void Add(const Args&... parts) {
    if (list_.size() < kMaxProblems) list_.push_back(absl::StrCat(parts...));
  }
  bool full() const { return list_.size() >= kMaxProblems; }
  std::vector<std::string> Take() { return std::move(list_); }

 private:
  std::vector<std::string> list_;
};

// The layers a call names: `layers`, or every layer when empty.
std::vector<uint32_t> Which(const std::vector<uint32_t>& layers, uint32_t num_layers) {
  if (!layers.empty()) return layers;
  std::vector<uint32_t> all(num_layers);
  for (uint32_t l = 0; l < num_layers; ++l) all[l] = l;
  return all;
}

// cos(a, b) and |a| / |b| for `n` floats.
void Compare(const float* a, const float* b, uint32_t n, double* cos, double* norm_ratio) {
  double ab = 0, aa = 0, bb = 0;
  for (uint32_t i = 0; i < n; ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  *cos = (aa > 0 && bb > 0) ? ab / std::sqrt(aa * bb) : 0.0;
  *norm_ratio = bb > 0 ? std::sqrt(aa / bb) : 0.0;
}

const char* PlaneName(KvPlane plane) { return plane == KvPlane::kKey ? "K" : "V"; }

// The pool bytes of one resident layer against the model. Records first reads of coded rows.
void CheckLayerBytes(const client::KvPoolView& pool, const KvContent& content, uint32_t layer,
                     const std::vector<uint32_t>& blocks, const SequenceModel& seq,
                     LayerModel* model, Problems* problems, CheckCounts* counts) {
  const kernels::KvLayerLayout& layout = pool.layout();
  const std::byte* base = pool.layer_base(layer);
  const uint32_t rows = model->rows();
  const uint32_t heads = layout.num_kv_heads;
  const size_t head_bytes = content.head_bytes();
  const bool record = model->codebook && model->coded_rows > 0 && model->observed_k.empty();
  if (record) {
    model->observed_k.assign(size_t{model->coded_rows} * heads * head_bytes, std::byte{0});
    model->observed_v.assign(model->observed_k.size(), std::byte{0});
  }
  std::vector<std::byte> expected(head_bytes);
  std::vector<float> read(content.head_dim()), written(content.head_dim());
  for (uint32_t r = 0; r < rows && !problems->full(); ++r) {
    for (uint32_t h = 0; h < heads; ++h) {
      const uint32_t position = model->positions[h][r];
      if (position >= seq.seeds.size()) {
        problems->Add("layer ", layer, " row ", r, " head ", h, ": position ", position,
                      " was never written (the sequence has ", seq.seeds.size(), ")");
        continue;
      }
      const uint64_t seed = seq.seeds[position];
      for (const KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
        const std::byte* at = base + layout.head_offset(plane, blocks[r / layout.block_size],
                                                        r % layout.block_size, h);
        const std::string where = absl::StrCat("layer ", layer, " row ", r, " head ", h, " ",
                                               PlaneName(plane), " (position ", position, ")");
        if (r >= model->coded_rows) {
          content.Encoded(seed, layer, position, plane, h, expected.data());
          ++counts->exact;
          if (std::memcmp(at, expected.data(), head_bytes) != 0) {
            problems->Add(where, ": bytes differ from what was written");
          }
          continue;
        }
        std::vector<std::byte>& observed =
            plane == KvPlane::kKey ? model->observed_k : model->observed_v;
        std::byte* seen = observed.data() + (size_t{r} * heads + h) * head_bytes;
        if (!record) {
          ++counts->unchanged;
          if (std::memcmp(at, seen, head_bytes) != 0) {
            problems->Add(where, ": reconstructed bytes changed since they were first read");
          }
          continue;
        }
        std::memcpy(seen, at, head_bytes);
        ++counts->reconstructed;
        content.Decode(at, read.data());
        content.Vector(seed, layer, position, plane, h, written.data());
        double cos = 0, ratio = 0;
        Compare(read.data(), written.data(), content.head_dim(), &cos, &ratio);
        const float theta = plane == KvPlane::kKey ? seq.theta_k : seq.theta_v;
        if (!(cos >= theta - 0.005) || !(std::abs(ratio - 1.0) <= 0.02)) {
          problems->Add(where, ": reconstruction has cos ", cos, " (theta ", theta,
                        ") and magnitude ratio ", ratio, " to what was written");
        }
      }
    }
  }
}

}  // namespace

std::vector<uint32_t> LayerModel::FlatPositions() const {
  std::vector<uint32_t> out;
  for (const std::vector<uint32_t>& head : positions)
    out.insert(out.end(), head.begin(), head.end());
  return out;
}

SequenceModel SequenceModel::Empty(std::string id, uint32_t num_layers, uint32_t num_kv_heads) {
  SequenceModel m;
  m.id = std::move(id);
  m.layers.resize(num_layers);
  for (LayerModel& l : m.layers) l.positions.resize(num_kv_heads);
  return m;
}

bool SequenceModel::has_codebook() const {
  return std::any_of(layers.begin(), layers.end(), [](const LayerModel& l) { return l.codebook; });
}

bool SequenceModel::any_parked() const {
  return std::any_of(layers.begin(), layers.end(), [](const LayerModel& l) { return l.parked; });
}

bool SequenceModel::any_fetched_codebook() const {
  return std::any_of(layers.begin(), layers.end(),
                     [](const LayerModel& l) { return l.codebook && !l.parked; });
}

void SequenceModel::Append(uint32_t count, uint64_t seed) {
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t position = static_cast<uint32_t>(num_positions + i);
    seeds.push_back(seed);
    for (LayerModel& l : layers) {
      for (std::vector<uint32_t>& head : l.positions) head.push_back(position);
    }
  }
  num_positions += count;
}

std::vector<std::string> CheckAllocation(const SequenceModel& before, bool expect_created,
                                         uint32_t count, const client::Allocation& alloc,
                                         const kernels::KvLayerLayout& layout) {
  Problems p;
  if (alloc.created != expect_created) {
    p.Add("Allocate says created=", alloc.created, " for a sequence that ",
          expect_created ? "did not exist" : "existed");
  }
  if (alloc.first_position != before.num_positions) {
    p.Add("Allocate's first_position is ", alloc.first_position, ", expected ",
          before.num_positions);
  }
  if (alloc.num_positions != before.num_positions + count) {
    p.Add("Allocate's num_positions is ", alloc.num_positions, ", expected ",
          before.num_positions + count);
  }
  if (alloc.layers.size() != before.layers.size()) {
    p.Add("Allocate answered ", alloc.layers.size(), " layers of ", before.layers.size());
    return p.Take();
  }
  std::set<uint32_t> seen;
  const uint64_t slots = uint64_t{layout.num_blocks} * layout.block_size;
  for (const client::LayerAllocation& la : alloc.layers) {
    if (la.layer >= before.layers.size() || !seen.insert(la.layer).second) {
      p.Add("Allocate answered layer ", la.layer, " twice or out of range");
      continue;
    }
    const uint32_t old_rows = before.layers[la.layer].rows();
    if (la.num_tokens != old_rows + count) {
      p.Add("layer ", la.layer, " holds ", la.num_tokens, " tokens after Allocate, expected ",
            old_rows + count);
    }
    if (la.slot_mapping.size() != count) {
      p.Add("layer ", la.layer, " has ", la.slot_mapping.size(), " slots for ", count, " tokens");
      continue;
    }
    std::set<int64_t> distinct;
    for (uint32_t i = 0; i < count; ++i) {
      const int64_t slot = la.slot_mapping[i];
      if (slot < 0 || static_cast<uint64_t>(slot) >= slots) {
        p.Add("layer ", la.layer, " slot ", slot, " is outside the pool");
      } else if (static_cast<uint64_t>(slot) % layout.block_size !=
                 (old_rows + i) % layout.block_size) {
        p.Add("layer ", la.layer, " row ", old_rows + i, " got slot ", slot,
              ", not at its offset in the block");
      } else if (!distinct.insert(slot).second) {
        p.Add("layer ", la.layer, " slot ", slot, " given twice");
      }
    }
  }
  return p.Take();
}

std::vector<std::string> CheckCompress(const SequenceModel& before,
                                       const client::CompressResult& result,
                                       const kernels::KvLayerLayout& layout, float theta_k,
                                       float theta_v, SequenceModel* after) {
  Problems p;
  const uint32_t num_layers = static_cast<uint32_t>(before.layers.size());
  const uint32_t heads = layout.num_kv_heads;
  if (result.layers.size() != num_layers) {
    p.Add("Compress answered ", result.layers.size(), " layers of ", num_layers);
    return p.Take();
  }
  *after = before;
  after->compressed = true;
  after->theta_k = theta_k;
  after->theta_v = theta_v;
  after->kept_per_layer.assign(num_layers, 0);
  std::set<uint32_t> seen;
  for (const client::CompressedLayer& c : result.layers) {
    if (c.layer >= num_layers || !seen.insert(c.layer).second) {
      p.Add("Compress answered layer ", c.layer, " twice or out of range");
      continue;
    }
    const LayerModel& old = before.layers[c.layer];
    const uint32_t rows = c.kept_per_head;
    if (rows == 0 || rows > old.rows() || c.num_tokens != rows) {
      p.Add("layer ", c.layer, " kept ", rows, " rows per head (num_tokens ", c.num_tokens, ") of ",
            old.rows());
      continue;
    }
    if (c.kept_positions.size() != size_t{heads} * rows) {
      p.Add("layer ", c.layer, " lists ", c.kept_positions.size(), " kept positions for ", heads,
            " heads x ", rows, " rows");
      continue;
    }
    const size_t want_blocks = c.codebook ? 0 : CeilDiv(rows, layout.block_size);
    if (c.block_ids.size() != want_blocks) {
      p.Add("layer ", c.layer, " holds ", c.block_ids.size(), " blocks after Compress, expected ",
            want_blocks);
    }
    LayerModel& l = after->layers[c.layer];
    for (uint32_t h = 0; h < heads; ++h) {
      std::vector<uint32_t> kept(c.kept_positions.begin() + size_t{h} * rows,
                                 c.kept_positions.begin() + size_t{h + 1} * rows);
      for (uint32_t r = 0; r < rows; ++r) {
        // Uncompressed before, so row t is position t; rows stay in ascending position order.
        if (kept[r] >= old.rows() || (r > 0 && kept[r] <= kept[r - 1])) {
          p.Add("layer ", c.layer, " head ", h,
                " keeps positions not ascending or out of range: ", absl::StrJoin(kept, ","));
          break;
        }
      }
      l.positions[h] = std::move(kept);
    }
    l.codebook = c.codebook;
    l.parked = c.codebook;
    l.coded_rows = c.codebook ? rows : 0;
    l.observed_k.clear();
    l.observed_v.clear();
    after->kept_per_layer[c.layer] = rows;
  }
  return p.Take();
}

std::vector<std::string> CheckFetch(const SequenceModel& before,
                                    const std::vector<uint32_t>& layers,
                                    const std::vector<client::FetchedLayer>& fetched,
                                    const kernels::KvLayerLayout& layout, SequenceModel* after) {
  Problems p;
  const std::vector<uint32_t> which = Which(layers, static_cast<uint32_t>(before.layers.size()));
  if (fetched.size() != which.size()) {
    p.Add("Fetch answered ", fetched.size(), " layers for ", which.size());
    return p.Take();
  }
  *after = before;
  for (size_t i = 0; i < which.size(); ++i) {
    const client::FetchedLayer& f = fetched[i];
    if (f.layer != which[i]) {
      p.Add("Fetch answered layer ", f.layer, " where layer ", which[i], " was asked");
      continue;
    }
    const LayerModel& old = before.layers[f.layer];
    const uint32_t rows = old.rows();
    if (f.num_tokens != rows) {
      p.Add("Fetch: layer ", f.layer, " holds ", f.num_tokens, " rows, expected ", rows);
    }
    if (f.block_ids.size() != CeilDiv(rows, layout.block_size)) {
      p.Add("Fetch: layer ", f.layer, " holds ", f.block_ids.size(), " blocks for ", rows, " rows");
    }
    const uint32_t new_blocks = old.parked ? CeilDiv(rows, layout.block_size) : 0;
    if (f.new_blocks != new_blocks) {
      p.Add("Fetch: layer ", f.layer, " reports ", f.new_blocks, " new blocks, expected ",
            new_blocks);
    }
    const std::vector<uint32_t> positions =
        before.compressed ? old.FlatPositions() : std::vector<uint32_t>{};
    if (f.positions != positions) {
      p.Add("Fetch: layer ", f.layer, " row positions differ from the model's (",
            f.positions.size(), " vs ", positions.size(), " entries)");
    }
    LayerModel& l = after->layers[f.layer];
    if (l.parked) {
      l.parked = false;
      l.observed_k.clear();
      l.observed_v.clear();
    }
  }
  return p.Take();
}

std::vector<std::string> CheckPark(const SequenceModel& before, const std::vector<uint32_t>& layers,
                                   const std::vector<client::ParkedLayer>& parked,
                                   SequenceModel* after) {
  Problems p;
  std::vector<uint32_t> which = layers;
  if (which.empty()) {
    for (uint32_t l = 0; l < before.layers.size(); ++l) {
      if (before.layers[l].codebook) which.push_back(l);
    }
  }
  if (parked.size() != which.size()) {
    p.Add("Park answered ", parked.size(), " layers for ", which.size());
    return p.Take();
  }
  *after = before;
  for (size_t i = 0; i < which.size(); ++i) {
    const client::ParkedLayer& r = parked[i];
    if (r.layer != which[i]) {
      p.Add("Park answered layer ", r.layer, " where layer ", which[i], " was asked");
      continue;
    }
    const LayerModel& old = before.layers[r.layer];
    if (r.num_tokens != old.rows()) {
      p.Add("Park: layer ", r.layer, " holds ", r.num_tokens, " rows, expected ", old.rows());
    }
    const uint32_t appended = old.parked ? 0 : old.rows() - old.coded_rows;
    if (r.rows_appended != appended) {
      p.Add("Park: layer ", r.layer, " coded ", r.rows_appended, " appended rows, expected ",
            appended);
    }
    LayerModel& l = after->layers[r.layer];
    l.parked = true;
    l.coded_rows = l.rows();
    l.observed_k.clear();
    l.observed_v.clear();
  }
  return p.Take();
}

std::vector<std::string> CheckSequence(const client::SequenceInfo& info,
                                       const client::KvPoolView& pool, const KvContent& content,
                                       SequenceModel* model, CheckCounts* counts) {
  Problems p;
  const kernels::KvLayerLayout& layout = pool.layout();
  if (info.sequence_id != model->id) {
    p.Add("GetSequence answered sequence ", info.sequence_id, " for ", model->id);
  }
  if (info.num_positions != model->num_positions) {
    p.Add("num_positions is ", info.num_positions, ", expected ", model->num_positions);
  }
  if (info.parent_sequence_id != model->parent) {
    p.Add("parent is \"", info.parent_sequence_id, "\", expected \"", model->parent, "\"");
  }
  if (info.compressed != model->compressed ||
      (model->compressed && info.kept_per_layer != model->kept_per_layer)) {
    p.Add("compressed=", info.compressed,
          " kept_per_layer=", absl::StrJoin(info.kept_per_layer, ","),
          ", expected compressed=", model->compressed,
          " kept_per_layer=", absl::StrJoin(model->kept_per_layer, ","));
  }
  if (!info.busy.empty()) p.Add("busy in ", info.busy, " while this client runs no call on it");
  if (info.layers.size() != model->layers.size()) {
    p.Add("GetSequence answered ", info.layers.size(), " layers of ", model->layers.size());
    return p.Take();
  }
  std::vector<const client::LayerBlockTable*> by_layer(model->layers.size(), nullptr);
  for (const client::LayerBlockTable& t : info.layers) {
    if (t.layer >= by_layer.size() || by_layer[t.layer] != nullptr) {
      p.Add("GetSequence answered layer ", t.layer, " twice or out of range");
      return p.Take();
    }
    by_layer[t.layer] = &t;
  }
  for (uint32_t l = 0; l < model->layers.size() && !p.full(); ++l) {
    const client::LayerBlockTable& t = *by_layer[l];
    LayerModel& lm = model->layers[l];
    const uint32_t rows = lm.rows();
    if (t.num_tokens != rows) {
      p.Add("layer ", l, " holds ", t.num_tokens, " rows, expected ", rows);
      continue;
    }
    const size_t want_blocks = lm.parked ? 0 : CeilDiv(rows, layout.block_size);
    if (t.block_ids.size() != want_blocks) {
      p.Add("layer ", l, " holds ", t.block_ids.size(), " blocks, expected ", want_blocks,
            lm.parked ? " (parked)" : "");
      continue;
    }
    std::set<uint32_t> distinct(t.block_ids.begin(), t.block_ids.end());
    if (distinct.size() != t.block_ids.size() ||
        (!distinct.empty() && *distinct.rbegin() >= layout.num_blocks)) {
      p.Add("layer ", l,
            " block table repeats a block or leaves the pool: ", absl::StrJoin(t.block_ids, ","));
      continue;
    }
    const uint32_t digest_rows = lm.parked ? 0 : rows;
    const uint64_t local =
        kernels::DigestLayerTokens(layout, pool.layer_base(l), t.block_ids.data(), digest_rows);
    if (t.kv_digest != local) {
      p.Add("layer ", l, " digest: the daemon read ", t.kv_digest, ", this client reads ", local);
    }
    if (!lm.parked) CheckLayerBytes(pool, content, l, t.block_ids, *model, &lm, &p, counts);
  }
  return p.Take();
}

}  // namespace cachemgr::soak
