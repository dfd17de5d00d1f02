// cachemgr_bench_rpc: control-plane round trips against a real cachemgrd over its Unix socket.
//
// The program starts the daemon it measures (CACHEMGRD_PATH, set by CMake) in a private temp
// directory, attaches with the client library, runs the benchmarks and stops the daemon with
// SIGTERM at exit.
//
//   CACHEMGR_BENCH_DAEMON_CPU=0 CACHEMGR_BENCH_CLIENT_CPU=1 ./cachemgr_bench_rpc
//       --benchmark_repetitions=3 --benchmark_report_aggregates_only=true   (one line)
//
// Environment:
//   CACHEMGR_BENCH_DAEMON_CPU  pin the daemon (all its threads) to this CPU
//   CACHEMGR_BENCH_CLIENT_CPU  pin this process (all its threads) to this CPU
//   CACHEMGR_BENCH_DAEMON      run this cachemgrd binary instead of the one built alongside
//   CACHEMGR_BENCH_SAMPLES_DIR write every run's per-RPC samples (ns, in call order) there as
//                              <benchmark>.<run>.tsv, for histograms and time series
//
// Benchmarks (one iteration):
//   BM_AllocateFree/N            Session::Allocate(seq, N*16 tokens) + Session::Free(seq) on a
//                                Llama-8B-shaped pool (32 layers, 8 kv heads, head_dim 128,
//                                fp16, block_size 16): N new blocks per layer per Allocate.
//   BM_AllocateFreeSmallModel/1  the same on a 2-layer model: the response is tiny, so this is
//                                close to the pure round-trip cost.
//   BM_RawStubAllocateFree/1     the same RPCs through the generated stub (no deadline, no
//                                conversion to client types): the client library's overhead is
//                                the difference to BM_AllocateFree/1.
//   BM_DecodeStepPerCall/R       one decode step of R running requests (prompts of 1k-4k tokens,
//                                a token appended to each) as R Session::Allocate calls, on a
//                                pool with Llama-8B's bookkeeping (32 layers, block 16) and tiny
//                                heads (1 KV head of 8 dims: the bytes do not matter here).
//   BM_DecodeStep/R              the same step as one Session::Step of R allocate ops (slots
//                                derived by the caller): step_p50_us / step_p99_us per step.
//   BM_Heartbeat                 Session::Heartbeat(): the floor of one trivial unary call.
//   BM_RawStubHeartbeat          Heartbeat through the generated stub.
//
// Counters (computed from every RPC timed individually with steady_clock):
//   p50_us, p99_us        per-RPC latency percentiles (nearest rank) over all RPCs of the run
//   alloc_p50_us, ...     the same for the Allocate RPCs only / the Free RPCs only
//   iter_p50_us, iter_p99_us  one whole iteration (Allocate + Free)
//   calls/s               RPCs per second of wall time
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/client/client.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "cachemgr/v1/cachemgr.pb.h"

namespace {

namespace pb = ::cachemgr::v1;
using cachemgr::client::AttachOptions;
using cachemgr::client::ModelSpec;
using cachemgr::client::Session;
using cachemgr::client::StepOp;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kBlockSize = 16;
constexpr uint32_t kNumBlocks = 256;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "cachemgr_bench_rpc: %s\n", what.c_str());
  std::exit(1);
}

std::optional<int> EnvCpu(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const long cpu = std::strtol(v, &end, 10);
  if (*end != '\0' || cpu < 0 || cpu >= CPU_SETSIZE) Die(std::string(name) + ": not a CPU: " + v);
  return static_cast<int>(cpu);
}

bool PinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) == 0;
}

// ---- The daemon under test ------------------------------------------------------------------

