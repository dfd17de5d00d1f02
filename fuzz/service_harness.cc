#include "fuzz/service_harness.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/proto_convert.h"
#include "cachemgr/service/request_errors.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"

namespace cachemgr::fuzz {
namespace {

CacheManagerOptions HarnessOptions() {
  CacheManagerOptions o;
  // Small limits keep every input fast and the fuzzer's memory low; the checks are the same.
  o.memory_budget_bytes = uint64_t{64} << 20;
  o.default_pool_bytes = uint64_t{4} << 20;
  o.max_input_buffer_bytes = uint64_t{16} << 20;
  o.compress_threads = 1;
  return o;
}

ModelSpec FixtureModel() {
  ModelSpec m;
  m.name = "fuzz-model";
  m.num_layers = 2;
  m.num_q_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 8;
  m.dtype = DType::kFp32;
  m.block_size = 4;
  return m;
}

template <typename T>
T OrFail(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) Fail(absl::StrCat("fixture: ", what, ": ", v.status().ToString()));
  return *std::move(v);
}

CompressParams FixtureCompress(const char* preset, double reserve_ratio, CompressInput input) {
  CompressParams p;
  p.policy = OrFail(ResolvePreset(preset), "preset");
  p.policy.window = 4;
  p.target = {compress::TargetKind::kReserveRatio, reserve_ratio};
  p.input = input;
  return p;
}

}  // namespace

ServiceHarness& ServiceHarness::Get() {
  static ServiceHarness* harness = new ServiceHarness();
  return *harness;
}

ServiceHarness::ServiceHarness() : options_(HarnessOptions()) {
  QuietLogs();
  // Malformed requests make protobuf log each parse error (invalid UTF-8, ...) to stderr.
  google::protobuf::SetLogHandler(nullptr);
  manager_ = std::make_unique<CacheManager>(options_, &backend_, &clock_, &events_);
  // The operator credential's file, in a directory of its own (removed at exit).
  char dir[] = "/tmp/cachemgr-fuzz-XXXXXX";
  if (mkdtemp(dir) == nullptr) Fail("mkdtemp for the operator token failed");
  operator_token_dir_ = dir;
  operator_token_ = OrFail(OperatorToken::Create(operator_token_dir_ + "/operator", std::nullopt),
                           "operator token");
  std::ifstream(operator_token_->path()) >> operator_credential_;
  if (operator_credential_.empty()) Fail("the operator token file is empty");
  std::atexit([] { std::filesystem::remove_all(ServiceHarness::Get().operator_token_dir_); });
  service_ = std::make_unique<CacheManagerService>(
      manager_.get(), &events_, "/fuzz/share.sock", "/fuzz/fast.sock", /*unix_peers=*/nullptr,
      operator_token_.get(), "fuzz", /*worker_threads=*/1);
  service_->AdmitInProcessCallers();
  grpc::ServerBuilder builder;
  builder.RegisterService(service_.get());
  // As the daemon (daemon.cc): bytes that are not a request are answered INVALID_ARGUMENT.
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeUnparseableRequestInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr) Fail("the in-process gRPC server did not start");
  channel_ = server_->InProcessChannel(grpc::ChannelArguments());
  stub_ = v1::CacheManager::NewStub(channel_);
  generic_ = std::make_unique<grpc::GenericStub>(channel_);
  // The service admits the in-process caller: were every call refused before its handler, every
  // target would pass without fuzzing anything.
  std::string response;
  const grpc::Status stats =
      CallUnary("Stats", v1::StatsRequest().SerializeAsString(), &response, /*as_operator=*/true);
  if (!stats.ok())
    Fail(absl::StrCat("the in-process service refused Stats: ", stats.error_message()));
}

std::string ServiceHarness::ResolveToken(const std::string& token) const {
  if (token.size() == 1 && token[0] >= '0' && token[0] < '0' + kFixtureClients) {
    return tokens_[token[0] - '0'];
  }
  return token;
}

void ServiceHarness::AuthorizeCall(grpc::ClientContext* ctx, bool as_operator) const {
  if (as_operator) ctx->AddMetadata(kOperatorMetadataKey, operator_credential_);
}

Caller ServiceHarness::OperatorCaller() {
  Caller caller;
  caller.operator_credential = true;
  return caller;
}

