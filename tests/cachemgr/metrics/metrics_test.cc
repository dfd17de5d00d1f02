#include "cachemgr/metrics/metrics.h"

#include <catch2/catch.hpp>
#include <map>
#include <sstream>
#include <string>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/util/clock.h"

namespace cachemgr {
namespace {

// A manager with no clients: the gauges read 0 and the recorded metrics are the test's.
struct Fixture {
  HostBackend backend;
  FakeClock clock;
  EventHub hub;
  CacheManager manager{CacheManagerOptions{}, &backend, &clock, &hub};
  Metrics metrics{&manager, &hub, "9.9.9"};

  // Sample lines of the exposition: {"name{labels}": "value"}.
  std::map<std::string, std::string> Samples() const {
    std::map<std::string, std::string> out;
    std::istringstream text(metrics.Render());
    for (std::string line; std::getline(text, line);) {
      if (line.empty() || line[0] == '#') continue;
      const size_t space = line.rfind(' ');
      REQUIRE(space != std::string::npos);
      CHECK(out.emplace(line.substr(0, space), line.substr(space + 1)).second);  // no duplicate
    }
    return out;
  }
};

TEST_CASE("gauges read the manager; build info and unlabelled counters are always there", "[cpu]") {
  Fixture f;
  auto s = f.Samples();
  CHECK(s["cachemgr_build_info{version=\"9.9.9\"}"] == "1");
  CHECK(s["cachemgr_clients"] == "0");
  CHECK(s["cachemgr_sequences"] == "0");
  CHECK(s["cachemgr_memory_used_bytes"] == "0");
  CHECK(s.count("cachemgr_uptime_seconds") == 1);
  CHECK(s["cachemgr_fetch_reconstructed_blocks_total"] == "0");
  CHECK(s["cachemgr_park_coded_rows_total"] == "0");
  CHECK(s["cachemgr_park_released_blocks_total"] == "0");
  // The exposition names every family even without samples (HELP and TYPE lines).
  const std::string text = f.metrics.Render();
  CHECK(text.find("# TYPE cachemgr_pool_bytes gauge\n") != std::string::npos);
  CHECK(text.find("# TYPE cachemgr_pool_used_blocks gauge\n") != std::string::npos);
}

TEST_CASE("RPC counters and latency histograms count each call once, buckets cumulative", "[cpu]") {
  Fixture f;
  f.metrics.ObserveRpc("Allocate", "OK", absl::Microseconds(70));  // bucket le=0.0001
  f.metrics.ObserveRpc("Allocate", "OK", absl::Milliseconds(3));   // le=0.005
  f.metrics.ObserveRpc("Free", "NOT_FOUND", absl::Seconds(100));   // only +Inf
  auto s = f.Samples();
  CHECK(s["cachemgr_rpc_requests_total{code=\"OK\",method=\"Allocate\"}"] == "2");
  CHECK(s["cachemgr_rpc_requests_total{code=\"NOT_FOUND\",method=\"Free\"}"] == "1");
  const std::string allocate = "code=\"OK\",method=\"Allocate\"";
  CHECK(s["cachemgr_rpc_latency_seconds_count{" + allocate + "}"] == "2");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + allocate + ",le=\"5e-05\"}"] == "0");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + allocate + ",le=\"0.0001\"}"] == "1");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + allocate + ",le=\"0.0025\"}"] == "1");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + allocate + ",le=\"0.005\"}"] == "2");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + allocate + ",le=\"+Inf\"}"] == "2");
  const std::string free = "code=\"NOT_FOUND\",method=\"Free\"";
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + free + ",le=\"60\"}"] == "0");
  CHECK(s["cachemgr_rpc_latency_seconds_bucket{" + free + ",le=\"+Inf\"}"] == "1");
  CHECK(s["cachemgr_rpc_latency_seconds_sum{" + free + "}"] == "100");
}

TEST_CASE("Compress metrics: bytes saved never go down, the ratio histogram by policy", "[cpu]") {
  Fixture f;
  CompressResult shrank;
  shrank.bytes_before = 1000;
  shrank.bytes_after = 400;
  shrank.honest_ratio = 0.4;
  CompressResult grew;  // codebooks larger than the blocks they replaced
  grew.bytes_before = 100;
  grew.bytes_after = 300;
  grew.honest_ratio = 1.0;
  f.metrics.ObserveCompress("snapkv", shrank);
  f.metrics.ObserveCompress("snapkv", grew);
  auto s = f.Samples();
  CHECK(s["cachemgr_compress_total{policy=\"snapkv\"}"] == "2");
  CHECK(s["cachemgr_compress_bytes_before_total{policy=\"snapkv\"}"] == "1100");
  CHECK(s["cachemgr_compress_bytes_saved_total{policy=\"snapkv\"}"] == "600");
  CHECK(s["cachemgr_compress_honest_ratio_bucket{policy=\"snapkv\",le=\"0.3\"}"] == "0");
  CHECK(s["cachemgr_compress_honest_ratio_bucket{policy=\"snapkv\",le=\"0.4\"}"] == "1");
  CHECK(s["cachemgr_compress_honest_ratio_bucket{policy=\"snapkv\",le=\"1\"}"] == "2");
  CHECK(s["cachemgr_compress_honest_ratio_count{policy=\"snapkv\"}"] == "2");
}

TEST_CASE("events are counted by type; Fetch and Park add up their layers", "[cpu]") {
  Fixture f;
  Event e;
  e.type = EventType::kSequenceAllocated;
  f.hub.Publish(e);
  f.hub.Publish(e);
  e.type = EventType::kClientExpired;
  f.hub.Publish(e);
  FetchedLayerResult fetched;
  fetched.new_blocks = 3;
  f.metrics.ObserveFetch({fetched, fetched});
  ParkedLayerResult parked;
  parked.rows_appended = 5;
  parked.blocks_released = 2;
  f.metrics.ObservePark({parked});
  auto s = f.Samples();
  CHECK(s["cachemgr_events_total{type=\"sequence_allocated\"}"] == "2");
  CHECK(s["cachemgr_events_total{type=\"client_expired\"}"] == "1");
  CHECK(s["cachemgr_fetch_reconstructed_blocks_total"] == "6");
  CHECK(s["cachemgr_park_coded_rows_total"] == "5");
  CHECK(s["cachemgr_park_released_blocks_total"] == "2");
}

}  // namespace
}  // namespace cachemgr