class Daemon {
 public:
  // Forks and execs cachemgrd; returns once its socket answers.
  void Start(const cpu_set_t& original_affinity) {
    char tmpl[] = "/tmp/cachemgr-bench-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) Die(std::string("mkdtemp: ") + std::strerror(errno));
    dir_ = tmpl;
    socket_path_ = dir_ + "/cachemgr.sock";
    const char* binary_env = std::getenv("CACHEMGR_BENCH_DAEMON");
    const std::string binary = binary_env != nullptr ? binary_env : CACHEMGRD_PATH;
    std::vector<std::string> args = {binary, "--socket=" + socket_path_, "--log_level=warning",
                                     "--memory_budget=4G", "--default_pool_bytes=4G"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const std::optional<int> daemon_cpu = EnvCpu("CACHEMGR_BENCH_DAEMON_CPU");

    pid_ = fork();
    if (pid_ < 0) Die(std::string("fork: ") + std::strerror(errno));
    if (pid_ == 0) {
      // Child: never outlive the benchmark; run on the requested CPU (or wherever this process
      // could run before the client pinned itself).
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (daemon_cpu.has_value()) {
        if (!PinTo(*daemon_cpu)) {
          std::fprintf(stderr, "cachemgr_bench_rpc: cannot pin daemon to CPU %d: %s\n", *daemon_cpu,
                       std::strerror(errno));
          _exit(127);
        }
      } else {
        sched_setaffinity(0, sizeof(original_affinity), &original_affinity);
      }
      execv(argv[0], argv.data());
      std::fprintf(stderr, "cachemgr_bench_rpc: exec %s: %s\n", argv[0], std::strerror(errno));
      _exit(127);
    }

    // Wait until the daemon answers on its socket (Stats needs no session).
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (true) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        Die("cachemgrd exited during startup (status " + std::to_string(status) + ")");
      }
      struct stat st;
      if (stat(socket_path_.c_str(), &st) == 0 && cachemgr::client::GetStats(socket_path_).ok()) {
        break;
      }
      if (Clock::now() > deadline) Die("cachemgrd did not answer on " + socket_path_);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  // SIGTERM, wait for exit, remove the temp directory. Idempotent.
  void Stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      bool exited = false;
      for (int i = 0; i < 1000 && !exited; ++i) {  // up to ~10 s (the default grace is 5 s)
        if (waitpid(pid_, &status, WNOHANG) == pid_)
          exited = true;
        else
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (!exited) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
      }
      pid_ = -1;
    }
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
      dir_.clear();
    }
  }

  ~Daemon() { Stop(); }
  const std::string& socket_path() const { return socket_path_; }

 private:
  pid_t pid_ = -1;
  std::string dir_;
  std::string socket_path_;
};

// ---- Shared state, created on first use by a benchmark -------------------------------------

ModelSpec LlamaLike(std::string name, uint32_t num_layers) {
  ModelSpec m;
  m.name = std::move(name);
  m.num_layers = num_layers;
  m.num_q_heads = 32;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.dtype = cachemgr::client::DType::kFp16;
  m.block_size = kBlockSize;
  m.layout = cachemgr::client::CacheLayout::kFlashAttn;
  m.rope.style = cachemgr::client::RopeStyle::kHalfSplit;
  m.rope.theta = 500000.0;
  return m;
}

const ModelSpec& Llama8B() {
  static const ModelSpec m = LlamaLike("bench-llama-8b", 32);
  return m;
}
const ModelSpec& Small() {
  static const ModelSpec m = LlamaLike("bench-small-2l", 2);
  return m;
}

struct Env {
  cpu_set_t original_affinity;
  Daemon daemon;
  // gRPC only (AttachOptions::fast_path false), and the same through the fast path.
  std::unique_ptr<Session> llama, llama_fast;
  std::unique_ptr<Session> small, small_fast;
  std::unique_ptr<Session> step, step_fast;  // BM_DecodeStep*'s pool
};

Env* g_env = nullptr;

std::unique_ptr<Session> AttachOrDie(const std::string& socket, const ModelSpec& model,
                                     bool fast_path) {
  AttachOptions options;
  options.client_name = "bench-" + model.name;
  options.model = model;
  options.num_blocks = kNumBlocks;
  options.fast_path = fast_path;
  auto session = Session::Attach(socket, options);
  if (!session.ok()) Die("Attach(" + model.name + "): " + session.status().ToString());
  return *std::move(session);
}

Env& GetEnv() {
  if (g_env->llama == nullptr) {
    g_env->daemon.Start(g_env->original_affinity);
    g_env->llama = AttachOrDie(g_env->daemon.socket_path(), Llama8B(), false);
    g_env->llama_fast = AttachOrDie(g_env->daemon.socket_path(), Llama8B(), true);
    g_env->small = AttachOrDie(g_env->daemon.socket_path(), Small(), false);
    g_env->small_fast = AttachOrDie(g_env->daemon.socket_path(), Small(), true);
  }
  return *g_env;
}

