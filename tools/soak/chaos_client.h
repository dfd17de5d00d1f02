// ChaosClient: one engine-like client process of cachemgrd for soak runs. It attaches one
// session and runs `threads` ChaosWorkers on it at once (tools/soak/chaos_worker.h), each doing a
// seeded random mix of operations on sequences of its own and checking every answer and every KV
// byte against its own model. It survives daemon restarts and lease loss: the workers stop at a
// gate while one of them adopts a new session (Session::Reattach(), which the client library
// requires nobody uses the old generation meanwhile), and each forgets the lost generation's
// sequences, as an engine would recompute them.
//
// Everything it reports is one JSON object per line through `emit` (see tools/soak/main.cc for
// the events).
//
// Thread safety: Run() on one thread; Stop() from any thread or a signal handler (it only sets an
// atomic flag); progress() is written by the running threads and read by a watchdog; the rest is
// for the workers (see each member).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/client/client.h"
#include "nlohmann/json.hpp"
#include "tools/soak/kv_content.h"
#include "tools/soak/op_stats.h"

namespace cachemgr::soak {

struct ChaosOptions {
  std::string socket;
  std::string name = "chaos";
  // One of SoakModelNames(): every client naming it describes the same model.
  std::string model = "soak-a";
  uint64_t seed = 1;
  uint32_t threads = 1;  // workers sharing the session
  // Zero: until Stop().
  absl::Duration duration = absl::ZeroDuration();
  uint32_t max_live = 8;  // live sequences per worker at most
  absl::Duration stats_interval = absl::Seconds(1);
  bool trace = false;  // one "op" event per call
  // Self-test of the checks: after this long, worker 0 flips one byte of a live sequence's K
  // behind its model's back (once), then checks the sequence, which must report a corruption.
  // Zero: never.
  absl::Duration corrupt_after = absl::ZeroDuration();
};

// The built-in models: name -> (spec, blocks per layer of its pool).
std::vector<std::string> SoakModelNames();
absl::StatusOr<std::pair<client::ModelSpec, uint32_t>> SoakModel(const std::string& name);

// CLOCK_MONOTONIC in nanoseconds (the watchdog's clock).
int64_t MonotonicNanos();
// "CODE: message".
std::string StatusText(const absl::Status& status);

// What one thread is doing now, for a watchdog in another thread.
struct Progress {
  std::atomic<int64_t> call_started_ns{0};  // CLOCK_MONOTONIC; 0 while no call is in flight
  std::atomic<const char*> call{""};
};

// Counts of the whole process, added to by every worker; in every "stats" event and in "done".
struct ChaosTotals {
  std::atomic<uint64_t> ops{0}, verified{0}, corruptions{0}, anomalies{0}, losses{0}, reattaches{0},
      sequences_lost{0}, refusals{0}, transients{0};
  // Sequences marked for it that the operator freed behind the worker's back.
  std::atomic<uint64_t> operator_freed{0};
  // Head vectors (K and V apart) compared: byte for byte against what was written; first reads
  // of reconstructed codebook rows (within the codebook's tolerance); re-reads of those.
  std::atomic<uint64_t> vectors_exact{0}, vectors_reconstructed{0}, vectors_unchanged{0};
  nlohmann::json ToJson() const;
};

class ChaosClient {
 public:
  using Emit = std::function<void(nlohmann::json)>;

  // `emit` must be thread-safe.
  ChaosClient(ChaosOptions options, Emit emit);
  ~ChaosClient();

  // Attaches (retrying while the daemon is away), runs the workers until the duration passed or
  // Stop() (each then checks its live sequences once more), detaches and reports "done". An
  // error only if it was stopped before it ever attached, or the model name is unknown.
  absl::Status Run();
  void Stop() { stop_.store(true); }

  // Slot 0 is Run()'s own calls (attach, re-attach, detach), slot 1 + i worker i's.
  const std::vector<std::unique_ptr<Progress>>& progress() const { return progress_; }

  // ---- For the workers ----
  bool Stopping() const { return stop_.load() || absl::Now() >= end_; }
  const ChaosOptions& options() const { return options_; }
  const client::ModelSpec& model() const { return model_; }
  const KvContent& content() const { return *content_; }
  void Report(nlohmann::json event) const { emit_(std::move(event)); }
  ChaosTotals& totals() { return totals_; }
  // The session. Its generation changes only while the gate is held exclusively, so a worker
  // holding it shared sees one generation (and one pool mapping) throughout.
  client::Session& session() { return *session_; }
  absl::Mutex& gate() { return gate_; }
  // Called without the gate by a worker that found generation `generation` lost: the first
  // re-attaches (waiting for every worker to leave the gate), the others find it done.
  void Recover(uint64_t generation);

 private:
  absl::Status AttachWithRetry();
  // Times one of Run()'s own calls for the watchdog.
  template <typename T>
  T Timed(const char* call, const std::function<T()>& run);
  // Emits a "stats" event with the process's own calls since the last one.
  void EmitOwnStats();

  const ChaosOptions options_;
  const Emit emit_;
  std::atomic<bool> stop_{false};
  absl::Time end_ = absl::InfiniteFuture();
  std::vector<std::unique_ptr<Progress>> progress_;
  client::ModelSpec model_;
  uint32_t num_blocks_ = 0;
  std::unique_ptr<KvContent> content_;
  std::unique_ptr<client::Session> session_;
  absl::Mutex gate_;
  ChaosTotals totals_;
  absl::Mutex stats_mu_;
  OpStats own_stats_ ABSL_GUARDED_BY(stats_mu_);  // attach, re-attach, detach
};

}  // namespace cachemgr::soak
