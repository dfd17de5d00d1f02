#include "cachemgr/metrics/metrics_endpoint.h"

#include <catch2/catch.hpp>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "tests/support/http_client.h"

namespace cachemgr {
namespace {

using testing::HttpRequest;

struct Fixture {
  Fixture() {
    prometheus::BuildCounter()
        .Name("test_things_total")
        .Help("Things.")
        .Register(*registry)
        .Add({{"kind", "a"}})
        .Increment(7);
    auto started = MetricsEndpoint::Start("127.0.0.1:0", {registry});
    REQUIRE(started.ok());
    endpoint = std::move(*started);
  }

  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsEndpoint> endpoint;
};

TEST_CASE("GET /metrics serves the collectables in the text format", "[cpu]") {
  Fixture f;
  REQUIRE(f.endpoint->port() > 0);
  auto response = HttpRequest(f.endpoint->port(), "GET", "/metrics");
  REQUIRE(response.ok());
  CHECK_THAT(*response, Catch::StartsWith("HTTP/1.1 200 OK\r\n"));
  CHECK_THAT(*response, Catch::Contains("\r\nContent-Type: text/plain"));
  CHECK_THAT(*response, Catch::Contains("\n# TYPE test_things_total counter\n"));
  CHECK_THAT(*response, Catch::Contains("\ntest_things_total{kind=\"a\"} 7\n"));
  CHECK_THAT(*response, Catch::Contains("\n# TYPE exposer_scrapes_total counter\n"));
}

TEST_CASE("other paths are 404, other methods 405", "[cpu]") {
  Fixture f;
  const int port = f.endpoint->port();
  auto other = HttpRequest(port, "GET", "/other");
  REQUIRE(other.ok());
  CHECK_THAT(*other, Catch::Matches("HTTP/1\\.[01] 404 [^]*"));
  for (const char* method : {"POST", "HEAD", "PUT", "DELETE"}) {
    CAPTURE(method);
    auto refused = HttpRequest(port, method, "/metrics");
    REQUIRE(refused.ok());
    CHECK_THAT(*refused, Catch::StartsWith("HTTP/1.1 405 Method Not Allowed\r\n"));
    CHECK_THAT(*refused, Catch::Contains("\r\nAllow: GET\r\n"));
    CHECK(refused->find("test_things_total") == std::string::npos);
  }
}

TEST_CASE("bad addresses are refused with the reason", "[cpu]") {
  std::vector<std::weak_ptr<prometheus::Collectable>> none;
  for (const char* address : {"nohostport", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1",
                              "127.0.0.1:http", "no-such-host.invalid:0"}) {
    CAPTURE(address);
    auto started = MetricsEndpoint::Start(address, none);
    CHECK(started.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(started.status().message()), Catch::Contains("--metrics_address"));
  }
  Fixture f;
  auto taken = MetricsEndpoint::Start(absl::StrCat("127.0.0.1:", f.endpoint->port()), none);
  CHECK(taken.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(taken.status().message()), Catch::Contains("Address already in use"));
}

TEST_CASE("an empty host listens on every interface", "[cpu]") {
  auto registry = std::make_shared<prometheus::Registry>();
  auto started = MetricsEndpoint::Start(":0", {registry});
  REQUIRE(started.ok());
  auto response = HttpRequest((*started)->port(), "GET", "/metrics");
  REQUIRE(response.ok());
  CHECK_THAT(*response, Catch::StartsWith("HTTP/1.1 200 OK\r\n"));
}

TEST_CASE("Stop closes the port; it is idempotent", "[cpu]") {
  Fixture f;
  const int port = f.endpoint->port();
  f.endpoint->Stop();
  CHECK(testing::ConnectLoopback(port).status().code() == absl::StatusCode::kUnavailable);
  f.endpoint->Stop();
}

}  // namespace
}  // namespace cachemgr