// ---- Statistics -----------------------------------------------------------------------------

double NearestRankUs(std::vector<int64_t>& ns, double p) {
  if (ns.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(ns.size())));
  const size_t idx = std::min(ns.size() - 1, rank == 0 ? 0 : rank - 1);
  std::nth_element(ns.begin(), ns.begin() + static_cast<ptrdiff_t>(idx), ns.end());
  return static_cast<double>(ns[idx]) / 1000.0;
}

struct Samples {
  std::vector<int64_t> first;   // Allocate (or Heartbeat)
  std::vector<int64_t> second;  // Free
  std::vector<int64_t> iter;

  std::string name;  // for the optional dump

  Samples(benchmark::State& state, std::string bench_name) : name(std::move(bench_name)) {
    const size_t n = std::min<size_t>(state.max_iterations, size_t{1} << 22);
    first.reserve(n);
    second.reserve(n);
    iter.reserve(n);
  }

  static int64_t Ns(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
  }

  void Dump() const;

  void Report(benchmark::State& state) {
    Dump();
    std::vector<int64_t> all;
    all.reserve(first.size() + second.size());
    all.insert(all.end(), first.begin(), first.end());
    all.insert(all.end(), second.begin(), second.end());
    state.counters["p50_us"] = NearestRankUs(all, 50);
    state.counters["p99_us"] = NearestRankUs(all, 99);
    state.counters["calls/s"] =
        benchmark::Counter(static_cast<double>(all.size()), benchmark::Counter::kIsRate);
    if (!second.empty()) {
      state.counters["alloc_p50_us"] = NearestRankUs(first, 50);
      state.counters["alloc_p99_us"] = NearestRankUs(first, 99);
      state.counters["free_p50_us"] = NearestRankUs(second, 50);
      state.counters["free_p99_us"] = NearestRankUs(second, 99);
      state.counters["iter_p50_us"] = NearestRankUs(iter, 50);
      state.counters["iter_p99_us"] = NearestRankUs(iter, 99);
    }
  }
};

// Optional raw dump: one line per iteration, "first_ns[\tsecond_ns]".
void Samples::Dump() const {
  const char* dir = std::getenv("CACHEMGR_BENCH_SAMPLES_DIR");
  if (dir == nullptr || *dir == '\0' || first.empty()) return;
  static int run = 0;
  const std::string path = std::string(dir) + "/" + name + "." + std::to_string(run++) + ".tsv";
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return;
  for (size_t i = 0; i < first.size(); ++i) {
    if (i < second.size()) {
      std::fprintf(f, "%lld\t%lld\n", static_cast<long long>(first[i]),
                   static_cast<long long>(second[i]));
    } else {
      std::fprintf(f, "%lld\n", static_cast<long long>(first[i]));
    }
  }
  std::fclose(f);
}

// ---- Client-library benchmarks --------------------------------------------------------------

void RunAllocateFree(benchmark::State& state, Session& session, const char* seq, const char* name) {
  const uint32_t tokens = static_cast<uint32_t>(state.range(0)) * kBlockSize;
  Samples s(state, name + std::string("_") + std::to_string(state.range(0)));
  for (auto _ : state) {
    const auto t0 = Clock::now();
    auto alloc = session.Allocate(seq, tokens);
    const auto t1 = Clock::now();
    if (!alloc.ok()) {
      state.SkipWithError(("Allocate: " + alloc.status().ToString()).c_str());
      break;
    }
    benchmark::DoNotOptimize(alloc->layers.data());
    auto freed = session.Free(seq);
    const auto t2 = Clock::now();
    if (!freed.ok()) {
      state.SkipWithError(("Free: " + freed.status().ToString()).c_str());
      break;
    }
    s.first.push_back(Samples::Ns(t0, t1));
    s.second.push_back(Samples::Ns(t1, t2));
    s.iter.push_back(Samples::Ns(t0, t2));
  }
  s.Report(state);
}

// A fast-path benchmark whose calls went through gRPC would measure the wrong thing.
void RequireFastPath(benchmark::State& state, const Session& session, uint64_t before) {
  if (state.iterations() > 0 && session.fast_path_calls() < before + state.iterations()) {
    state.SkipWithError("calls did not go through the fast path");
  }
}

