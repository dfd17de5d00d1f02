// ChaosClient: one engine-like client of cachemgrd doing a seeded random mix of operations on
// its own sequences (prefill and decode Allocates with K/V written through the mapped pool,
// Free, Fork and copy-on-write appends, Compress with several policies, targets and inputs,
// Fetch, Park, GetSequence with digests, ListSequences, and requests that must be refused),
// checking every answer and the pool's bytes against a model of what each sequence must hold
// (SequenceModel). It survives daemon restarts and lease loss: a lost session's sequences are
// forgotten (an engine would recompute them) and Session::Reattach() adopts a new session.
//
// Everything it reports is one JSON object per line through `emit` (see tools/soak/main.cc for
// the events). A failed call is judged before it is counted: a lost session is an outage; an
// answer the request invites (RESOURCE_EXHAUSTED when the pool is full, say) is a refusal,
// after which the sequence is checked unchanged; UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED
// with the session alive leave the sequence's state unknown, so it is freed and forgotten;
// anything else is an anomaly. A sequence whose answers or bytes disagree with its model is a
// corruption.
//
// Thread safety: Run() on one thread; Stop() from any thread or a signal handler (it only sets an
// atomic flag); `progress` is written by Run() and read by a watchdog.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/client/client.h"
#include "nlohmann/json.hpp"
#include "tools/soak/kv_content.h"
#include "tools/soak/op_stats.h"
#include "tools/soak/sequence_model.h"

namespace cachemgr::soak {

struct ChaosOptions {
  std::string socket;
  std::string name = "chaos";
  // One of SoakModelNames(): every client naming it describes the same model.
  std::string model = "soak-a";
  uint64_t seed = 1;
  // Zero: until Stop().
  absl::Duration duration = absl::ZeroDuration();
  uint32_t max_live = 8;  // live sequences at most
  absl::Duration stats_interval = absl::Seconds(1);
  bool trace = false;  // one "op" event per call
  // Self-test of the checks: after this long, flip one byte of a live sequence's K behind the
  // model's back (once), then check the sequence, which must report a corruption. Zero: never.
  absl::Duration corrupt_after = absl::ZeroDuration();
};

// The built-in models: name -> (spec, blocks per layer of its pool).
std::vector<std::string> SoakModelNames();
absl::StatusOr<std::pair<client::ModelSpec, uint32_t>> SoakModel(const std::string& name);

// What the client is doing now, for a watchdog in another thread.
struct Progress {
  std::atomic<int64_t> call_started_ns{0};  // CLOCK_MONOTONIC; 0 while no call is in flight
  std::atomic<const char*> call{""};
};

class ChaosClient {
 public:
  using Emit = std::function<void(nlohmann::json)>;

  ChaosClient(ChaosOptions options, Emit emit, Progress* progress);
  ~ChaosClient();

  // Attaches (retrying while the daemon is away) and runs until the duration passed or Stop();
  // then checks every live sequence once more, reports, and detaches. An error only if it was
  // stopped before it ever attached, or the model name is unknown.
  absl::Status Run();
  void Stop() { stop_.store(true); }

 private:
  enum class Verdict { kLost, kRefused, kTransient, kAnomaly };

  bool Stopping() const;
  absl::Status AttachWithRetry();
  void RecoverFromLoss();
  void Step();

  // Ops. Each runs one call (or a few) and updates the model.
  void AllocateNew();
  void Append(const std::string& id);
  void FreeOne(const std::string& id);
  void ForkOne(const std::string& parent);
  void CompressOne(const std::string& id);
  void FetchOne(const std::string& id);
  void ParkOne(const std::string& id);
  void Verify(const std::string& id, const char* why);
  void ListAll();
  void Misuse();
  void FreeUncertain();
  void CorruptOnPurpose();

  // Times `call` as `op` (and marks it for the watchdog).
  template <typename T>
  T Timed(const char* op, const std::function<T()>& call, absl::Duration* latency);
  // Records the call and judges a failure: whether the session is gone, the failure was one of
  // `expected`, the outcome is unknown, or the daemon misbehaved (reported here).
  Verdict Judge(const char* op, const std::string& sequence, const absl::Status& status,
                absl::Duration latency, std::initializer_list<absl::StatusCode> expected);
  void RecordOk(const char* op, const std::string& sequence, absl::Duration latency);
  // Whether the session is still alive (a heartbeat answered) after a failure that may mean it
  // is not; waits while the daemon is unreachable, at most until the local lease runs out.
  bool ConfirmSession();
  // Forgets `id` (its state is unknown or wrong) and frees it at the daemon when it can.
  void Drop(const std::string& id);
  void ReportCorruption(const char* op, const std::string& sequence,
                        const std::vector<std::string>& problems);
  void ReportAnomaly(const char* op, const std::string& sequence, const std::string& what);
  void WriteRows(const client::Allocation& alloc, uint64_t seed);
  void MaybeEmitStats(bool force);

  std::string NewId();
  uint64_t Rand() { return SplitMix64(&rng_); }
  double Uniform() { return UniformUnit(&rng_); }
  // A random element of `ids` (which must not be empty).
  std::string Pick(const std::vector<std::string>& ids);
  std::vector<std::string> Ids(const std::function<bool(const SequenceModel&)>& keep) const;

  const ChaosOptions options_;
  const Emit emit_;
  Progress* const progress_;
  std::atomic<bool> stop_{false};
  absl::Time end_ = absl::InfiniteFuture();
  uint64_t rng_;

  client::ModelSpec model_;
  uint32_t num_blocks_ = 0;
  std::unique_ptr<KvContent> content_;
  std::unique_ptr<client::Session> session_;

  std::map<std::string, SequenceModel> seqs_;
  std::set<std::string> uncertain_;  // to free; not in seqs_
  uint64_t serial_ = 0;
  bool need_free_ = false;  // the pool was full
  absl::Time corrupt_at_ = absl::InfiniteFuture();

  OpStats stats_;
  absl::Time next_stats_;
  // Totals of this process, in every stats event and the final report.
  nlohmann::json Totals() const;
  CheckCounts rows_checked_;
  uint64_t ops_ = 0, verified_ = 0, corruptions_ = 0, anomalies_ = 0, losses_ = 0, reattaches_ = 0,
           sequences_lost_ = 0, refusals_ = 0, transients_ = 0;
};

}  // namespace cachemgr::soak
