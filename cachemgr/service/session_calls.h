// The bodies of the session's bookkeeping calls (Heartbeat, Allocate, Free, Fork, Step): request
// message in, response message or error status out. The gRPC service and the fast path
// (fast_path_server.h) both call these, so a call answers the same whichever way it came.
#pragma once

#include "absl/status/status.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/caller.h"
#include "cachemgr/v1/cachemgr.pb.h"

namespace cachemgr {

absl::Status HeartbeatCall(CacheManager& manager, const Caller& caller,
                           const v1::HeartbeatRequest& request, v1::HeartbeatResponse* response);
absl::Status AllocateCall(CacheManager& manager, const Caller& caller,
                          const v1::AllocateRequest& request, v1::AllocateResponse* response);
absl::Status FreeCall(CacheManager& manager, const Caller& caller, const v1::FreeRequest& request,
                      v1::FreeResponse* response);
absl::Status ForkCall(CacheManager& manager, const Caller& caller, const v1::ForkRequest& request,
                      v1::ForkResponse* response);
absl::Status StepCall(CacheManager& manager, const Caller& caller, const v1::StepRequest& request,
                      v1::StepResponse* response);

}  // namespace cachemgr