grpc::Status ServiceHarness::CallUnary(const std::string& method, const std::string& request,
                                       std::string* response, bool as_operator) {
  grpc::ClientContext ctx;
  AuthorizeCall(&ctx, as_operator);
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  // Driven on this thread through a completion queue: the fewest thread hops per call.
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call = generic_->PrepareUnaryCall(
      &ctx, absl::StrCat("/cachemgr.v1.CacheManager/", method), request_buffer, &cq);
  call->StartCall();
  call->Finish(&response_buffer, &status, this);
  void* tag = nullptr;
  bool ok = false;
  if (!cq.Next(&tag, &ok) || tag != this || !ok) Fail("the in-process call did not complete");
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (status.ok() && response != nullptr) {
    std::vector<grpc::Slice> slices;
    if (!response_buffer.Dump(&slices).ok()) Fail("cannot read a response buffer");
    response->clear();
    for (const grpc::Slice& s : slices) {
      response->append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  return status;
}

void ServiceHarness::Clear() { manager_->Shutdown(); }

void ServiceHarness::Reset() {
  Clear();
  for (int c = 0; c < kFixtureClients; ++c) {
    AttachParams params;
    params.client_name = absl::StrCat("fuzz-client-", c);
    params.model = FixtureModel();
    params.num_blocks = 64;
    AttachResult attached = OrFail(manager_->Attach(params), "attach");
    tokens_[c] = attached.session_token;
    fixture_pool_ = attached.pool;
  }
  FillMemory();
  CacheManager& m = *manager_;
  const std::string& t0 = tokens_[0];
  OrFail(m.Allocate(t0, "s0", 10), "allocate s0");
  OrFail(m.Fork(t0, "s0", "s1"), "fork s1");
  OrFail(m.Allocate(t0, "s1", 3), "allocate s1");
  OrFail(m.Allocate(t0, "c0", 12), "allocate c0");
  OrFail(m.Compress(t0, "c0", FixtureCompress("codebook", 1.0, CompressInput::kNone)),
         "compress c0");
  OrFail(m.Allocate(t0, "c1", 12), "allocate c1");
  OrFail(m.Compress(t0, "c1", FixtureCompress("spindlekv", 0.5, CompressInput::kScores)),
         "compress c1");
  OrFail(m.Fetch(t0, "c1", {}), "fetch c1");
  OrFail(m.Allocate(t0, "c1", 2), "allocate c1 again");
  OrFail(m.Allocate(t0, "b0", 10), "allocate b0");
  CompressParams background = FixtureCompress("streamingllm", 0.5, CompressInput::kNone);
  background.background = true;
  OrFail(m.Compress(t0, "b0", background), "compress b0 in the background");
  SettleBackground("b0");
  OrFail(m.Allocate(t0, "b0", 2), "allocate b0 again");
  OrFail(m.Allocate(tokens_[1], "t0", 6), "allocate t0");
  // The pool's prefix store: entries that sequences share and entries only the store holds.
  OrFail(m.StorePrefix(t0, "s0", 0, {"h0", "h1"}), "store s0");
  OrFail(m.StorePrefix(tokens_[1], "t0", 0, {"g0"}), "store t0");
  OrFail(m.Allocate(t0, "p0", 8), "allocate p0");
  OrFail(m.StorePrefix(t0, "p0", 0, {"e0", "e1"}), "store p0");
  OrFail(m.Free(t0, "p0"), "free p0");
  // An entry held as codebooks (the fixture's KV is finite).
  OrFail(m.Allocate(t0, "q0", 4), "allocate q0");
  OrFail(m.StorePrefix(t0, "q0", 0, {"k0"}, PrefixCodebookOptions{}), "store q0 coded");
  OrFail(m.Free(t0, "q0"), "free q0");
}

void ServiceHarness::FillMemory() {
  std::vector<UniqueFd> fds = OrFail(manager_->ShareFds(tokens_[0]), "share fds");
  if (fds.size() != 2) Fail("fixture: expected a pool region and an input buffer");
  const StatsSnapshot stats = manager_->Stats();
  MemfdRegion pool = OrFail(MemfdRegion::Map(std::move(fds[0]), stats.pools.at(0).bytes), "map");
  // Rows of head_dim floats in a few directions with a little noise, so that codebooks merge
  // some rows and keep others. (A hash for the noise: a <random> distribution would dominate the
  // time of an input.)
  auto noise = [](size_t i) {
    const uint64_t h = (uint64_t{i} + 1) * 0x9E3779B97F4A7C15ull;
    return static_cast<float>((h >> 40) & 0xffff) / 65535.0f;  // [0, 1]
  };
  const uint32_t dim = FixtureModel().head_dim;
  auto* floats = reinterpret_cast<float*>(pool.data());
  for (size_t i = 0; i < pool.size() / sizeof(float); ++i) {
    const size_t row = i / dim;
    const float base = (row % 3 == 0 ? 1.0f : 0.2f) * static_cast<float>(i % dim + 1);
    floats[i] = base + 0.1f * (noise(i) - 0.5f);
  }
  // Scores for c1's Compress: [layers, q heads, tokens] floats at the start of the buffer.
  const uint64_t input_bytes = uint64_t{FixtureModel().num_layers} * 64 *
                               FixtureModel().num_q_heads * FixtureModel().head_dim * 4;
  MemfdRegion input = OrFail(MemfdRegion::Map(std::move(fds[1]), input_bytes), "map input");
  auto* scores = reinterpret_cast<float*>(input.data());
  for (size_t i = 0; i < input.size() / sizeof(float); ++i) scores[i] = noise(i + 7777);
}

void ServiceHarness::CheckSane() const {
  if (absl::Status s = manager_->CheckInvariants(); !s.ok()) {
    Fail(absl::StrCat("CheckInvariants: ", s.ToString()));
  }
  const StatsSnapshot stats = manager_->Stats();
  uint64_t bytes = 0;
  for (const PoolSnapshot& p : stats.pools) {
    bytes += p.bytes + p.bookkeeping_bytes + p.prefix_bytes;
    Check(p.prefix_only_blocks <= uint64_t{p.prefix_entries} * p.layers.size(),
          absl::StrCat("pool ", p.pool_id, ": ", p.prefix_only_blocks, " store-only blocks for ",
                       p.prefix_entries, " entries"));
    for (const LayerOccupancy& l : p.layers) {
      Check(l.used_blocks + l.free_blocks + l.quarantined_blocks == l.capacity_blocks,
            absl::StrCat("pool ", p.pool_id, ": used ", l.used_blocks, " + free ", l.free_blocks,
                         " + quarantined ", l.quarantined_blocks, " != capacity ",
                         l.capacity_blocks));
      Check(l.shared_blocks <= l.used_blocks, absl::StrCat("pool ", p.pool_id, ": shared > used"));
    }
  }
  // The budget charges pools with their bookkeeping and stored prefixes, clients' input buffers
  // and sequences.
  bytes += stats.input_buffer_bytes + stats.sequence_bytes;
  Check(bytes == stats.memory_used_bytes,
        absl::StrCat("pools, stored prefixes, input buffers and sequences hold ", bytes,
                     " bytes, memory_used_bytes says ", stats.memory_used_bytes));
  Check(stats.memory_used_bytes <= options_.memory_budget_bytes,
        absl::StrCat("memory in use ", stats.memory_used_bytes, " exceeds the budget ",
                     options_.memory_budget_bytes));
}

void ServiceHarness::SettleBackground(const std::string& sequence_id) const {
  for (int i = 0; i < 100000; ++i) {
    absl::StatusOr<SequenceSnapshot> s = manager_->GetSequence(OperatorCaller(), sequence_id,
                                                               /*include_kv_digest=*/false);
    if (!s.ok() || !s->compress_pending || s->compress_ready) return;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  Fail(absl::StrCat("the background Compress of ", sequence_id, " did not finish in 10 s"));
}

std::map<std::string, std::string> ServiceHarness::Sequences() const {
  std::map<std::string, std::string> out;
  const std::vector<SequenceSummary> list =
      OrFail(manager_->ListSequences(OperatorCaller()), "list sequences");
  for (const SequenceSummary& s : list) {
    SequenceSnapshot snapshot =
        OrFail(manager_->GetSequence(OperatorCaller(), s.sequence_id, /*include_kv_digest=*/true),
               "get sequence");
    v1::SequenceInfo info;
    SequenceToProto(snapshot, &info);
    out[s.sequence_id] = info.SerializeAsString();
  }
  return out;
}

std::string ServiceHarness::StateDigest() const {
  std::string out;
  for (const auto& [id, sequence] : Sequences()) absl::StrAppend(&out, id, "=", sequence, ";");
  StatsSnapshot stats = manager_->Stats();
  for (ClientSnapshot& c : stats.clients) c.lease_remaining = absl::ZeroDuration();
  v1::StatsResponse proto;
  StatsToProto(stats, &proto);
  absl::StrAppend(&out, proto.SerializeAsString(), ";used=", stats.memory_used_bytes);
  return out;
}

void CheckOnlyNamedChanged(const char* call, const std::map<std::string, std::string>& before,
                           const std::map<std::string, std::string>& after,
                           const std::set<std::string>& named, bool others_may_vanish) {
  for (const auto& [id, sequence] : before) {
    if (named.contains(id)) continue;
    auto it = after.find(id);
    if (it == after.end()) {
      Check(others_may_vanish, absl::StrCat(call, " removed sequence ", id, " it did not name"));
      continue;
    }
    Check(it->second == sequence,
          absl::StrCat(call, " changed sequence ", id, " it did not name (blocks or KV)"));
  }
}

}  // namespace cachemgr::fuzz
