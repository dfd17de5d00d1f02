// CacheManager::Step: a scheduler step's allocations, frees, forks and prefix lookups in one call
// do exactly what the per-call Allocate / Free / Fork / MatchPrefix do in the same order (same
// blocks, copies, positions, releases and final tables, on twin managers), each op all or nothing
// with the per-call error, the next ops still applied; the whole step is refused, changing nothing,
// only for the session, too many ops, or a reply that could be too large.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/prefix_store.h"

namespace cachemgr {
namespace {

ModelSpec Model() {
  ModelSpec m;
  m.name = "step";
  m.num_layers = 3;
  m.num_q_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim = 4;
  m.dtype = DType::kFp16;
  m.block_size = 4;
  return m;
}

struct Fixture {
  explicit Fixture(uint32_t max_step_ops = 4096)
      : manager(Options(max_step_ops), &backend, &clock, nullptr) {
    auto a = manager.Attach({"a", Model(), 32, 4096});
    REQUIRE(a.ok());
    token = a->session_token;
  }
  static CacheManagerOptions Options(uint32_t max_step_ops) {
    CacheManagerOptions o;
    o.max_step_ops = max_step_ops;
    return o;
  }
  HostBackend backend;
  FakeClock clock;
  CacheManager manager;
  std::string token;
};

StepOp Alloc(std::string id, uint32_t n) {
  return {StepOp::Kind::kAllocate, std::move(id), "", n, {}};
}
StepOp Free(std::string id) { return {StepOp::Kind::kFree, std::move(id), "", 0, {}}; }
StepOp Fork(std::string parent, std::string child) {
  return {StepOp::Kind::kFork, std::move(parent), std::move(child), 0, {}};
}
StepOp Match(std::vector<std::string> hashes) {
  return {StepOp::Kind::kMatchPrefix, "", "", 0, std::move(hashes)};
}

// The same op through the per-call API, as a StepOpResult.
StepOpResult PerCall(CacheManager& m, const std::string& token, const StepOp& op) {
  StepOpResult out;
  switch (op.kind) {
    case StepOp::Kind::kAllocate: {
      auto r = m.Allocate(token, op.sequence_id, op.num_new_tokens);
      if (r.ok()) {
        out.allocate = *r;
      } else {
        out.status = r.status();
      }
      break;
    }
    case StepOp::Kind::kFree: {
      auto r = m.Free(token, op.sequence_id);
      if (r.ok()) {
        out.blocks_released = *r;
      } else {
        out.status = r.status();
      }
      break;
    }
    case StepOp::Kind::kFork:
      out.status = m.Fork(token, op.sequence_id, op.child_sequence_id).status();
      break;
    case StepOp::Kind::kMatchPrefix: {
      auto r = m.MatchPrefix(token, op.block_hashes);
      if (r.ok()) {
        out.matched_blocks = *r;
      } else {
        out.status = r.status();
      }
      break;
    }
  }
  return out;
}

// Every sequence's tables, for comparing two managers.
std::vector<std::string> Tables(CacheManager& m, const std::string& token) {
  std::vector<std::string> out;
  auto page = m.ListSequencesPage(token, "", 1000);
  REQUIRE(page.ok());
  for (const auto& s : page->sequences) {
    auto snap = m.GetSequence(token, s.sequence_id, false);
    REQUIRE(snap.ok());
    std::string line = absl::StrCat(s.sequence_id, " positions=", snap->num_positions);
    for (const auto& l : snap->layers) {
      absl::StrAppend(&line, " |", l.num_tokens, ":");
      for (uint32_t b : l.block_ids) absl::StrAppend(&line, " ", b);
    }
    out.push_back(line);
  }
  return out;
}

TEST_CASE("a step does what the per-call ops do, in order, each with its own status", "[cpu]") {
  Fixture step, calls;
  // Two steps of a scheduler: prompts, a fork (beam), decode appends that copy shared tails,
  // a free that makes room, and failures in between that change nothing.
  const std::vector<std::vector<StepOp>> steps = {
      {Alloc("r1", 10), Alloc("r2", 7), Fork("r1", "r1-beam"), Alloc("r3", 0), Alloc("r1", 1),
       Free("nobody"), Fork("r2", "r1")},
      {Alloc("r1-beam", 1), Alloc("r2", 1), Free("r2"), Alloc("r4", 200), Alloc("r4", 20),
       Fork("ghost", "g2"), Alloc("r1", 3)},
  };
  for (const auto& ops : steps) {
    auto results = step.manager.Step(step.token, ops, /*include_slot_mapping=*/true);
    REQUIRE(results.ok());
    REQUIRE(results->size() == ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      CAPTURE(i, ops[i].sequence_id);
      const StepOpResult want = PerCall(calls.manager, calls.token, ops[i]);
      const StepOpResult& got = (*results)[i];
      CHECK(got.status == want.status);
      CHECK(got.blocks_released == want.blocks_released);
      CHECK(got.matched_blocks == want.matched_blocks);
      CHECK(got.allocate.created == want.allocate.created);
      CHECK(got.allocate.first_position == want.allocate.first_position);
      CHECK(got.allocate.num_positions == want.allocate.num_positions);
      REQUIRE(got.allocate.layers.size() == want.allocate.layers.size());
      for (size_t l = 0; l < got.allocate.layers.size(); ++l) {
        CHECK(got.allocate.layers[l].new_block_ids == want.allocate.layers[l].new_block_ids);
        CHECK(got.allocate.layers[l].slot_mapping == want.allocate.layers[l].slot_mapping);
        CHECK(got.allocate.layers[l].num_tokens == want.allocate.layers[l].num_tokens);
        REQUIRE(got.allocate.layers[l].copies.size() == want.allocate.layers[l].copies.size());
        for (size_t c = 0; c < got.allocate.layers[l].copies.size(); ++c) {
          CHECK(got.allocate.layers[l].copies[c].src == want.allocate.layers[l].copies[c].src);
          CHECK(got.allocate.layers[l].copies[c].dst == want.allocate.layers[l].copies[c].dst);
        }
      }
    }
    CHECK(Tables(step.manager, step.token) == Tables(calls.manager, calls.token));
    REQUIRE(step.manager.CheckInvariants().ok());
  }
  // The failures are the per-call ones, naming the field.
  auto again =
      step.manager.Step(step.token,
                        std::vector<StepOp>{Alloc("r3", 0), Free("nobody"), Fork("r2-gone", "x"),
                                            Fork("r1", "r1-beam"), Alloc("r1", 1000)},
                        false);
  REQUIRE(again.ok());
  CHECK((*again)[0].status.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string((*again)[0].status.message()), Catch::Contains("num_new_tokens"));
  CHECK((*again)[1].status.code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string((*again)[1].status.message()), Catch::Contains("sequence_id"));
  CHECK((*again)[2].status.code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string((*again)[2].status.message()), Catch::Contains("parent_sequence_id"));
  CHECK((*again)[3].status.code() == absl::StatusCode::kAlreadyExists);
  CHECK((*again)[4].status.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(step.manager.CheckInvariants().ok());
}

TEST_CASE("a step's prefix lookups answer what MatchPrefix answers, among its other ops", "[cpu]") {
  Fixture step, calls;
  for (Fixture* f : {&step, &calls}) {
    REQUIRE(f->manager.Allocate(f->token, "prompt", 12).ok());
    REQUIRE(f->manager.StorePrefix(f->token, "prompt", 0, {"h0", "h1", "h2"}).ok());
  }
  const std::string too_long(PrefixStore::kMaxHashBytes + 1, 'x');
  // A scheduler step: lookups for waiting requests (a full hit, a partial one, a miss, bad
  // hashes), the admitted request's allocation and a finished request's free in between.
  const std::vector<StepOp> ops = {Match({"h0", "h1", "h2"}),
                                   Match({"h0", "h1", "other", "h2"}),
                                   Alloc("r1", 9),
                                   Match({"nope"}),
                                   Match({}),
                                   Match({"h0", too_long}),
                                   Free("prompt"),
                                   Match({"h0", "h1", "h2", "h3"})};
  auto results = step.manager.Step(step.token, ops, false);
  REQUIRE(results.ok());
  REQUIRE(results->size() == ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    CAPTURE(i);
    const StepOpResult want = PerCall(calls.manager, calls.token, ops[i]);
    CHECK((*results)[i].status == want.status);
    CHECK((*results)[i].matched_blocks == want.matched_blocks);
  }
  CHECK((*results)[0].matched_blocks == 3);
  CHECK((*results)[1].matched_blocks == 2);
  CHECK((*results)[3].matched_blocks == 0);
  CHECK((*results)[4].status.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string((*results)[4].status.message()), Catch::Contains("block_hashes"));
  CHECK((*results)[5].status.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string((*results)[5].status.message()), Catch::Contains("block_hashes[1]"));
  CHECK((*results)[7].matched_blocks == 3);  // the store keeps them after the sequence
  CHECK(Tables(step.manager, step.token) == Tables(calls.manager, calls.token));
  REQUIRE(step.manager.CheckInvariants().ok());

  // One lookup over MatchPrefix's bound is that op's error; lookups over it together, the
  // step's (nothing applied).
  const std::vector<std::string> half(kMaxPrefixHashesPerCall / 2 + 1, "h0");
  const std::vector<std::string> over(kMaxPrefixHashesPerCall + 1, "h0");
  auto alone =
      step.manager.Step(step.token, std::vector<StepOp>{Match(over), Alloc("r2", 1)}, false);
  REQUIRE(alone.ok());
  CHECK((*alone)[0].status == PerCall(calls.manager, calls.token, Match(over)).status);
  CHECK((*alone)[1].status.ok());
  auto together = step.manager.Step(
      step.token, std::vector<StepOp>{Match(half), Alloc("r3", 1), Match(half)}, false);
  REQUIRE(together.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(together.status().message()), Catch::Contains("ops"));
  CHECK_THAT(std::string(together.status().message()),
             Catch::Contains(absl::StrCat(2 * half.size(), " block hashes")));
  CHECK_FALSE(step.manager.GetSequence(step.token, "r3", false).ok());
  REQUIRE(step.manager.CheckInvariants().ok());
}

TEST_CASE("a step lists only new blocks and copies unless slot mappings are asked for", "[cpu]") {
  Fixture f;
  auto first = f.manager.Step(f.token, std::vector<StepOp>{Alloc("s", 5)}, false);
  REQUIRE(first.ok());
  const AllocateResult& a = (*first)[0].allocate;
  REQUIRE(a.layers.size() == 3);
  for (const auto& l : a.layers) {
    CHECK(l.new_block_ids.size() == 2);  // 5 tokens in blocks of 4
    CHECK(l.slot_mapping.empty());
    CHECK(l.num_tokens == 5);
  }
  // One more token fits the tail block: nothing new in any layer.
  auto second = f.manager.Step(f.token, std::vector<StepOp>{Alloc("s", 1)}, false);
  REQUIRE(second.ok());
  for (const auto& l : (*second)[0].allocate.layers) {
    CHECK(l.new_block_ids.empty());
    CHECK(l.copies.empty());
  }
  // With slot mappings: the slots the block table implies.
  auto third = f.manager.Step(f.token, std::vector<StepOp>{Alloc("s", 3)}, true);
  REQUIRE(third.ok());
  auto snap = f.manager.GetSequence(f.token, "s", false);
  REQUIRE(snap.ok());
  for (uint32_t l = 0; l < 3; ++l) {
    const auto& layer = (*third)[0].allocate.layers[l];
    REQUIRE(layer.slot_mapping.size() == 3);
    for (uint32_t i = 0; i < 3; ++i) {
      const uint32_t t = 6 + i;
      CHECK(layer.slot_mapping[i] == int64_t{snap->layers[l].block_ids[t / 4]} * 4 + t % 4);
    }
  }
}

TEST_CASE("a whole step is refused only for the session, too many ops or its reply size", "[cpu]") {
  Fixture f(/*max_step_ops=*/8);
  REQUIRE(f.manager.Allocate(f.token, "kept", 3).ok());
  const StatsSnapshot before = f.manager.Stats();
  std::vector<StepOp> nine(9, Alloc("n", 1));
  auto many = f.manager.Step(f.token, nine, false);
  REQUIRE(many.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(many.status().message()), Catch::Contains("ops holds 9 ops"));
  auto stranger =
      f.manager.Step(std::string("not-a-token"), std::vector<StepOp>{Free("kept")}, false);
  CHECK_FALSE(stranger.ok());
  // A reply that could exceed max_reply_bytes (1M-token allocations with slot mappings).
  auto huge = f.manager.Step(f.token, std::vector<StepOp>(8, Alloc("h", 1u << 20)), true);
  REQUIRE(huge.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(huge.status().message()), Catch::Contains("Step of 8 ops"));
  CHECK(f.manager.Stats().memory_used_bytes == before.memory_used_bytes);
  auto seqs = f.manager.ListSequencesPage(f.token, "", 100);
  REQUIRE(seqs.ok());
  REQUIRE(seqs->sequences.size() == 1);
  CHECK(seqs->sequences[0].sequence_id == "kept");
  REQUIRE(f.manager.CheckInvariants().ok());
}

TEST_CASE("a step's frees make room for the allocations after them", "[cpu]") {
  Fixture f;
  // 32 blocks of 4 tokens per layer: 31 blocks taken, then a step frees them and allocates 30.
  REQUIRE(f.manager.Allocate(f.token, "big", 124).ok());
  auto refused =
      f.manager.Step(f.token, std::vector<StepOp>{Alloc("next", 120), Free("big")}, false);
  REQUIRE(refused.ok());
  CHECK((*refused)[0].status.code() == absl::StatusCode::kResourceExhausted);
  CHECK((*refused)[1].blocks_released == 3 * 31);
  auto fits = f.manager.Step(f.token, std::vector<StepOp>{Alloc("next", 120)}, false);
  REQUIRE(fits.ok());
  CHECK((*fits)[0].status.ok());
  CHECK((*fits)[0].allocate.created);
  REQUIRE(f.manager.CheckInvariants().ok());
}

}  // namespace
}  // namespace cachemgr
