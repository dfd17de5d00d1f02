// A CacheManager on the host backend with one attached client whose pool and input buffer are
// mapped, plus a sequence of known KV: the setting of the Compress / Fetch / Park tests.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/host/memfd_region.h"

namespace cachemgr {

constexpr uint32_t kLayers = 3, kQHeads = 4, kKvHeads = 2, kDim = 8, kBlock = 4, kTokens = 40;

inline ModelSpec Model() {
  ModelSpec m;
  m.name = "cmp";
  m.num_layers = kLayers;
  m.num_q_heads = kQHeads;
  m.num_kv_heads = kKvHeads;
  m.head_dim = kDim;
  m.dtype = DType::kFp32;
  m.block_size = kBlock;
  return m;
}

// `Backend`: HostBackend, or a test backend built on it (gated_backend.h).
template <typename Backend>
struct BasicFixture {
  BasicFixture() : manager({}, &backend, &clock, &hub) {
    hub.Subscribe([this](const Event* e) {
      if (e) events.push_back(*e);
    });
    auto r = manager.Attach({"engine", Model(), 64});
    REQUIRE(r.ok());
    a = *r;
    auto fds = manager.ShareFds(a.session_token);
    REQUIRE(fds.ok());
    REQUIRE(fds->size() == 2);
    REQUIRE(a.input_buffer_region_index == 1);
    REQUIRE(a.input_buffer_bytes == uint64_t{kLayers} * 64 * kQHeads * kDim * 4);
    pool = *MemfdRegion::Map(std::move((*fds)[0]), a.pool.regions[0].bytes);
    input = *MemfdRegion::Map(std::move((*fds)[1]), a.input_buffer_bytes);
    layout = a.pool.model.LayerLayout(a.pool.num_blocks);
  }

  float* Head(uint32_t l, kernels::KvPlane plane, uint32_t block, uint32_t row, uint32_t h) {
    return reinterpret_cast<float*>(pool.data() + a.pool.layers[l].offset +
                                    layout.head_offset(plane, block, row, h));
  }

  // Allocates `id` with kTokens tokens of random KV; keeps a dense copy [n, Hkv, D] per layer.
  void Fill(const std::string& id, uint32_t seed) {
    auto alloc = manager.Allocate(a.session_token, id, kTokens);
    REQUIRE(alloc.ok());
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    keys.assign(kLayers, std::vector<float>(kTokens * kKvHeads * kDim));
    values = keys;
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        const int64_t slot = alloc->layers[l].slot_mapping[t];
        for (uint32_t h = 0; h < kKvHeads; ++h) {
          float* k = Head(l, kernels::KvPlane::kKey, slot / kBlock, slot % kBlock, h);
          float* v = Head(l, kernels::KvPlane::kValue, slot / kBlock, slot % kBlock, h);
          for (uint32_t d = 0; d < kDim; ++d) {
            // Tokens of a head share a direction, so codebooks merge some of them.
            const float base = (t % 3 == 0 ? 1.0f : 0.2f) * static_cast<float>(d + h);
            k[d] = keys[l][(t * kKvHeads + h) * kDim + d] = base + 0.05f * normal(rng);
            v[d] = values[l][(t * kKvHeads + h) * kDim + d] = base - 0.05f * normal(rng);
          }
        }
      }
    }
    // Scores [L, Hq, n] into the input buffer.
    scores.resize(size_t{kLayers} * kQHeads * kTokens);
    std::uniform_real_distribution<float> uni(0.0f, 1.0f);
    for (float& s : scores) s = uni(rng);
    std::memcpy(input.data(), scores.data(), scores.size() * 4);
  }

  compress::SequenceResult Reference(const compress::PolicyConfig& policy, double r) {
    compress::ModelShape shape;
    shape.num_layers = kLayers;
    shape.num_q_heads = kQHeads;
    shape.num_kv_heads = kKvHeads;
    shape.head_dim = kDim;
    shape.elem_bytes = 4;
    compress::SequenceInput in;
    in.num_tokens = kTokens;
    for (uint32_t l = 0; l < kLayers; ++l) {
      compress::LayerInput li;
      li.keys = keys[l].data();
      li.values = values[l].data();
      li.scores = scores.data() + size_t{l} * kQHeads * kTokens;
      in.layers.push_back(li);
    }
    auto result =
        compress::CompressSequence(shape, policy, in, {compress::TargetKind::kReserveRatio, r});
    REQUIRE(result.ok());
    return *std::move(result);
  }

  uint64_t UsedBlocks() {
    uint64_t used = 0;
    const StatsSnapshot stats = manager.Stats();
    for (const auto& l : stats.pools[0].layers) used += l.used_blocks;
    return used;
  }

  std::vector<Event> events;
  Backend backend;
  FakeClock clock;
  EventHub hub;
  CacheManager manager;
  AttachResult a;
  MemfdRegion pool, input;
  kernels::KvLayerLayout layout;
  std::vector<std::vector<float>> keys, values;
  std::vector<float> scores;
};

using Fixture = BasicFixture<HostBackend>;

inline CompressParams Params(const std::string& preset, double r = 0.3) {
  CompressParams p;
  p.policy = *ResolvePreset(preset);
  p.policy.window = 4;
  p.target = {compress::TargetKind::kReserveRatio, r};
  p.input = CompressInput::kScores;
  return p;
}

inline double Cos(const float* a, const float* b, uint32_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (uint32_t i = 0; i < n; ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

}  // namespace cachemgr
