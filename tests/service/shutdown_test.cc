// SIGTERM during a long Compress (issue 12, finding 10): the daemon stops the Compress between
// layers (it answers UNAVAILABLE and changes nothing) and exits cleanly soon after the grace
// period, instead of waiting for a computation that takes far longer.
#include <signal.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "cachemgr/client/client.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

// The sequence's busy call as an operator sees it ("" when idle or gone).
std::string Busy(v1::CacheManager::Stub& stub, const std::string& id) {
  grpc::ClientContext ctx;
  v1::GetSequenceRequest req;
  req.set_sequence_id(id);
  v1::GetSequenceResponse resp;
  if (!stub.GetSequence(&ctx, req, &resp).ok()) return "";
  return resp.sequence().busy();
}

TEST_CASE("SIGTERM stops a long Compress between layers and the daemon exits 0", "[service]") {
  auto daemon = DaemonProcess::Start({"--shutdown_grace_ms=1000", "--compress_threads=1",
                                      "--worker_threads=1", "--memory_budget=2G"});
  REQUIRE(daemon.ok());
  // Codebooks of 4096 random rows in each of 96 layers: on one thread the whole Compress takes
  // far longer (minutes on a small machine) than the bound below; a layer takes well under it.
  constexpr uint32_t kLayers = 96, kHeads = 2, kDim = 64, kTokens = 4096;
  client::AttachOptions options;
  options.client_name = "compressor";
  options.model.name = "long";
  options.model.num_layers = kLayers;
  options.model.num_q_heads = kHeads;
  options.model.num_kv_heads = kHeads;
  options.model.head_dim = kDim;
  options.model.dtype = client::DType::kFp16;
  options.model.block_size = 16;
  options.num_blocks = kTokens / 16;
  auto session = client::Session::Attach((*daemon)->socket_path(), options);
  REQUIRE(session.ok());
  auto alloc = (*session)->Allocate("s", kTokens);
  REQUIRE(alloc.ok());
  std::mt19937 rng(5);
  for (const client::LayerAllocation& layer : alloc->layers) {
    for (int64_t slot : layer.slot_mapping) {
      uint16_t* k = (*session)->pool().key_at_slot<uint16_t>(layer.layer, slot);
      uint16_t* v = (*session)->pool().value_at_slot<uint16_t>(layer.layer, slot);
      for (uint32_t i = 0; i < kHeads * kDim; ++i) {
        // fp16 in [1, 2) with random mantissas: no two rows alike.
        k[i] = static_cast<uint16_t>(0x3c00 | (rng() & 0x3ff));
        v[i] = static_cast<uint16_t>(0x3c00 | (rng() & 0x3ff));
      }
    }
  }

  absl::StatusOr<client::CompressResult> compressed;
  std::thread caller([&] {
    client::CompressOptions c;
    c.policy.preset = "codebook";
    c.target = 1.0;
    compressed = (*session)->Compress("s", c);
  });
  auto stub = RawStub((*daemon)->socket_path());
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (Busy(*stub, "s") != "Compress" && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  REQUIRE(Busy(*stub, "s") == "Compress");

  // Generous: the grace period is 1 s and a layer takes well under a second, but the machine
  // may be loaded.
  auto code = (*daemon)->Terminate(SIGTERM, absl::Seconds(20));
  caller.join();
  REQUIRE(code.ok());
  CHECK(*code == 0);
  CHECK_FALSE(compressed.ok());
  INFO(compressed.status().ToString());
  CHECK((compressed.status().code() == absl::StatusCode::kUnavailable ||
         compressed.status().code() == absl::StatusCode::kCancelled));
  const std::string log = (*daemon)->log_contents();
  CHECK_THAT(log, Catch::Contains("\"msg\":\"cachemgrd stopped\""));
}

}  // namespace
}  // namespace cachemgr::testing
