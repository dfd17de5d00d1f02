#include "cachemgr/service/session_calls.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/service/proto_convert.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

absl::Status HeartbeatCall(CacheManager& manager, const Caller& caller,
                           const v1::HeartbeatRequest& request, v1::HeartbeatResponse* response) {
  (void)request;  // the token is in `caller`
  ASSIGN_OR_RETURN(absl::Duration left, manager.Heartbeat(caller));
  response->set_lease_remaining_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(left)));
  response->set_boot_id(manager.boot_id());
  return absl::OkStatus();
}

absl::Status AllocateCall(CacheManager& manager, const Caller& caller,
                          const v1::AllocateRequest& request, v1::AllocateResponse* response) {
  ASSIGN_OR_RETURN(AllocateResult r,
                   manager.Allocate(caller, request.sequence_id(), request.num_new_tokens()));
  AllocateResultToProto(request.sequence_id(), r, response);
  return absl::OkStatus();
}

absl::Status FreeCall(CacheManager& manager, const Caller& caller, const v1::FreeRequest& request,
                      v1::FreeResponse* response) {
  ASSIGN_OR_RETURN(uint64_t released, manager.Free(caller, request.sequence_id()));
  response->set_blocks_released(released);
  return absl::OkStatus();
}

absl::Status ForkCall(CacheManager& manager, const Caller& caller, const v1::ForkRequest& request,
                      v1::ForkResponse* response) {
  ASSIGN_OR_RETURN(SequenceSnapshot child,
                   manager.Fork(caller, request.parent_sequence_id(), request.child_sequence_id()));
  SequenceToProto(child, response->mutable_child());
  return absl::OkStatus();
}

absl::Status StepCall(CacheManager& manager, const Caller& caller, const v1::StepRequest& request,
                      v1::StepResponse* response) {
  std::vector<StepOp> ops(request.ops_size());
  for (int i = 0; i < request.ops_size(); ++i) {
    const v1::StepOp& in = request.ops(i);
    StepOp& op = ops[i];
    switch (in.op_case()) {
      case v1::StepOp::kAllocate:
        op.kind = StepOp::Kind::kAllocate;
        op.sequence_id = in.allocate().sequence_id();
        op.num_new_tokens = in.allocate().num_new_tokens();
        break;
      case v1::StepOp::kFree:
        op.kind = StepOp::Kind::kFree;
        op.sequence_id = in.free();
        break;
      case v1::StepOp::kFork:
        op.kind = StepOp::Kind::kFork;
        op.sequence_id = in.fork().parent_sequence_id();
        op.child_sequence_id = in.fork().child_sequence_id();
        break;
      case v1::StepOp::kMatchPrefix:
        op.kind = StepOp::Kind::kMatchPrefix;
        op.block_hashes.assign(in.match_prefix().block_hashes().begin(),
                               in.match_prefix().block_hashes().end());
        break;
      case v1::StepOp::OP_NOT_SET:
        return absl::InvalidArgumentError(
            absl::StrCat("ops[", i, "] holds none of allocate, free, fork, match_prefix"));
    }
  }
  ASSIGN_OR_RETURN(std::vector<StepOpResult> results,
                   manager.Step(caller, ops, request.include_slot_mapping()));
  StepResultsToProto(ops, results, request.include_slot_mapping(), response);
  return absl::OkStatus();
}

}  // namespace cachemgr
