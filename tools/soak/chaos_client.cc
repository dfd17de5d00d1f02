#include "tools/soak/chaos_client.h"

#include <time.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/util/status_macros.h"
#include "tools/soak/chaos_worker.h"

namespace cachemgr::soak {
namespace {

using client::DType;

kernels::KvElemType ElemType(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
      return kernels::KvElemType::kF16;
    case DType::kBf16:
      return kernels::KvElemType::kBf16;
    case DType::kFp32:
      break;
  }
  return kernels::KvElemType::kF32;
}

std::string CodeName(const absl::Status& status) { return absl::StatusCodeToString(status.code()); }

}  // namespace

int64_t MonotonicNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

std::string StatusText(const absl::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

std::vector<std::string> SoakModelNames() { return {"soak-a", "soak-b", "soak-c"}; }

absl::StatusOr<std::pair<client::ModelSpec, uint32_t>> SoakModel(const std::string& name) {
  client::ModelSpec m;
  m.name = name;
  if (name == "soak-a") {  // fp32, FlashAttention order, interleaved RoPE
    m.num_layers = 4, m.num_q_heads = 4, m.num_kv_heads = 2, m.head_dim = 16;
    m.dtype = DType::kFp32, m.block_size = 16, m.layout = client::CacheLayout::kFlashAttn;
    return std::make_pair(m, 384u);
  }
  if (name == "soak-b") {  // fp16, FlashInfer order, half-split RoPE, small blocks
    m.num_layers = 3, m.num_q_heads = 8, m.num_kv_heads = 2, m.head_dim = 32;
    m.dtype = DType::kFp16, m.block_size = 8, m.layout = client::CacheLayout::kFlashInfer;
    m.rope.style = client::RopeStyle::kHalfSplit;
    return std::make_pair(m, 768u);
  }
  if (name == "soak-c") {  // bf16, one KV head, large blocks, a small pool (often full)
    m.num_layers = 2, m.num_q_heads = 2, m.num_kv_heads = 1, m.head_dim = 64;
    m.dtype = DType::kBf16, m.block_size = 32, m.layout = client::CacheLayout::kFlashAttn;
    return std::make_pair(m, 128u);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--model=", name, ": expected soak-a, soak-b or soak-c"));
}

nlohmann::json ChaosTotals::ToJson() const {
  return {{"ops", ops.load()},
          {"verified", verified.load()},
          {"corruptions", corruptions.load()},
          {"anomalies", anomalies.load()},
          {"losses", losses.load()},
          {"reattaches", reattaches.load()},
          {"sequences_lost", sequences_lost.load()},
          {"refusals", refusals.load()},
          {"transients", transients.load()},
          {"operator_freed", operator_freed.load()},
          {"vectors_exact", vectors_exact.load()},
          {"vectors_reconstructed", vectors_reconstructed.load()},
          {"vectors_unchanged", vectors_unchanged.load()}};
}

ChaosClient::ChaosClient(ChaosOptions options, Emit emit)
    : options_(std::move(options)), emit_(std::move(emit)) {
  for (uint32_t i = 0; i <= options_.threads; ++i) {
    progress_.push_back(std::make_unique<Progress>());
  }
}

ChaosClient::~ChaosClient() = default;

template <typename T>
T ChaosClient::Timed(const char* call, const std::function<T()>& run) {
  Progress& p = *progress_[0];
  p.call.store(call);
  p.call_started_ns.store(MonotonicNanos());
  const absl::Time start = absl::Now();
  T result = run();
  const absl::Duration latency = absl::Now() - start;
  p.call_started_ns.store(0);
  absl::Status status;
  if constexpr (std::is_same_v<T, absl::Status>) {
    status = result;
  } else {
    status = result.status();
  }
  absl::MutexLock lock(&stats_mu_);
  own_stats_.Record(call, status.ok() ? "OK" : CodeName(status), latency);
  return result;
}

void ChaosClient::EmitOwnStats() {
  nlohmann::json delta;
  {
    absl::MutexLock lock(&stats_mu_);
    delta = own_stats_.TakeDelta();
  }
  if (delta.is_null()) return;
  Report({{"event", "stats"}, {"worker", "process"}, {"ops", delta}, {"totals", totals_.ToJson()}});
}

absl::Status ChaosClient::AttachWithRetry() {
  ASSIGN_OR_RETURN(auto spec, SoakModel(options_.model));
  model_ = spec.first;
  num_blocks_ = spec.second;
  content_ =
      std::make_unique<KvContent>(model_.num_kv_heads, model_.head_dim, ElemType(model_.dtype));
  client::AttachOptions attach;
  attach.client_name = options_.name;
  attach.model = model_;
  attach.num_blocks = num_blocks_;
  attach.on_event = [this](const client::SessionEvent& e) {
    Report(
        {{"event", e.kind == client::SessionEvent::Kind::kLost ? "session_lost" : "session_ready"},
         {"generation", e.generation},
         {"status", StatusText(e.status)}});
  };
  absl::Time last_report = absl::InfinitePast();
  while (true) {
    absl::StatusOr<std::unique_ptr<client::Session>> session =
        Timed<absl::StatusOr<std::unique_ptr<client::Session>>>(
            "attach", [&] { return client::Session::Attach(options_.socket, attach); });
    if (session.ok()) {
      session_ = *std::move(session);
      Report({{"event", "attached"},
              {"client_id", session_->client_id()},
              {"pool", session_->pool_id()},
              {"boot_id", session_->boot_id()},
              {"lease_ms", session_->lease_timeout_ms()},
              {"threads", options_.threads}});
      return absl::OkStatus();
    }
    if (stop_.load()) return session.status();
    if (absl::Now() - last_report > absl::Seconds(5)) {
      last_report = absl::Now();
      Report({{"event", "attach_failed"}, {"status", StatusText(session.status())}});
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
}

void ChaosClient::Recover(uint64_t generation) {
  // Exclusive: no worker is inside a call of the lost generation (Reattach() requires it).
  absl::MutexLock gate(&gate_);
  if (session_->generation() != generation || session_->lease_ok()) return;
  ++totals_.losses;
  Report(
      {{"event", "lost"}, {"generation", generation}, {"status", StatusText(session_->status())}});
  const absl::Time lost_at = absl::Now();
  absl::Time last_report = lost_at;
  while (!Stopping()) {
    const absl::StatusOr<uint64_t> adopted =
        Timed<absl::StatusOr<uint64_t>>("reattach", [&] { return session_->Reattach(); });
    if (adopted.ok()) {
      ++totals_.reattaches;
      Report({{"event", "reattached"},
              {"generation", *adopted},
              {"client_id", session_->client_id()},
              {"boot_id", session_->boot_id()},
              {"after_ms", absl::ToInt64Milliseconds(absl::Now() - lost_at)}});
      EmitOwnStats();
      return;
    }
    if (session_->lease_ok()) return;  // not lost after all (FAILED_PRECONDITION)
    if (absl::Now() - last_report > absl::Seconds(5)) {
      last_report = absl::Now();
      Report({{"event", "reattach_failed"}, {"status", StatusText(adopted.status())}});
      EmitOwnStats();
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
}

absl::Status ChaosClient::Run() {
  if (options_.duration > absl::ZeroDuration()) end_ = absl::Now() + options_.duration;
  RETURN_IF_ERROR(AttachWithRetry());
  EmitOwnStats();
  {
    std::vector<std::unique_ptr<ChaosWorker>> workers;
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < options_.threads; ++i) {
      workers.push_back(std::make_unique<ChaosWorker>(
          this, i, options_.seed * 0x2545f4914f6cdd1dull + i + 1, progress_[i + 1].get()));
    }
    for (auto& worker : workers) threads.emplace_back([&worker] { worker->Run(); });
    for (std::thread& t : threads) t.join();
  }
  const absl::Status detached = Timed<absl::Status>("detach", [&] { return session_->Detach(); });
  EmitOwnStats();
  Report({{"event", "done"},
          {"totals", totals_.ToJson()},
          {"detach", detached.ok() ? "OK" : StatusText(detached)}});
  return absl::OkStatus();
}

}  // namespace cachemgr::soak
