// CacheManager against a tenant that multiplies sequences: every sequence's bookkeeping, and the
// block tables a Fork duplicates, are charged to the memory budget (a fork flood ends in
// RESOURCE_EXHAUSTED instead of unbounded daemon memory), and ListSequences answers in pages.
#include <catch2/catch.hpp>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"

namespace cachemgr {
namespace {

ModelSpec Deep() {
  ModelSpec m;
  m.name = "deep";
  m.num_layers = 32;
  m.num_q_heads = 1;
  m.num_kv_heads = 1;
  m.head_dim = 2;
  m.dtype = DType::kFp16;
  m.block_size = 1;
  return m;
}

struct Fixture {
  explicit Fixture(uint64_t budget) : manager(Options(budget), &backend, &clock, nullptr) {}
  static CacheManagerOptions Options(uint64_t budget) {
    CacheManagerOptions o;
    o.memory_budget_bytes = budget;
    return o;
  }
  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
};

Caller Operator() {
  Caller op;
  op.operator_credential = true;
  return op;
}

TEST_CASE("a fork flood is charged to the budget and ends in RESOURCE_EXHAUSTED", "[cpu]") {
  // 32 layers of 256 one-token blocks; a parent holding all of them duplicates 8192 block-table
  // entries (32 KiB) per fork.
  Fixture f(uint64_t{8} << 20);
  auto a = f.manager.Attach({"a", Deep(), 256, 4096});
  REQUIRE(a.ok());
  REQUIRE(f.manager.Allocate(a->session_token, "parent", 256).ok());
  const uint64_t before = f.manager.Stats().memory_used_bytes;

  uint32_t forks = 0;
  absl::Status refused;
  for (; forks < 100000; ++forks) {
    auto child = f.manager.Fork(a->session_token, "parent", absl::StrCat("f", forks));
    if (!child.ok()) {
      refused = child.status();
      break;
    }
  }
  INFO("forks accepted: " << forks);
  REQUIRE(refused.code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains("child_sequence_id") && Catch::Contains("memory budget"));
  // Each fork cost at least its 32 KiB of duplicated entries.
  const StatsSnapshot full = f.manager.Stats();
  CHECK(full.memory_used_bytes <= full.memory_budget_bytes);
  CHECK(full.memory_used_bytes - before >= uint64_t{forks} * 8192 * sizeof(uint32_t));
  CHECK(forks < 256);
  REQUIRE(f.manager.CheckInvariants().ok());

  // Freeing the forks gives every byte back.
  for (uint32_t i = 0; i < forks; ++i) {
    REQUIRE(f.manager.Free(a->session_token, absl::StrCat("f", i)).ok());
  }
  CHECK(f.manager.Stats().memory_used_bytes == before);
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Detach(a->session_token).ok());
  CHECK(f.manager.Stats().memory_used_bytes == 0);
}

TEST_CASE("new sequences are charged, and refused once the budget is spent", "[cpu]") {
  Fixture f(uint64_t{1} << 20);
  auto a = f.manager.Attach({"a", Deep(), 64, 4096});
  REQUIRE(a.ok());
  const uint64_t before = f.manager.Stats().memory_used_bytes;
  REQUIRE(f.manager.Allocate(a->session_token, "s", 1).ok());
  CHECK(f.manager.Stats().memory_used_bytes > before);
  REQUIRE(f.manager.CheckInvariants().ok());
  REQUIRE(f.manager.Free(a->session_token, "s").ok());
  CHECK(f.manager.Stats().memory_used_bytes == before);
}

TEST_CASE("ListSequences answers in pages sorted by id", "[cpu]") {
  Fixture f(uint64_t{1} << 30);
  ModelSpec m = Deep();
  m.num_layers = 1;
  auto a = f.manager.Attach({"a", m, 16, 4096});
  REQUIRE(a.ok());
  REQUIRE(f.manager.Allocate(a->session_token, "p", 1).ok());
  for (int i = 0; i < 2500; ++i) {
    REQUIRE(f.manager.Fork(a->session_token, "p", absl::StrCat("c", 10000 + i)).ok());
  }
  for (const Caller& caller : {Caller(a->session_token), Operator()}) {
    std::set<std::string> seen;
    std::string token;
    int pages = 0;
    std::string last;
    do {
      auto page = f.manager.ListSequencesPage(caller, token, 0);
      REQUIRE(page.ok());
      ++pages;
      CHECK(page->sequences.size() <= CacheManager::kDefaultListPageSize);
      for (const SequenceSummary& s : page->sequences) {
        CHECK(s.sequence_id > last);  // sorted, no repeats across pages
        last = s.sequence_id;
        seen.insert(s.sequence_id);
      }
      token = page->next_page_token;
    } while (!token.empty());
    CHECK(pages == 3);
    CHECK(seen.size() == 2501);
  }
  auto small = f.manager.ListSequencesPage(a->session_token, "c10999", 2);
  REQUIRE(small.ok());
  REQUIRE(small->sequences.size() == 2);
  CHECK(small->sequences[0].sequence_id == "c11000");
  CHECK(small->next_page_token == "c11001");

  auto too_big =
      f.manager.ListSequencesPage(a->session_token, "", CacheManager::kMaxListPageSize + 1);
  CHECK(too_big.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(too_big.status().message()), Catch::StartsWith("page_size"));
  auto bad_token = f.manager.ListSequencesPage(a->session_token, std::string(300, 'x'), 0);
  CHECK(bad_token.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(bad_token.status().message()), Catch::StartsWith("page_token"));
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
