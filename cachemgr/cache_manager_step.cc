// CacheManager::Step: a scheduler step's allocations, frees, forks and prefix lookups under one
// acquisition of the manager's lock (docs/PERF.md "Step").
#include "absl/strings/str_cat.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/reply_size.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

using cache_manager_internal::CheckPrefixHashes;
using cache_manager_internal::LeadingPrefixHits;

namespace {

// The op's status with a message cut to what the reply bound allows.
absl::Status Bounded(const absl::Status& s) {
  if (s.message().size() <= reply_size::kMaxStepMessageBytes) return s;
  return absl::Status(s.code(), s.message().substr(0, reply_size::kMaxStepMessageBytes));
}

}  // namespace

absl::StatusOr<std::vector<StepOpResult>> CacheManager::Step(const Caller& caller,
                                                             absl::Span<const StepOp> ops,
                                                             bool include_slot_mapping) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  if (ops.size() > options_.max_step_ops) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops holds ", ops.size(), " ops; a Step carries at most ", options_.max_step_ops));
  }
  // The lookups' hashes together are bounded as one MatchPrefix's; a lookup over the bound on
  // its own is that op's error (the one MatchPrefix answers), not the step's.
  size_t hashes = 0;
  for (const StepOp& op : ops) {
    if (op.kind == StepOp::Kind::kMatchPrefix &&
        op.block_hashes.size() <= kMaxPrefixHashesPerCall) {
      hashes += op.block_hashes.size();
    }
  }
  if (hashes > kMaxPrefixHashesPerCall) {
    return absl::InvalidArgumentError(absl::StrCat("ops: the prefix lookups hold ", hashes,
                                                   " block hashes together; a Step "
                                                   "carries at most ",
                                                   kMaxPrefixHashesPerCall,
                                                   ", as one MatchPrefix"));
  }
  const Pool& pool = *client->pool;
  uint64_t reply = 0;
  for (const StepOp& op : ops) {
    reply = SaturatingAdd(reply, reply_size::StepResultBytes(
                                     pool.model.num_layers,
                                     op.kind == StepOp::Kind::kAllocate ? op.num_new_tokens : 0,
                                     pool.num_blocks, pool.model.block_size, include_slot_mapping));
  }
  RETURN_IF_ERROR(
      CheckReplyBytes(reply, absl::StrCat("a Step of ", ops.size(), " ops",
                                          include_slot_mapping ? " with slot mappings" : "")));
  std::vector<StepOpResult> results(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const StepOp& op = ops[i];
    StepOpResult& out = results[i];
    switch (op.kind) {
      case StepOp::Kind::kAllocate: {
        absl::StatusOr<AllocateResult> r =
            AllocateLocked(*client, op.sequence_id, op.num_new_tokens, include_slot_mapping);
        if (r.ok()) {
          out.allocate = *std::move(r);
        } else {
          out.status = Bounded(r.status());
        }
        break;
      }
      case StepOp::Kind::kFree: {
        absl::StatusOr<Sequence*> seq =
            FindOwnedSequenceLocked(*client, op.sequence_id, "sequence_id");
        if (seq.ok()) {
          out.blocks_released = FreeLocked(**seq, /*by_operator=*/false);
        } else {
          out.status = Bounded(seq.status());
        }
        break;
      }
      case StepOp::Kind::kFork: {
        absl::StatusOr<Sequence*> child =
            ForkLocked(*client, op.sequence_id, op.child_sequence_id, /*reply=*/false);
        if (!child.ok()) out.status = Bounded(child.status());
        break;
      }
      case StepOp::Kind::kMatchPrefix: {
        if (absl::Status s = CheckPrefixHashes(op.block_hashes); !s.ok()) {
          out.status = Bounded(s);
        } else {
          out.matched_blocks = LeadingPrefixHits(pool.prefixes, op.block_hashes);
        }
        break;
      }
    }
  }
  return results;
}

}  // namespace cachemgr
