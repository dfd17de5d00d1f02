// ServiceHarness: cachemgrd's request handlers in process, for the request-handler fuzz targets.
//
// A CacheManager on the host backend (a FakeClock, so leases expire only when a target advances
// it) behind the real CacheManagerService, served by a gRPC server with no listening port and
// called through its in-process channel: every request goes through gRPC's deserialization, the
// handlers, the conversions and the reactors (the heavy calls on the service's worker pool),
// exactly as a request from a socket would after the transport.
//
// Reset() puts the daemon back into the fixture state before each input, so that every input
// is reproducible on its own:
//   pool "fuzz-model": 2 layers, 4 query / 2 KV heads, head_dim 8, fp32, block_size 4,
//   64 blocks; its memory filled with rows that share a few directions (codebooks merge some).
//   client "0": s0 (10 tokens), s1 (fork of s0, then 3 more tokens: a copy-on-write tail),
//               c0 (12 tokens, compressed by the codebook preset: codebook layers parked),
//               c1 (12 tokens, compressed by spindlekv on scores, fetched, then 2 more tokens:
//               resident codebook layers with appended rows, what Park codes).
//               b0 (10 tokens, a background Compress by streamingllm whose work is done, then
//               2 more tokens: what FinishCompress applies, the appended rows moved).
//   client "1": t0 (6 tokens).
//   prefix store: "h0", "h1" (s0's two full blocks), "g0" (t0's full block), and "e0", "e1"
//               (the blocks of a freed 8-token sequence: only the store holds them).
// A request's session token of one character "0" or "1" stands for that fixture client's real
// token (the fuzzer cannot guess 128 random bits); any other token is sent as it is.
//
// Adapting to the service's authorization: ResolveToken (session tokens), AuthorizeCall (what an
// in-process call must carry to be let in: today the TCP bearer token, since the in-process
// peer is not a Unix socket) and OperatorCaller (the Caller of inspection calls made directly
// on the manager) are the only places that know how callers are identified.
//
// Not thread-safe: one fuzz input at a time (libFuzzer's default). Built on first use and never
// destroyed (gRPC's threads outlive any static destructor order).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "cachemgr/backend/host_backend.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/caller.h"
#include "cachemgr/event_hub.h"
#include "cachemgr/service/cachemgr_service.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/util/clock.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"

namespace cachemgr::fuzz {

inline constexpr int kFixtureClients = 2;

class ServiceHarness {
 public:
  static ServiceHarness& Get();

  // Detaches every client (releasing every pool) and rebuilds the fixture state above.
  void Reset();
  // Detaches every client, releasing every pool: called when an input is done, so that what it
  // allocated is freed within it (libFuzzer re-runs an input to look for leaks otherwise).
  void Clear();

  // ---- how callers are identified (the places to adapt) ----
  // "0" / "1": the fixture client's real token; anything else unchanged.
  std::string ResolveToken(const std::string& token) const;
  // Adds to `ctx` the operator credential when `as_operator` (a call without a session token
  // stands for an operator's, as cachemgrctl's); other calls are a tenant's.
  void AuthorizeCall(grpc::ClientContext* ctx, bool as_operator) const;
  // The Caller of an operator's inspection call on the manager (all sequences, any client).
  static Caller OperatorCaller();

  // A unary call of `method` ("Attach", ...) with `request` (serialized, or any bytes), through
  // the in-process channel. The response's bytes go to `response` when the call succeeds.
  grpc::Status CallUnary(const std::string& method, const std::string& request,
                         std::string* response, bool as_operator);

  v1::CacheManager::Stub& stub() { return *stub_; }
  CacheManager& manager() { return *manager_; }
  EventHub& events() { return events_; }
  FakeClock& clock() { return clock_; }
  const CacheManagerOptions& options() const { return options_; }
  const std::string& token(int client) const { return tokens_[client]; }
  // The fixture pool as its clients' Attach described it.
  const PoolDescription& fixture_pool() const { return fixture_pool_; }

  // Aborts (Fail) unless CheckInvariants() holds and the stats add up: per layer used + free
  // blocks equal capacity, shared <= used, the pools' bytes (stored prefixes included) sum to
  // the memory in use, which is within the budget.
  void CheckSane() const;

  // Waits (bounded) until the background Compress of `sequence_id`, if any, is done working:
  // the state a snapshot sees then changes only through calls.
  void SettleBackground(const std::string& sequence_id) const;

  // Every sequence as the operator sees it (block tables, compression state and the KV digest
  // of every layer), by id.
  std::map<std::string, std::string> Sequences() const;
  // Everything a failed call must leave as it was: Sequences(), the clients (leases excluded)
  // and the pools with their occupancy.
  std::string StateDigest() const;

 private:
  ServiceHarness();
  // Writes the fixture's row pattern over the whole pool and random scores into client 0's
  // input buffer.
  void FillMemory();

  const CacheManagerOptions options_;
  FakeClock clock_;
  EventHub events_;
  HostBackend backend_;
  std::unique_ptr<CacheManager> manager_;
  std::string operator_token_dir_;
  std::unique_ptr<OperatorToken> operator_token_;
  std::string operator_credential_;  // what the file holds
  std::unique_ptr<CacheManagerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::CacheManager::Stub> stub_;
  std::unique_ptr<grpc::GenericStub> generic_;
  std::string tokens_[kFixtureClients];
  PoolDescription fixture_pool_;
};

// Checks that a call changed only what it may. `before` / `after`: Sequences() around the call.
// A sequence in `named` may change or disappear; with `others_may_vanish` (Detach, lease
// expiry) any sequence may disappear; every other sequence present before must be present after
// with the same block tables and KV digests. Aborts (Fail) naming `call` otherwise.
void CheckOnlyNamedChanged(const char* call, const std::map<std::string, std::string>& before,
                           const std::map<std::string, std::string>& after,
                           const std::set<std::string>& named, bool others_may_vanish);

}  // namespace cachemgr::fuzz
