// ChaosWorker: one thread of a chaos client process (tools/soak/chaos_client.h). A seeded random
// mix of operations on sequences of its own: prefill and decode Allocates with K/V written
// through the mapped pool, Free, Fork and copy-on-write appends, Compress with every preset
// (reserve and byte targets, window queries or scores), Fetch, Park, GetSequence with digests,
// ListSequences, and requests that must be refused. Every answer and the pool's bytes are
// checked against its model of what each of its sequences must hold (SequenceModel).
//
// A failed call is judged before it is counted: a lost session is an outage; an answer the
// request invites (RESOURCE_EXHAUSTED when the pool is full, say) is a refusal, after which the
// sequence is checked unchanged; UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED with the session
// alive leave the sequence's state unknown, so it is freed and forgotten; anything else is an
// anomaly. A sequence whose answers or bytes disagree with its model is a corruption.
//
// Thread safety: Run() on its own thread; everything else is that thread's.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tools/soak/chaos_client.h"
#include "tools/soak/op_stats.h"
#include "tools/soak/sequence_model.h"

namespace cachemgr::soak {

class ChaosWorker {
 public:
  // `client` and `progress` outlive the worker.
  ChaosWorker(ChaosClient* client, uint32_t index, uint64_t seed, Progress* progress);

  // Works until client->Stopping(), then checks its live sequences once more and reports its
  // last stats.
  void Run();

 private:
  // kVanished: NOT_FOUND for a sequence the operator may free (its model is dropped).
  enum class Verdict { kLost, kRefused, kTransient, kAnomaly, kVanished };

  // One op (or a few), with the gate held shared and the session usable.
  void Step();
  // The session's generation moved on: this worker's sequences went with the old one.
  void Forget(uint64_t generation);

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
  // A call on `id` that memory may refuse failed: after a refusal, free something next (and at
  // times check, as `verify_why`, that the refusal changed nothing); after a transient failure,
  // forget the sequence, whose state is unknown.
  void OnMemoryBoundFailure(const char* op, const std::string& id, const absl::Status& status,
                            absl::Duration latency, const char* verify_why);
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

  // A new sequence id; `operator_may_free` marks it so (".o<serial>"; scripts/soak.py frees
  // such sequences as the operator).
  std::string NewId(bool operator_may_free);
  // Whether `id` is modelled and marked for the operator.
  bool OperatorMayFree(const std::string& id) const;
  // The operator freed `id`: forgets its model; `recreated` if a call made it exist again.
  void Vanished(const std::string& id, bool recreated);
  uint64_t Rand() { return SplitMix64(&rng_); }
  double Uniform() { return UniformUnit(&rng_); }
  // A random element of `ids` (which must not be empty).
  std::string Pick(const std::vector<std::string>& ids);
  std::vector<std::string> Ids(const std::function<bool(const SequenceModel&)>& keep) const;

  ChaosClient* const client_;
  client::Session& session_;
  const ChaosOptions& options_;
  const client::ModelSpec& model_;
  const KvContent& content_;
  ChaosTotals& totals_;
  const uint32_t index_;
  Progress* const progress_;
  uint64_t rng_;

  uint64_t generation_ = 0;  // of the sequences below
  std::map<std::string, SequenceModel> seqs_;
  std::set<std::string> uncertain_;  // to free; not in seqs_
  uint64_t serial_ = 0;
  bool need_free_ = false;  // the pool was full
  absl::Time corrupt_at_ = absl::InfiniteFuture();
  OpStats stats_;
  absl::Time next_stats_;
};

}  // namespace cachemgr::soak