void BM_AllocateFree(benchmark::State& state) {
  RunAllocateFree(state, *GetEnv().llama, "bench-seq-llama", "BM_AllocateFree");
}
BENCHMARK(BM_AllocateFree)->Arg(1)->Arg(64)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_FastAllocateFree(benchmark::State& state) {
  Session& session = *GetEnv().llama_fast;
  const uint64_t before = session.fast_path_calls();
  RunAllocateFree(state, session, "bench-seq-llama", "BM_FastAllocateFree");
  RequireFastPath(state, session, before);
}
BENCHMARK(BM_FastAllocateFree)->Arg(1)->Arg(64)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_AllocateFreeSmallModel(benchmark::State& state) {
  RunAllocateFree(state, *GetEnv().small, "bench-seq-small", "BM_AllocateFreeSmallModel");
}
BENCHMARK(BM_AllocateFreeSmallModel)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_FastAllocateFreeSmallModel(benchmark::State& state) {
  Session& session = *GetEnv().small_fast;
  const uint64_t before = session.fast_path_calls();
  RunAllocateFree(state, session, "bench-seq-small", "BM_FastAllocateFreeSmallModel");
  RequireFastPath(state, session, before);
}
BENCHMARK(BM_FastAllocateFreeSmallModel)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_Heartbeat(benchmark::State& state) {
  Session& session = *GetEnv().llama;
  Samples s(state, "BM_Heartbeat");
  for (auto _ : state) {
    const auto t0 = Clock::now();
    auto left = session.Heartbeat();
    const auto t1 = Clock::now();
    if (!left.ok()) {
      state.SkipWithError(("Heartbeat: " + left.status().ToString()).c_str());
      break;
    }
    s.first.push_back(Samples::Ns(t0, t1));
  }
  s.Report(state);
}
BENCHMARK(BM_Heartbeat)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---- A scheduler's decode step: per-call Allocates vs one Step --------------------------------

constexpr uint32_t kStepPrompt = 1024, kStepMaxTokens = 4 * kStepPrompt + 512;

Session& StepSession(bool fast_path) {
  Env& env = GetEnv();
  std::unique_ptr<Session>& session = fast_path ? env.step_fast : env.step;
  if (session != nullptr) return *session;
  session = [&env, fast_path] {
    ModelSpec m = LlamaLike("bench-step-32l", 32);
    m.num_q_heads = 1;
    m.num_kv_heads = 1;
    m.head_dim = 8;
    AttachOptions options;
    options.client_name = "bench-step";
    options.model = m;
    options.num_blocks = 256 * (kStepMaxTokens / kBlockSize + 1);
    options.fast_path = fast_path;
    auto s = Session::Attach(env.daemon.socket_path(), options);
    if (!s.ok()) Die("Attach(bench-step): " + s.status().ToString());
    return *std::move(s);
  }();
  return *session;
}

// `requests` fresh sequences of 1k-4k tokens (outside the timing).
std::vector<std::string> Prefill(Session& s, uint32_t requests, uint32_t round) {
  std::vector<std::string> ids;
  std::vector<StepOp> ops;
  for (uint32_t r = 0; r < requests; ++r) {
    ids.push_back("step-" + std::to_string(round) + "-" + std::to_string(r));
    // Prompts of 1k-4k tokens, so that requests cross block boundaries on different steps.
    ops.push_back(StepOp::Allocate(ids.back(), kStepPrompt + (r * 389) % (3 * kStepPrompt)));
  }
  // 32 prompts per Step: a prompt lists hundreds of blocks per layer, and a reply is bounded.
  for (size_t first = 0; first < ops.size(); first += 32) {
    const size_t n = std::min<size_t>(32, ops.size() - first);
    auto done = s.Step(std::span<const StepOp>(ops.data() + first, n));
    if (!done.ok()) Die("prefill Step: " + done.status().ToString());
    for (const auto& r : *done) {
      if (!r.status.ok()) Die("prefill: " + r.status.ToString());
    }
  }
  return ids;
}

void FreeAll(Session& s, const std::vector<std::string>& ids) {
  std::vector<StepOp> ops;
  for (const auto& id : ids) ops.push_back(StepOp::Free(id));
  if (!s.Step(ops).ok()) Die("free Step");
}

