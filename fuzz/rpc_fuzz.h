// One fuzz target per RPC of cachemgr.v1.CacheManager: the input, parsed as that RPC's request,
// is sent to the in-process service (service_harness.h) in its fixture state. Bytes that do not
// parse are sent as they are (what gRPC makes of a malformed request).
//
// Oracles besides the sanitizers, after every call: CacheManager::CheckInvariants() and the
// stats add up (ServiceHarness::CheckSane); a failed call changed nothing and says why; a
// successful call changed no sequence it did not name (block tables and KV digests), and its
// response is consistent with the request (per RPC, see rpc_fuzz.cc).
#pragma once

#include <cstddef>
#include <cstdint>

namespace cachemgr::fuzz {

enum class Rpc {
  kAttach,
  kHeartbeat,
  kDetach,
  kAllocate,
  kFree,
  kFork,
  kStep,
  kGetSequence,
  kListSequences,
  kStats,
  kCompress,
  kFinishCompress,
  kFetch,
  kPark,
  kWatch,
  kStorePrefix,
  kMatchPrefix,
  kLoadPrefix,
};

// Runs one input; the return value is LLVMFuzzerTestOneInput's.
int FuzzRpc(Rpc rpc, const uint8_t* data, size_t size);

}  // namespace cachemgr::fuzz
