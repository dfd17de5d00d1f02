// Pools on several devices of one daemon (AttachParams::device, GroupMembership::devices): two
// host backends under device names stand in for two GPUs (a GPU daemon has one CudaBackend per
// --cuda_device), so what is checked here is where each pool's and each rank's memory is made
// and what every reply and snapshot says about it.
#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/util/clock.h"

namespace cachemgr {
namespace {

// A host backend named like a GPU, counting the pools made on it.
class NamedBackend final : public DeviceBackend {
 public:
  explicit NamedBackend(std::string name) : name_(std::move(name)) {}
  BackendKind kind() const override { return host_.kind(); }
  ShareMethod share_method() const override { return host_.share_method(); }
  std::string device_name() const override { return name_; }
  absl::StatusOr<uint64_t> PoolBytes(const kernels::KvLayerLayout& layout,
                                     uint32_t num_layers) const override {
    return host_.PoolBytes(layout, num_layers);
  }
  absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePool(const std::string& pool_id,
                                                         const kernels::KvLayerLayout& layout,
                                                         kernels::KvElemType type,
                                                         uint32_t num_layers) override {
    ++pools_created;
    heads.push_back(layout.num_kv_heads);
    return host_.CreatePool(pool_id, layout, type, num_layers);
  }
  int pools_created = 0;
  std::vector<uint32_t> heads;  // of each pool made here

 private:
  HostBackend host_;
  std::string name_;
};

ModelSpec Model() {
  ModelSpec m;
  m.name = "dev";
  m.num_layers = 2;
  m.num_q_heads = 8;
  m.num_kv_heads = 4;
  m.head_dim = 8;
  m.dtype = DType::kFp16;
  m.block_size = 4;
  return m;
}

struct Devices {
  Devices() : manager({}, std::vector<DeviceBackend*>{&a, &b}, &clock, nullptr) {}
  absl::StatusOr<AttachResult> Attach(const std::string& name, const std::string& device,
                                      std::optional<GroupMembership> group = std::nullopt) {
    AttachParams p;
    p.client_name = name;
    p.model = Model();
    p.num_blocks = 16;
    p.device = device;
    p.group = std::move(group);
    return manager.Attach(p);
  }
  NamedBackend a{"GPU-aaaa"}, b{"GPU-bbbb"};
  FakeClock clock;
  CacheManager manager;
};

TEST_CASE("A model attached on two devices has a pool on each", "[cpu]") {
  Devices d;
  auto first = d.Attach("e0", "");  // the first device by default
  auto second = d.Attach("e1", "GPU-bbbb");
  auto again = d.Attach("e2", "GPU-aaaa");
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  REQUIRE(again.ok());
  CHECK(first->pool.device == "GPU-aaaa");
  CHECK(second->pool.device == "GPU-bbbb");
  CHECK(second->pool.pool_id != first->pool.pool_id);
  CHECK(again->pool.pool_id == first->pool.pool_id);  // joins the pool on its device
  CHECK(d.a.pools_created == 1);
  CHECK(d.b.pools_created == 1);
  // One block table per pool: a sequence allocated on one device's pool is not the other's.
  REQUIRE(d.manager.Allocate(first->session_token, "s", 8).ok());
  const StatsSnapshot stats = d.manager.Stats();
  REQUIRE(stats.pools.size() == 2);
  for (const PoolSnapshot& p : stats.pools) {
    const bool on_a = p.pool_id == first->pool.pool_id;
    CHECK(p.device == (on_a ? "GPU-aaaa" : "GPU-bbbb"));
    CHECK(p.layers[0].used_blocks == (on_a ? 2u : 0u));
  }
  REQUIRE(d.manager.CheckInvariants().ok());
}

TEST_CASE("A group's ranks keep their shards on their own devices", "[cpu]") {
  Devices d;
  const std::vector<std::string> devices = {"GPU-bbbb", "GPU-aaaa"};
  auto r0 = d.Attach("r0", "", GroupMembership{"tp", 0, 2, devices});
  REQUIRE(r0.ok());
  // Every shard is made when the first rank attaches, each on its rank's device.
  CHECK(d.a.pools_created == 1);
  CHECK(d.b.pools_created == 1);
  CHECK(d.a.heads == std::vector<uint32_t>{2});
  CHECK(d.b.heads == std::vector<uint32_t>{2});
  CHECK(r0->pool.device == "GPU-bbbb");
  // A later rank may name its own device, the group's list, or nothing.
  auto r1 = d.Attach("r1", "GPU-aaaa", GroupMembership{"tp", 1, 2, {}});
  REQUIRE(r1.ok());
  CHECK(r1->pool.device == "GPU-aaaa");
  CHECK(r1->pool.pool_id == r0->pool.pool_id);
  const StatsSnapshot stats = d.manager.Stats();
  REQUIRE(stats.pools.size() == 1);
  CHECK(stats.pools[0].device == "GPU-bbbb,GPU-aaaa");
  REQUIRE(d.manager.Allocate(r1->session_token, "s", 9).ok());
  REQUIRE(d.manager.CheckInvariants().ok());
}

TEST_CASE("Device errors name the field and change nothing", "[cpu]") {
  Devices d;
  REQUIRE(d.Attach("r0", "", GroupMembership{"tp", 0, 2, {"GPU-aaaa", "GPU-bbbb"}}).ok());
  const StatsSnapshot before = d.manager.Stats();
  struct Bad {
    std::string device;
    std::optional<GroupMembership> group;
    absl::StatusCode code;
    const char* text;
  };
  for (const Bad& bad : {
           Bad{"GPU-cccc", std::nullopt, absl::StatusCode::kInvalidArgument,
               "device \"GPU-cccc\" is not a device of this cachemgrd (it has GPU-aaaa, GPU-bbbb)"},
           Bad{"", GroupMembership{"other", 0, 2, {"GPU-aaaa"}}, absl::StatusCode::kInvalidArgument,
               "group.devices names 1 devices"},
           Bad{"", GroupMembership{"other", 0, 2, {"GPU-aaaa", "nope"}},
               absl::StatusCode::kInvalidArgument, "group.devices[1]"},
           Bad{"GPU-bbbb", GroupMembership{"other", 0, 2, {"GPU-aaaa", "GPU-bbbb"}},
               absl::StatusCode::kInvalidArgument, "differs from group.devices[0]"},
           Bad{"", GroupMembership{"tp", 1, 2, {"GPU-bbbb", "GPU-aaaa"}},
               absl::StatusCode::kFailedPrecondition, "group.devices differ"},
           Bad{"GPU-aaaa", GroupMembership{"tp", 1, 2, {}}, absl::StatusCode::kFailedPrecondition,
               "device differs"},
       }) {
    auto r = d.Attach("bad", bad.device, bad.group);
    INFO(r.status());
    CHECK(r.status().code() == bad.code);
    CHECK(absl::StrContains(r.status().message(), bad.text));
  }
  const StatsSnapshot after = d.manager.Stats();
  CHECK(after.clients.size() == before.clients.size());
  CHECK(after.pools.size() == before.pools.size());
  CHECK(after.memory_used_bytes == before.memory_used_bytes);
  CHECK(d.a.pools_created + d.b.pools_created == 2);
}

}  // namespace
}  // namespace cachemgr
