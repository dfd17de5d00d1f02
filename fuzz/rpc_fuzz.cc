#include "fuzz/rpc_fuzz.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/service_harness.h"

namespace cachemgr::fuzz {
namespace {

// ---- what each request names ----------------------------------------------------------------

template <typename Request>
void ResolveTokens(const ServiceHarness& h, Request* request) {
  if constexpr (requires { request->session_token(); }) {
    request->set_session_token(h.ResolveToken(request->session_token()));
  }
}

// The sequences a request may change or remove.
template <typename Request>
std::set<std::string> Named(const Request& request) {
  std::set<std::string> named;
  if constexpr (requires { request.sequence_id(); }) named.insert(request.sequence_id());
  if constexpr (requires { request.parent_sequence_id(); }) {
    named.insert(request.parent_sequence_id());
    named.insert(request.child_sequence_id());
  }
  if constexpr (std::is_same_v<Request, v1::StepRequest>) {
    for (const v1::StepOp& op : request.ops()) {
      named.insert(op.allocate().sequence_id());
      named.insert(op.free());
      named.insert(op.fork().parent_sequence_id());
      named.insert(op.fork().child_sequence_id());
    }
  }
  return named;
}

// ---- per-RPC checks of a successful call ----------------------------------------------------

uint32_t DTypeBytes(v1::DType dtype) { return dtype == v1::DTYPE_FP32 ? 4 : 2; }

void CheckResponse(const v1::AttachRequest&, const v1::AttachResponse& r) {
  Check(r.session_token().size() >= 32, "Attach returned a short session token");
  const v1::PoolDescriptor& pool = r.pool();
  const v1::ModelSpec& m = pool.model();
  Check(static_cast<uint32_t>(pool.layers_size()) == m.num_layers(),
        absl::StrCat("Attach described ", pool.layers_size(), " layers of ", m.num_layers()));
  // 2 * num_blocks * block_size * kv_heads * head_dim * dtype, without wrapping.
  uint64_t layer_bytes = 2;
  for (uint64_t factor :
       {uint64_t{pool.num_blocks()}, uint64_t{m.block_size()}, uint64_t{m.num_kv_heads()},
        uint64_t{m.head_dim()}, uint64_t{DTypeBytes(m.dtype())}}) {
    Check(!__builtin_mul_overflow(layer_bytes, factor, &layer_bytes),
          "Attach accepted a pool whose layer size overflows 64 bits");
  }
  for (const v1::LayerPool& layer : pool.layers()) {
    Check(layer.bytes() == layer_bytes, absl::StrCat("Attach: layer ", layer.layer(), " is ",
                                                     layer.bytes(), " bytes, not ", layer_bytes));
    Check(layer.region_index() < static_cast<uint32_t>(pool.regions_size()),
          "Attach: a layer in a region that does not exist");
    uint64_t end = 0;
    Check(!__builtin_add_overflow(layer.offset(), layer.bytes(), &end) &&
              end <= pool.regions(static_cast<int>(layer.region_index())).bytes(),
          absl::StrCat("Attach: layer ", layer.layer(), " [", layer.offset(), ", +", layer.bytes(),
                       ") runs past its region"));
  }
}

void CheckResponse(const v1::HeartbeatRequest&, const v1::HeartbeatResponse& r) {
  const auto lease = ServiceHarness::Get().options().lease_timeout;
  Check(r.lease_remaining_ms() <= absl::ToInt64Milliseconds(lease),
        "Heartbeat granted more than the lease timeout");
}

void CheckResponse(const v1::AllocateRequest& q, const v1::AllocateResponse& r) {
  Check(r.sequence_id() == q.sequence_id(), "Allocate answered for another sequence");
  for (const v1::LayerAllocation& layer : r.layers()) {
    Check(static_cast<uint32_t>(layer.slot_mapping_size()) == q.num_new_tokens(),
          absl::StrCat("Allocate: layer ", layer.layer(), " has ", layer.slot_mapping_size(),
                       " slots for ", q.num_new_tokens(), " tokens"));
    for (int64_t slot : layer.slot_mapping()) Check(slot >= 0, "Allocate: a negative slot");
  }
}

void CheckResponse(const v1::ForkRequest& q, const v1::ForkResponse& r) {
  Check(r.child().sequence_id() == q.child_sequence_id(), "Fork answered another child");
  Check(r.child().parent_sequence_id() == q.parent_sequence_id(), "Fork: wrong parent");
}

void CheckResponse(const v1::StepRequest& q, const v1::StepResponse& r) {
  Check(r.results_size() == q.ops_size(),
        absl::StrCat("Step answered ", r.results_size(), " results for ", q.ops_size(), " ops"));
  for (int i = 0; i < r.results_size() && i < q.ops_size(); ++i) {
    const v1::StepResult& result = r.results(i);
    Check(result.code() >= 0 && result.code() <= 16,
          absl::StrCat("Step: ops[", i, "] has code ", result.code()));
    Check(result.code() == 0 || !result.message().empty(),
          absl::StrCat("Step: ops[", i, "] failed with no message"));
    Check(result.code() != static_cast<int>(grpc::StatusCode::INTERNAL) &&
              result.code() != static_cast<int>(grpc::StatusCode::UNKNOWN),
          absl::StrCat("Step: ops[", i, "] answered ", result.code(), ": ", result.message()));
    if (result.code() == 0 && q.ops(i).has_match_prefix()) {
      const int hashes = q.ops(i).match_prefix().block_hashes_size();
      Check(result.matched_blocks() <= static_cast<uint32_t>(hashes),
            absl::StrCat("Step: ops[", i, "] matched ", result.matched_blocks(), " of ", hashes,
                         " hashes"));
    }
    if (result.code() != 0 || !q.ops(i).has_allocate()) continue;
    Check(!result.has_all_layers() || result.layers_size() == 0,
          absl::StrCat("Step: ops[", i, "] has both layers and all_layers"));
    std::vector<v1::LayerAllocation> listed(result.layers().begin(), result.layers().end());
    if (result.has_all_layers()) listed.push_back(result.all_layers());
    for (const v1::LayerAllocation& layer : listed) {
      const uint32_t want = q.include_slot_mapping() ? q.ops(i).allocate().num_new_tokens() : 0;
      Check(static_cast<uint32_t>(layer.slot_mapping_size()) == want,
            absl::StrCat("Step: ops[", i, "] layer ", layer.layer(), " has ",
                         layer.slot_mapping_size(), " slots, not ", want));
    }
  }
}

// A finished Compress lists every layer; a pending one nothing.
void CheckCompressed(const v1::CompressResponse& r) {
  const size_t layers = r.pending() ? 0 : ServiceHarness::Get().fixture_pool().model.num_layers;
  Check(static_cast<size_t>(r.layers_size()) == layers,
        absl::StrCat("Compress answered ", r.layers_size(), " layers, pending ", r.pending()));
}

void CheckResponse(const v1::CompressRequest& q, const v1::CompressResponse& r) {
  Check(r.pending() == q.background(), "Compress: pending differs from background");
  CheckCompressed(r);
}

void CheckResponse(const v1::FinishCompressRequest& q, const v1::CompressResponse& r) {
  Check(q.wait() ? !r.pending() : true, "FinishCompress with wait answered pending");
  CheckCompressed(r);
}

void CheckResponse(const v1::StorePrefixRequest& q, const v1::StorePrefixResponse& r) {
  Check(uint64_t{r.stored()} + r.already_stored() == static_cast<uint64_t>(q.block_hashes_size()),
        absl::StrCat("StorePrefix: stored ", r.stored(), " + already_stored ", r.already_stored(),
                     " != ", q.block_hashes_size(), " hashes"));
}

void CheckResponse(const v1::MatchPrefixRequest& q, const v1::MatchPrefixResponse& r) {
  Check(r.matched_blocks() <= static_cast<uint32_t>(q.block_hashes_size()),
        absl::StrCat("MatchPrefix matched ", r.matched_blocks(), " of ", q.block_hashes_size(),
                     " hashes"));
}

void CheckResponse(const v1::LoadPrefixRequest& q, const v1::LoadPrefixResponse& r) {
  const uint32_t hashes = static_cast<uint32_t>(q.block_hashes_size());
  Check(r.loaded_blocks() <= hashes && r.corrupt_blocks() <= hashes - r.loaded_blocks(),
        absl::StrCat("LoadPrefix: loaded ", r.loaded_blocks(), " and ", r.corrupt_blocks(),
                     " corrupt of ", hashes, " hashes"));
  // Nothing writes to the fixture's stored blocks: their digests still match.
  Check(r.corrupt_blocks() == 0, "LoadPrefix found a stored block corrupt nobody wrote to");
  Check(r.has_sequence() == (r.loaded_blocks() > 0),
        "LoadPrefix: a sequence exactly when it loaded blocks");
  if (!r.has_sequence()) return;
  const v1::SequenceInfo& seq = r.sequence();
  const uint32_t bs = ServiceHarness::Get().fixture_pool().model.block_size;
  Check(seq.sequence_id() == q.sequence_id(), "LoadPrefix answered for another sequence");
  Check(seq.num_positions() == uint64_t{r.loaded_blocks()} * bs,
        absl::StrCat("LoadPrefix: ", seq.num_positions(), " positions for ", r.loaded_blocks(),
                     " blocks"));
  for (const v1::LayerBlockTable& t : seq.layers()) {
    Check(static_cast<uint32_t>(t.block_ids_size()) == r.loaded_blocks() &&
              t.num_tokens() == r.loaded_blocks() * bs,
          absl::StrCat("LoadPrefix: layer ", t.layer(), " holds ", t.block_ids_size(),
                       " blocks for ", r.loaded_blocks(), " loaded"));
  }
}

template <typename Request, typename Response>
void CheckResponse(const Request&, const Response&) {}

// A successful LoadPrefix creates the named sequence, and only it, exactly when it loaded
// blocks; the sequence holds what the response describes.
void CheckLoaded(const v1::LoadPrefixRequest& q, const v1::LoadPrefixResponse& r,
                 const std::map<std::string, std::string>& before,
                 const std::map<std::string, std::string>& after) {
  for (const auto& [id, sequence] : after) {
    Check(before.contains(id) || id == q.sequence_id(),
          absl::StrCat("LoadPrefix created sequence ", id, " it did not name"));
  }
  Check(!before.contains(q.sequence_id()), "LoadPrefix succeeded on an existing sequence_id");
  auto it = after.find(q.sequence_id());
  Check((it != after.end()) == (r.loaded_blocks() > 0),
        absl::StrCat("LoadPrefix loaded ", r.loaded_blocks(), " blocks but the sequence ",
                     it != after.end() ? "exists" : "does not exist"));
  if (it == after.end()) return;
  v1::SequenceInfo now;
  Check(now.ParseFromString(it->second), "LoadPrefix: unparseable sequence");
  Check(now.layers_size() == r.sequence().layers_size(), "LoadPrefix: layer counts differ");
  for (int l = 0; l < now.layers_size(); ++l) {
    Check(std::equal(now.layers(l).block_ids().begin(), now.layers(l).block_ids().end(),
                     r.sequence().layers(l).block_ids().begin(),
                     r.sequence().layers(l).block_ids().end()),
          absl::StrCat("LoadPrefix: layer ", l, " differs from what the response described"));
  }
}

// A forked child holds exactly its parent's blocks and KV.
void CheckForked(const v1::ForkRequest& q, const std::map<std::string, std::string>& after) {
  v1::SequenceInfo parent, child;
  Check(parent.ParseFromString(after.at(q.parent_sequence_id())) &&
            child.ParseFromString(after.at(q.child_sequence_id())),
        "Fork: parent or child missing after a successful Fork");
  Check(parent.layers_size() == child.layers_size(), "Fork: layer counts differ");
  for (int l = 0; l < parent.layers_size(); ++l) {
    Check(parent.layers(l).kv_digest() == child.layers(l).kv_digest() &&
              std::equal(parent.layers(l).block_ids().begin(), parent.layers(l).block_ids().end(),
                         child.layers(l).block_ids().begin(), child.layers(l).block_ids().end()),
          absl::StrCat("Fork: layer ", l, " of the child differs from its parent's"));
  }
}

// ---- one unary call -------------------------------------------------------------------------

struct Expectations {
  bool read_only = false;          // a successful call changes no sequence
  bool others_may_vanish = false;  // Detach: the client's sequences go
};

template <typename Request, typename Response>
int FuzzUnary(const char* method, const uint8_t* data, size_t size, Expectations expect) {
  ServiceHarness& h = ServiceHarness::Get();
  h.Reset();
  Request request;
  std::string bytes;
  const bool parsed = request.ParseFromArray(data, static_cast<int>(size));
  if (parsed) {
    ResolveTokens(h, &request);
    bytes = request.SerializeAsString();
  } else {
    bytes.assign(reinterpret_cast<const char*>(data), size);
  }
  const std::map<std::string, std::string> before = h.Sequences();
  const std::string state_before = h.StateDigest();
  std::string response_bytes;
  bool as_operator = false;
  if constexpr (requires { request.session_token(); }) {
    as_operator = parsed && request.session_token().empty();
  }
  const grpc::Status status = h.CallUnary(method, bytes, &response_bytes, as_operator);
  if (Verbose()) {
    std::fprintf(stderr, "%s(%s) -> %d %s\n", method, request.ShortDebugString().c_str(),
                 status.error_code(), status.error_message().c_str());
  }
  h.CheckSane();
  if (!status.ok()) {
    Check(h.StateDigest() == state_before,
          absl::StrCat("a failed ", method, " changed the daemon's state (", status.error_message(),
                       ")"));
    Check(!status.error_message().empty(),
          absl::StrCat(method, " failed with code ", status.error_code(), " and no message"));
    // Bytes that are not a request are answered INVALID_ARGUMENT (request_errors.h).
    Check(parsed || status.error_code() == grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat(method, ": bytes that are not a request answered with code ",
                       status.error_code()));
    return 0;
  }
  Check(parsed, absl::StrCat(method, " accepted bytes that are not its request"));
  Response response;
  Check(response.ParseFromString(response_bytes), absl::StrCat(method, ": unparseable response"));
  CheckResponse(request, response);
  const std::map<std::string, std::string> after = h.Sequences();
  if (expect.read_only) {
    Check(after == before, absl::StrCat(method, " changed a sequence"));
  } else {
    CheckOnlyNamedChanged(method, before, after, Named(request), expect.others_may_vanish);
  }
  if constexpr (std::is_same_v<Request, v1::ForkRequest>) CheckForked(request, after);
  if constexpr (std::is_same_v<Request, v1::LoadPrefixRequest>) {
    CheckLoaded(request, response, before, after);
  }
  return 0;
}

// ---- Watch ----------------------------------------------------------------------------------

// Waits (bounded, generously) until the hub has `n` subscribers.
void AwaitSubscribers(const EventHub& events, size_t n) {
  for (int i = 0; i < 100000 && events.num_subscribers() != n; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  Check(events.num_subscribers() == n,
        absl::StrCat("Watch: the hub never had ", n, " subscribers"));
}

int FuzzWatch(const uint8_t* data, size_t size) {
  ServiceHarness& h = ServiceHarness::Get();
  h.Reset();
  v1::WatchRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;
  bool valid = true, wants_allocated = request.types().empty();
  for (int t : request.types()) {
    valid = valid && v1::EventType_IsValid(t) && t != v1::EVENT_TYPE_UNSPECIFIED;
    wants_allocated = wants_allocated || t == v1::EVENT_TYPE_SEQUENCE_ALLOCATED;
  }
  grpc::ClientContext ctx;
  h.AuthorizeCall(&ctx, /*as_operator=*/true);
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader = h.stub().Watch(&ctx, request);
  v1::Event event;
  if (!valid) {
    Check(!reader->Read(&event), "Watch streamed for an invalid event type");
    const grpc::Status status = reader->Finish();
    Check(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("Watch of an invalid type ended with ", status.error_code()));
    return 0;
  }
  AwaitSubscribers(h.events(), 1);
  if (!h.manager().Allocate(h.token(0), "s0", 1).ok()) Fail("Watch: fixture Allocate failed");
  if (wants_allocated) {
    Check(reader->Read(&event) && event.type() == v1::EVENT_TYPE_SEQUENCE_ALLOCATED &&
              event.sequence_id() == "s0",
          "Watch did not stream the Allocate it asked for");
  }
  ctx.TryCancel();
  while (reader->Read(&event)) {
  }
  reader->Finish();
  AwaitSubscribers(h.events(), 0);
  h.CheckSane();
  return 0;
}

int Dispatch(Rpc rpc, const uint8_t* data, size_t size) {
  constexpr Expectations kChanges{}, kReadOnly{.read_only = true};
  switch (rpc) {
    case Rpc::kAttach:
      return FuzzUnary<v1::AttachRequest, v1::AttachResponse>("Attach", data, size, kChanges);
    case Rpc::kHeartbeat:
      return FuzzUnary<v1::HeartbeatRequest, v1::HeartbeatResponse>("Heartbeat", data, size,
                                                                    kReadOnly);
    case Rpc::kDetach:
      return FuzzUnary<v1::DetachRequest, v1::DetachResponse>("Detach", data, size,
                                                              {.others_may_vanish = true});
    case Rpc::kAllocate:
      return FuzzUnary<v1::AllocateRequest, v1::AllocateResponse>("Allocate", data, size, kChanges);
    case Rpc::kFree:
      return FuzzUnary<v1::FreeRequest, v1::FreeResponse>("Free", data, size, kChanges);
    case Rpc::kFork:
      return FuzzUnary<v1::ForkRequest, v1::ForkResponse>("Fork", data, size, kChanges);
    case Rpc::kStep:
      return FuzzUnary<v1::StepRequest, v1::StepResponse>("Step", data, size, kChanges);
    case Rpc::kGetSequence:
      return FuzzUnary<v1::GetSequenceRequest, v1::GetSequenceResponse>("GetSequence", data, size,
                                                                        kReadOnly);
    case Rpc::kListSequences:
      return FuzzUnary<v1::ListSequencesRequest, v1::ListSequencesResponse>("ListSequences", data,
                                                                            size, kReadOnly);
    case Rpc::kStats:
      return FuzzUnary<v1::StatsRequest, v1::StatsResponse>("Stats", data, size, kReadOnly);
    case Rpc::kCompress:
      return FuzzUnary<v1::CompressRequest, v1::CompressResponse>("Compress", data, size, kChanges);
    case Rpc::kFinishCompress:
      return FuzzUnary<v1::FinishCompressRequest, v1::CompressResponse>("FinishCompress", data,
                                                                        size, kChanges);
    case Rpc::kFetch:
      return FuzzUnary<v1::FetchRequest, v1::FetchResponse>("Fetch", data, size, kChanges);
    case Rpc::kPark:
      return FuzzUnary<v1::ParkRequest, v1::ParkResponse>("Park", data, size, kChanges);
    case Rpc::kWatch:
      return FuzzWatch(data, size);
    case Rpc::kStorePrefix:
      // Stores blocks the sequence keeps: no sequence changes (the named one included).
      return FuzzUnary<v1::StorePrefixRequest, v1::StorePrefixResponse>("StorePrefix", data, size,
                                                                        kReadOnly);
    case Rpc::kMatchPrefix:
      return FuzzUnary<v1::MatchPrefixRequest, v1::MatchPrefixResponse>("MatchPrefix", data, size,
                                                                        kReadOnly);
    case Rpc::kLoadPrefix:
      return FuzzUnary<v1::LoadPrefixRequest, v1::LoadPrefixResponse>("LoadPrefix", data, size,
                                                                      kChanges);
  }
  return 0;
}

}  // namespace

int FuzzRpc(Rpc rpc, const uint8_t* data, size_t size) {
  const int result = Dispatch(rpc, data, size);
  ServiceHarness::Get().Clear();
  return result;
}

}  // namespace cachemgr::fuzz