void RunDecodeStep(benchmark::State& state, bool one_step, bool fast_path, const char* name) {
  Session& s = StepSession(fast_path);
  const uint64_t fast_before = s.fast_path_calls();
  const uint32_t requests = static_cast<uint32_t>(state.range(0));
  Samples samples(state, name + std::string("_") + std::to_string(requests));
  uint32_t round = 0, steps = 0;
  std::vector<std::string> ids = Prefill(s, requests, round);
  std::vector<StepOp> ops;
  for (const auto& id : ids) ops.push_back(StepOp::Allocate(id, 1));
  for (auto _ : state) {
    if (steps == 512) {  // start over with fresh prompts
      state.PauseTiming();
      FreeAll(s, ids);
      ids = Prefill(s, requests, ++round);
      ops.clear();
      for (const auto& id : ids) ops.push_back(StepOp::Allocate(id, 1));
      steps = 0;
      state.ResumeTiming();
    }
    const auto t0 = Clock::now();
    if (one_step) {
      auto done = s.Step(ops);
      if (!done.ok() || !(*done)[0].status.ok()) {
        state.SkipWithError("Step failed");
        break;
      }
      benchmark::DoNotOptimize(done->data());
    } else {
      for (const auto& id : ids) {
        auto alloc = s.Allocate(id, 1);
        if (!alloc.ok()) {
          state.SkipWithError(("Allocate: " + alloc.status().ToString()).c_str());
          break;
        }
        benchmark::DoNotOptimize(alloc->layers.data());
      }
    }
    samples.first.push_back(Samples::Ns(t0, Clock::now()));
    ++steps;
  }
  FreeAll(s, ids);
  state.counters["step_p50_us"] = NearestRankUs(samples.first, 50);
  state.counters["step_p99_us"] = NearestRankUs(samples.first, 99);
  state.counters["per_request_us"] = NearestRankUs(samples.first, 50) / requests;
  if (fast_path) RequireFastPath(state, s, fast_before);
}

void BM_DecodeStepPerCall(benchmark::State& state) {
  RunDecodeStep(state, /*one_step=*/false, /*fast_path=*/false, "BM_DecodeStepPerCall");
}
BENCHMARK(BM_DecodeStepPerCall)->Arg(256)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_FastDecodeStepPerCall(benchmark::State& state) {
  RunDecodeStep(state, /*one_step=*/false, /*fast_path=*/true, "BM_FastDecodeStepPerCall");
}
BENCHMARK(BM_FastDecodeStepPerCall)->Arg(256)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_DecodeStep(benchmark::State& state) {
  RunDecodeStep(state, /*one_step=*/true, /*fast_path=*/false, "BM_DecodeStep");
}
BENCHMARK(BM_DecodeStep)->Arg(16)->Arg(256)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_FastDecodeStep(benchmark::State& state) {
  RunDecodeStep(state, /*one_step=*/true, /*fast_path=*/true, "BM_FastDecodeStep");
}
BENCHMARK(BM_FastDecodeStep)->Arg(16)->Arg(256)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---- Raw generated-stub benchmarks ----------------------------------------------------------

// A stub on its own channel with its own client attached to the Llama pool (same description,
// so it joins the existing pool; the pool memory is not mapped: these calls do not need it).
struct RawClient {
  std::unique_ptr<pb::CacheManager::Stub> stub;
  std::string token;

  explicit RawClient(const std::string& socket) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    stub = pb::CacheManager::NewStub(
        grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args));
    pb::AttachRequest request;
    request.set_client_name("bench-raw-stub");
    const ModelSpec& m = Llama8B();
    pb::ModelSpec* model = request.mutable_model();
    model->set_name(m.name);
    model->set_num_layers(m.num_layers);
    model->set_num_q_heads(m.num_q_heads);
    model->set_num_kv_heads(m.num_kv_heads);
    model->set_head_dim(m.head_dim);
    model->set_dtype(pb::DTYPE_FP16);
    model->set_block_size(m.block_size);
    model->set_layout(pb::CACHE_LAYOUT_FLASH_ATTN);
    model->mutable_rope()->set_style(pb::ROPE_STYLE_HALF_SPLIT);
    model->mutable_rope()->set_theta(m.rope.theta);
    model->mutable_rope()->set_scaling_factor(m.rope.scaling_factor);
    request.set_num_blocks(kNumBlocks);
    pb::AttachResponse response;
    grpc::ClientContext context;
    const grpc::Status status = stub->Attach(&context, request, &response);
    if (!status.ok()) Die("raw Attach: " + status.error_message());
    token = response.session_token();
  }

  ~RawClient() {
    pb::DetachRequest request;
    request.set_session_token(token);
    pb::DetachResponse response;
    grpc::ClientContext context;
    (void)stub->Detach(&context, request, &response);
  }
};

