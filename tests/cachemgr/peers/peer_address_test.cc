#include "cachemgr/peers/peer_address.h"

#include <catch2/catch.hpp>

namespace cachemgr {
namespace {

TEST_CASE("peer entries parse into hosts, ports and DNS names", "[cpu]") {
  auto sources = ParsePeerList(" 10.0.0.7:50051, dns:cachemgr-peers.kv.svc:50051 ,,[fd00::2]:7 ");
  REQUIRE(sources.ok());
  REQUIRE(sources->size() == 3);
  CHECK((*sources)[0].host == "10.0.0.7");
  CHECK((*sources)[0].port == 50051);
  CHECK_FALSE((*sources)[0].dns);
  CHECK((*sources)[1].dns);
  CHECK((*sources)[1].host == "cachemgr-peers.kv.svc");
  CHECK((*sources)[1].entry == "dns:cachemgr-peers.kv.svc:50051");
  CHECK((*sources)[2].host == "fd00::2");
  CHECK((*sources)[2].port == 7);
  auto empty = ParsePeerList("");
  REQUIRE(empty.ok());
  CHECK(empty->empty());
}

TEST_CASE("malformed peer entries are refused naming the entry", "[cpu]") {
  for (const auto& [text, why] :
       std::vector<std::pair<std::string, std::string>>{{"node-a", "no port"},
                                                        {"node-a:", "1..65535"},
                                                        {"node-a:65536", "1..65535"},
                                                        {"node-a:0", "1..65535"},
                                                        {":5000", "no host"},
                                                        {"dns::5000", "no host"},
                                                        {"[fd00::1:5000", "unclosed"},
                                                        {"fd00::1:5000", "brackets"},
                                                        {"a:1,b:2,a:1", "listed twice"}}) {
    auto parsed = ParsePeerList(text);
    INFO(text);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(parsed.status().message()), Catch::Contains("--peers entry"));
    CHECK_THAT(std::string(parsed.status().message()), Catch::Contains(why));
  }
  // The same name as a DNS entry and a static one are different entries.
  CHECK(ParsePeerList("a:1,dns:a:1").ok());
}

TEST_CASE("a static entry is its own address; a DNS entry every address of its name", "[cpu]") {
  auto sources = ParsePeerList("10.0.0.7:50051,[fd00::2]:7,dns:localhost:9");
  REQUIRE(sources.ok());
  auto v4 = ResolvePeerSource((*sources)[0]);
  REQUIRE(v4.ok());
  CHECK(*v4 == std::vector<std::string>{"10.0.0.7:50051"});
  auto v6 = ResolvePeerSource((*sources)[1]);
  REQUIRE(v6.ok());
  CHECK(*v6 == std::vector<std::string>{"[fd00::2]:7"});
  auto local = ResolvePeerSource((*sources)[2]);
  REQUIRE(local.ok());
  CHECK_THAT(*local, Catch::VectorContains(std::string("127.0.0.1:9")));
  auto missing = ParsePeerList("dns:no-such-host.invalid:9");
  REQUIRE(missing.ok());
  auto unresolved = ResolvePeerSource((*missing)[0]);
  CHECK(unresolved.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(unresolved.status().message()), Catch::Contains("no-such-host.invalid"));
}

}  // namespace
}  // namespace cachemgr
