// The prefix-store tests' fixture: a CacheManager on the host backend (through GatedBackend,
// which blocks only once a test arms it) with a fake clock, and clients attached to it with
// their pool mapped as an engine maps it.
#pragma once

#include <catch2/catch.hpp>
#include <cstddef>
#include <string>
#include <utility>

#include "cachemgr/cache_manager.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/util/clock.h"
#include "tests/cachemgr/gated_backend.h"

namespace cachemgr::testing {

// A budget of `budget` bytes, Compress on the calling thread.
inline CacheManagerOptions ManagerOptions(uint64_t budget = uint64_t{1} << 30) {
  CacheManagerOptions o;
  o.memory_budget_bytes = budget;
  o.compress_threads = 1;
  return o;
}

struct ManagerFixture {
  explicit ManagerFixture(const CacheManagerOptions& options = ManagerOptions())
      : manager(options, &backend, &clock, nullptr) {}
  GatedBackend backend;
  FakeClock clock;
  CacheManager manager;
};

// An attached client with its pool mapped.
struct MappedClient {
  AttachResult a;
  MemfdRegion pool;
  kernels::KvLayerLayout layout;

  const std::string& token() const { return a.session_token; }
  // Token row `row` of `block` in layer `l`'s plane, as the engine writes it.
  std::byte* Row(uint32_t l, kernels::KvPlane plane, uint32_t block, uint32_t row) {
    return pool.data() + a.pool.layers[l].offset + layout.token_offset(plane, block, row);
  }
};

inline MappedClient AttachMapped(CacheManager& manager, const std::string& name,
                                 const ModelSpec& model, uint32_t num_blocks,
                                 uint64_t input_bytes = 4096) {
  auto r = manager.Attach({name, model, num_blocks, input_bytes});
  REQUIRE(r.ok());
  MappedClient c;
  c.a = *r;
  auto fds = manager.ShareFds(c.a.session_token);
  REQUIRE(fds.ok());
  auto pool = MemfdRegion::Map(std::move((*fds)[0]), c.a.pool.regions[0].bytes);
  REQUIRE(pool.ok());
  c.pool = *std::move(pool);
  c.layout = c.a.pool.model.LayerLayout(c.a.pool.num_blocks);
  return c;
}

}  // namespace cachemgr::testing
