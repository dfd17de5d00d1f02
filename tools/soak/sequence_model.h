// SequenceModel: what one live sequence of a chaos client must hold, kept from the client's own
// record of what it did (Allocate, writes, Fork, Compress, Fetch, Park), and the checks of the
// daemon's answers and of the pool's bytes against it.
//
// Per layer and KV head the model knows the original position of every row. A row's bytes are
// exact (KvContent of the seed its position was written with) unless it is a codebook row:
// those are approximate once Compress or Park coded them. After a Fetch the first check of a
// codebook row only requires cos(read, written) >= theta - 0.005 and a magnitude within 2% (what
// the codebook promises: cos > theta to its entry, the vector's own norm), then records the
// bytes read, and every later check until the next Park requires exactly those bytes.
//
// Not thread-safe; one client thread owns its models.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cachemgr/client/client.h"
#include "tools/soak/kv_content.h"

namespace cachemgr::soak {

struct LayerModel {
  // [num_kv_heads][rows]: the original position of each row of each KV head.
  std::vector<std::vector<uint32_t>> positions;
  bool codebook = false;  // Compress stored the layer as a codebook
  bool parked = false;    // a codebook at rest: no blocks until Fetch
  // Codebook layers: rows [0, coded_rows) are coded (approximate); later rows were appended
  // since the last Fetch and are exact.
  uint32_t coded_rows = 0;
  // The coded rows' bytes as read after the last Fetch, [coded_rows][num_kv_heads][head bytes]
  // per plane; empty until read.
  std::vector<std::byte> observed_k, observed_v;

  uint32_t rows() const {
    return positions.empty() ? 0 : static_cast<uint32_t>(positions[0].size());
  }
  // Row positions flattened head after head, as the daemon reports them.
  std::vector<uint32_t> FlatPositions() const;
};

struct SequenceModel {
  std::string id;
  std::string parent;  // the sequence it was forked from ("" if allocated)
  uint64_t num_positions = 0;
  std::vector<uint64_t> seeds;  // per position: the seed its rows were written with
  std::vector<LayerModel> layers;
  bool compressed = false;
  std::vector<uint32_t> kept_per_layer;  // rows per KV head Compress left
  float theta_k = 1.0f, theta_v = 1.0f;  // the codebook's thresholds (codebook layers)
  // Its id marks it as one the operator may free at any time (scripts/soak.py does): NOT_FOUND
  // for it is no corruption, and an Allocate may create it anew.
  bool operator_may_free = false;

  // A new, empty sequence of `num_layers` layers with `num_kv_heads` heads.
  static SequenceModel Empty(std::string id, uint32_t num_layers, uint32_t num_kv_heads);

  bool has_codebook() const;
  bool any_parked() const;
  bool any_fetched_codebook() const;
  // Appends `count` positions written with `seed` to every layer.
  void Append(uint32_t count, uint64_t seed);
};

// The checks. Each returns the problems found (empty: all good), one sentence each, at most
// `kMaxProblems` (the first ones).
inline constexpr size_t kMaxProblems = 8;

// An Allocate answer for `count` new tokens against the model before the call.
std::vector<std::string> CheckAllocation(const SequenceModel& before, bool expect_created,
                                         uint32_t count, const client::Allocation& alloc,
                                         const kernels::KvLayerLayout& layout);

// A Compress answer; on success `after` is the model as Compress left it.
std::vector<std::string> CheckCompress(const SequenceModel& before,
                                       const client::CompressResult& result,
                                       const kernels::KvLayerLayout& layout, float theta_k,
                                       float theta_v, SequenceModel* after);

// A Fetch answer for `layers` (all when empty); on success `after` has them resident.
std::vector<std::string> CheckFetch(const SequenceModel& before,
                                    const std::vector<uint32_t>& layers,
                                    const std::vector<client::FetchedLayer>& fetched,
                                    const kernels::KvLayerLayout& layout, SequenceModel* after);

// A Park answer for `layers` (every codebook layer when empty); on success `after` has them
// parked, every row coded.
std::vector<std::string> CheckPark(const SequenceModel& before, const std::vector<uint32_t>& layers,
                                   const std::vector<client::ParkedLayer>& parked,
                                   SequenceModel* after);

// What CheckSequence compared, in head vectors (K and V apart).
struct CheckCounts {
  uint64_t exact = 0;          // byte for byte against what was written
  uint64_t reconstructed = 0;  // first read of a coded row after Fetch: within the tolerance
  uint64_t unchanged = 0;      // a coded row read again: byte for byte against its first read
};

// A GetSequence answer (with digests) and the pool's bytes under it, read through `pool`.
// Records the bytes of codebook rows read for the first time since a Fetch into `model`, and
// adds what it compared to `counts`. The caller must check lease_ok() afterwards and discard
// everything if it is false (the reads may then have reached revoked memory).
std::vector<std::string> CheckSequence(const client::SequenceInfo& info,
                                       const client::KvPoolView& pool, const KvContent& content,
                                       SequenceModel* model, CheckCounts* counts);

}  // namespace cachemgr::soak