void BM_RawStubAllocateFree(benchmark::State& state) {
  RawClient raw(GetEnv().daemon.socket_path());
  const uint32_t tokens = static_cast<uint32_t>(state.range(0)) * kBlockSize;
  pb::AllocateRequest alloc_req;
  alloc_req.set_session_token(raw.token);
  alloc_req.set_sequence_id("bench-seq-raw");
  alloc_req.set_num_new_tokens(tokens);
  pb::FreeRequest free_req;
  free_req.set_session_token(raw.token);
  free_req.set_sequence_id("bench-seq-raw");
  Samples s(state, "BM_RawStubAllocateFree_" + std::to_string(state.range(0)));
  for (auto _ : state) {
    const auto t0 = Clock::now();
    pb::AllocateResponse alloc_resp;
    grpc::Status status;
    {
      grpc::ClientContext context;
      status = raw.stub->Allocate(&context, alloc_req, &alloc_resp);
    }
    const auto t1 = Clock::now();
    if (!status.ok()) {
      state.SkipWithError(("Allocate: " + status.error_message()).c_str());
      break;
    }
    benchmark::DoNotOptimize(alloc_resp.layers_size());
    pb::FreeResponse free_resp;
    {
      grpc::ClientContext context;
      status = raw.stub->Free(&context, free_req, &free_resp);
    }
    const auto t2 = Clock::now();
    if (!status.ok()) {
      state.SkipWithError(("Free: " + status.error_message()).c_str());
      break;
    }
    s.first.push_back(Samples::Ns(t0, t1));
    s.second.push_back(Samples::Ns(t1, t2));
    s.iter.push_back(Samples::Ns(t0, t2));
  }
  s.Report(state);
}
BENCHMARK(BM_RawStubAllocateFree)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_RawStubHeartbeat(benchmark::State& state) {
  RawClient raw(GetEnv().daemon.socket_path());
  pb::HeartbeatRequest request;
  request.set_session_token(raw.token);
  Samples s(state, "BM_RawStubHeartbeat");
  for (auto _ : state) {
    const auto t0 = Clock::now();
    pb::HeartbeatResponse response;
    grpc::Status status;
    {
      grpc::ClientContext context;
      status = raw.stub->Heartbeat(&context, request, &response);
    }
    const auto t1 = Clock::now();
    if (!status.ok()) {
      state.SkipWithError(("Heartbeat: " + status.error_message()).c_str());
      break;
    }
    s.first.push_back(Samples::Ns(t0, t1));
  }
  s.Report(state);
}
BENCHMARK(BM_RawStubHeartbeat)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  Env env;
  sched_getaffinity(0, sizeof(env.original_affinity), &env.original_affinity);
  // Pin before gRPC starts any thread, so every client thread inherits the mask.
  if (const std::optional<int> cpu = EnvCpu("CACHEMGR_BENCH_CLIENT_CPU"); cpu.has_value()) {
    if (!PinTo(*cpu)) Die("cannot pin client to CPU " + std::to_string(*cpu));
  }
  g_env = &env;

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("daemon_cpu", std::getenv("CACHEMGR_BENCH_DAEMON_CPU") != nullptr
                                                ? std::getenv("CACHEMGR_BENCH_DAEMON_CPU")
                                                : "any");
  benchmark::AddCustomContext("client_cpu", std::getenv("CACHEMGR_BENCH_CLIENT_CPU") != nullptr
                                                ? std::getenv("CACHEMGR_BENCH_CLIENT_CPU")
                                                : "any");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();

  // Detach (closing the connections) before the daemon is asked to stop, so its graceful
  // shutdown has no open calls to wait for.
  env.llama.reset();
  env.small.reset();
  env.step.reset();
  env.daemon.Stop();
  g_env = nullptr;
  return 0;
}
