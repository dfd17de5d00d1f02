#include "tools/soak/chaos_worker.h"

#include <unistd.h>

#include <algorithm>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace cachemgr::soak {
namespace {

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// The compression presets (docs/COMPRESSION.md) and what each needs.
struct Preset {
  const char* name;
  bool scores;    // scores tokens by attention: needs window queries or scores
  bool codebook;  // may store layers as codebooks (theta_k 0.98, theta_v 0.95 by default)
};
constexpr Preset kPresets[] = {
    {"fullkv", false, false},  {"streamingllm", false, false}, {"h2o", true, false},
    {"snapkv", true, false},   {"pyramidkv", true, false},     {"pyramidinfer", true, false},
    {"zigzagkv", true, false}, {"codebook", false, true},      {"spindlekv", true, true},
};

// The op's name in reports.
constexpr char kAllocate[] = "allocate";
constexpr char kAppend[] = "append";
constexpr char kFree[] = "free";
constexpr char kFork[] = "fork";
constexpr char kCompress[] = "compress";
constexpr char kFetch[] = "fetch";
constexpr char kPark[] = "park";
constexpr char kGetSequence[] = "get_sequence";
constexpr char kList[] = "list_sequences";
constexpr char kMisuse[] = "misuse";
constexpr char kHeartbeat[] = "heartbeat";

}  // namespace

ChaosWorker::ChaosWorker(ChaosClient* client, uint32_t index, uint64_t seed, Progress* progress)
    : client_(client),
      session_(client->session()),
      options_(client->options()),
      model_(client->model()),
      content_(client->content()),
      totals_(client->totals()),
      index_(index),
      progress_(progress),
      rng_(seed) {}

void ChaosWorker::Run() {
  next_stats_ = absl::Now() + options_.stats_interval;
  if (index_ == 0 && options_.corrupt_after > absl::ZeroDuration()) {
    corrupt_at_ = absl::Now() + options_.corrupt_after;
  }
  while (!client_->Stopping()) {
    MaybeEmitStats(false);
    {
      absl::ReaderMutexLock gate(&client_->gate());
      if (session_.generation() != generation_) Forget(session_.generation());
      if (session_.lease_ok()) {
        if (absl::Now() >= corrupt_at_) {
          CorruptOnPurpose();
        } else {
          Step();
        }
        continue;
      }
    }
    client_->Recover(generation_);
  }
  {
    // The final check of everything still live.
    absl::ReaderMutexLock gate(&client_->gate());
    if (session_.generation() == generation_) {
      for (const std::string& id : Ids([](const SequenceModel&) { return true; })) {
        if (!session_.lease_ok()) break;
        Verify(id, "final");
      }
    }
  }
  MaybeEmitStats(true);
}

void ChaosWorker::Forget(uint64_t generation) {
  totals_.sequences_lost += seqs_.size();
  seqs_.clear();
  uncertain_.clear();
  need_free_ = false;
  generation_ = generation;
}

template <typename T>
T ChaosWorker::Timed(const char* op, const std::function<T()>& call, absl::Duration* latency) {
  progress_->call.store(op);
  progress_->call_started_ns.store(MonotonicNanos());
  const absl::Time start = absl::Now();
  T result = call();
  *latency = absl::Now() - start;
  progress_->call_started_ns.store(0);
  return result;
}

void ChaosWorker::RecordOk(const char* op, const std::string& sequence, absl::Duration latency) {
  ++totals_.ops;
  stats_.Record(op, "OK", latency);
  if (options_.trace) {
    client_->Report({{"event", "op"},
                     {"op", op},
                     {"sequence", sequence},
                     {"outcome", "OK"},
                     {"us", absl::ToInt64Microseconds(latency)}});
  }
}

ChaosWorker::Verdict ChaosWorker::Judge(const char* op, const std::string& sequence,
                                        const absl::Status& status, absl::Duration latency,
                                        std::initializer_list<absl::StatusCode> expected) {
  ++totals_.ops;
  stats_.Record(op, CodeName(status.code()), latency);
  if (options_.trace) {
    client_->Report({{"event", "op"},
                     {"op", op},
                     {"sequence", sequence},
                     {"outcome", StatusText(status)},
                     {"us", absl::ToInt64Microseconds(latency)}});
  }
  const bool is_expected =
      std::find(expected.begin(), expected.end(), status.code()) != expected.end();
  Verdict verdict;
  switch (status.code()) {
    // Answers about the request itself, never about the session.
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kInvalidArgument:
      verdict = is_expected ? Verdict::kRefused : Verdict::kAnomaly;
      break;
    default:
      if (!session_.lease_ok() || !ConfirmSession()) {
        verdict = Verdict::kLost;
      } else if (is_expected) {
        verdict = Verdict::kRefused;
      } else if (status.code() == absl::StatusCode::kUnavailable ||
                 status.code() == absl::StatusCode::kDeadlineExceeded ||
                 status.code() == absl::StatusCode::kCancelled) {
        verdict = Verdict::kTransient;
      } else {
        verdict = Verdict::kAnomaly;
      }
  }
  // NOT_FOUND, or ABORTED from a Compress, Fetch or Park the Free overtook.
  if (verdict == Verdict::kAnomaly && OperatorMayFree(sequence) &&
      (status.code() == absl::StatusCode::kNotFound ||
       status.code() == absl::StatusCode::kAborted)) {
    verdict = Verdict::kVanished;
  }
  switch (verdict) {
    case Verdict::kVanished:
      Vanished(sequence, /*recreated=*/false);
      break;
    case Verdict::kRefused:
      ++totals_.refusals;
      break;
    case Verdict::kTransient:
      ++totals_.transients;
      break;
    case Verdict::kAnomaly:
      if (status.code() == absl::StatusCode::kNotFound && seqs_.contains(sequence)) {
        ReportCorruption(op, sequence,
                         {absl::StrCat("the sequence vanished: ", StatusText(status))});
        seqs_.erase(sequence);
      } else {
        ReportAnomaly(op, sequence, StatusText(status));
      }
      break;
    case Verdict::kLost:
      break;
  }
  return verdict;
}

bool ChaosWorker::ConfirmSession() {
  while (true) {
    if (!session_.lease_ok()) return false;
    absl::Duration latency;
    const absl::StatusOr<uint32_t> beat = Timed<absl::StatusOr<uint32_t>>(
        kHeartbeat, [&] { return session_.Heartbeat(); }, &latency);
    stats_.Record(kHeartbeat, beat.ok() ? "OK" : CodeName(beat.status().code()), latency);
    if (beat.ok()) return true;
    // The local lease runs out within a lease timeout, so this loop ends.
    absl::SleepFor(absl::Milliseconds(50));
  }
}

void ChaosWorker::ReportCorruption(const char* op, const std::string& sequence,
                                   const std::vector<std::string>& problems) {
  ++totals_.corruptions;
  client_->Report({{"event", "corruption"},
                   {"op", op},
                   {"sequence", sequence},
                   {"generation", session_.generation()},
                   {"problems", problems}});
}

void ChaosWorker::ReportAnomaly(const char* op, const std::string& sequence,
                                const std::string& what) {
  ++totals_.anomalies;
  client_->Report({{"event", "anomaly"},
                   {"op", op},
                   {"sequence", sequence},
                   {"generation", session_.generation()},
                   {"what", what}});
}

void ChaosWorker::Drop(const std::string& id) {
  seqs_.erase(id);
  uncertain_.insert(id);
}

std::string ChaosWorker::NewId(bool operator_may_free) {
  return absl::StrCat(options_.name, ".", getpid(), ".w", index_, ".g", generation_, ".",
                      operator_may_free ? "o" : "", serial_++);
}

bool ChaosWorker::OperatorMayFree(const std::string& id) const {
  const auto it = seqs_.find(id);
  return it != seqs_.end() && it->second.operator_may_free;
}

void ChaosWorker::Vanished(const std::string& id, bool recreated) {
  ++totals_.operator_freed;
  seqs_.erase(id);
  if (recreated) uncertain_.insert(id);  // freed again by FreeUncertain
}

std::string ChaosWorker::Pick(const std::vector<std::string>& ids) {
  return ids[Rand() % ids.size()];
}

std::vector<std::string> ChaosWorker::Ids(
    const std::function<bool(const SequenceModel&)>& keep) const {
  std::vector<std::string> out;
  for (const auto& [id, m] : seqs_) {
    if (keep(m)) out.push_back(id);
  }
  return out;
}

void ChaosWorker::MaybeEmitStats(bool force) {
  if (!force && absl::Now() < next_stats_) return;
  next_stats_ = absl::Now() + options_.stats_interval;
  nlohmann::json delta = stats_.TakeDelta();
  if (delta.is_null() && !force) return;
  client_->Report({{"event", "stats"},
                   {"worker", index_},
                   {"generation", generation_},
                   {"live", seqs_.size()},
                   {"ops", delta.is_null() ? nlohmann::json::object() : delta},
                   {"totals", totals_.ToJson()}});
}

void ChaosWorker::Step() {
  if (!uncertain_.empty()) {
    FreeUncertain();
    return;
  }
  const size_t live = seqs_.size();
  const auto appendable = Ids([](const SequenceModel& m) { return !m.any_parked(); });
  const auto compressible =
      Ids([](const SequenceModel& m) { return !m.compressed && m.num_positions >= 8; });
  const auto compressed = Ids([](const SequenceModel& m) { return m.compressed; });
  const auto codebooks = Ids([](const SequenceModel& m) { return m.has_codebook(); });
  const auto all = Ids([](const SequenceModel&) { return true; });
  if (need_free_ && live > 0) {
    need_free_ = false;
    FreeOne(Pick(all));
    return;
  }
  const bool room = live < options_.max_live;
  // Weights of the ops possible now.
  const std::pair<double, std::function<void()>> ops[] = {
      {room ? 10.0 : 0.0, [&] { AllocateNew(); }},
      {appendable.empty() ? 0.0 : 22.0, [&] { Append(Pick(appendable)); }},
      {live == 0 ? 0.0 : (room ? 5.0 : 14.0), [&] { FreeOne(Pick(all)); }},
      {live > 0 && room ? 6.0 : 0.0, [&] { ForkOne(Pick(all)); }},
      {compressible.empty() ? 0.0 : 6.0, [&] { CompressOne(Pick(compressible)); }},
      {compressed.empty() ? 0.0 : 5.0, [&] { FetchOne(Pick(compressed)); }},
      {codebooks.empty() ? 0.0 : 4.0, [&] { ParkOne(Pick(codebooks)); }},
      {live == 0 ? 0.0 : 8.0, [&] { Verify(Pick(all), "random"); }},
      {2.0, [&] { ListAll(); }},
      {live == 0 ? 0.0 : 2.0, [&] { Misuse(); }},
  };
  double total = 0;
  for (const auto& [weight, op] : ops) total += weight;
  double x = Uniform() * total;
  for (const auto& [weight, op] : ops) {
    if (weight <= 0) continue;
    if (x < weight) {
      op();
      return;
    }
    x -= weight;
  }
}

void ChaosWorker::WriteRows(const client::Allocation& alloc, uint64_t seed) {
  const client::KvPoolView& pool = session_.pool();
  for (const client::LayerAllocation& la : alloc.layers) {
    for (size_t i = 0; i < la.slot_mapping.size(); ++i) {
      content_.WriteRow(seed, la.layer, alloc.first_position + i,
                        pool.key_at_slot<std::byte>(la.layer, la.slot_mapping[i]),
                        pool.value_at_slot<std::byte>(la.layer, la.slot_mapping[i]));
    }
  }
}

void ChaosWorker::AllocateNew() {
  const bool operator_may_free = Uniform() < 0.2;
  const std::string id = NewId(operator_may_free);
  // A prompt: more than the default observation window (32), so that eviction has a choice.
  const uint32_t count = 33 + static_cast<uint32_t>(Rand() % 160);
  SequenceModel model = SequenceModel::Empty(id, model_.num_layers, model_.num_kv_heads);
  model.operator_may_free = operator_may_free;
  absl::Duration latency;
  const absl::StatusOr<client::Allocation> alloc = Timed<absl::StatusOr<client::Allocation>>(
      kAllocate, [&] { return session_.Allocate(id, count); }, &latency);
  if (!alloc.ok()) {
    switch (Judge(kAllocate, id, alloc.status(), latency, {absl::StatusCode::kResourceExhausted})) {
      case Verdict::kRefused: {
        need_free_ = true;
        // All or nothing: the refused sequence must not exist.
        if (Uniform() < 0.3) {
          const absl::StatusOr<client::SequenceInfo> info = session_.GetSequence(id);
          if (info.ok()) {
            ReportCorruption(kAllocate, id, {"a refused Allocate created the sequence"});
            Drop(id);
          }
        }
        return;
      }
      case Verdict::kTransient:
        uncertain_.insert(id);
        return;
      default:
        return;
    }
  }
  RecordOk(kAllocate, id, latency);
  if (const auto problems = CheckAllocation(model, true, count, *alloc, session_.pool().layout());
      !problems.empty()) {
    ReportCorruption(kAllocate, id, problems);
    uncertain_.insert(id);
    return;
  }
  // The writer's protocol: check the lease before each batch of stores.
  if (!session_.lease_ok()) return;
  const uint64_t seed = Rand();
  WriteRows(*alloc, seed);
  model.Append(count, seed);
  seqs_.emplace(id, std::move(model));
  if (Uniform() < 0.5) Verify(id, "after prefill");
}

void ChaosWorker::Append(const std::string& id) {
  // Mostly decode steps, sometimes a chunk.
  const uint32_t count = Uniform() < 0.75 ? 1 + static_cast<uint32_t>(Rand() % 4)
                                          : 8 + static_cast<uint32_t>(Rand() % 33);
  absl::Duration latency;
  const absl::StatusOr<client::Allocation> alloc = Timed<absl::StatusOr<client::Allocation>>(
      kAppend, [&] { return session_.Allocate(id, count); }, &latency);
  if (!alloc.ok()) {
    OnMemoryBoundFailure(kAppend, id, alloc.status(), latency, "after refused append");
    return;
  }
  RecordOk(kAppend, id, latency);
  if (alloc->created && OperatorMayFree(id)) {
    Vanished(id, /*recreated=*/true);  // the operator freed it; this Allocate began it anew
    return;
  }
  SequenceModel& model = seqs_.at(id);
  if (const auto problems = CheckAllocation(model, false, count, *alloc, session_.pool().layout());
      !problems.empty()) {
    ReportCorruption(kAppend, id, problems);
    Drop(id);
    return;
  }
  if (!session_.lease_ok()) return;
  const uint64_t seed = Rand();
  WriteRows(*alloc, seed);
  model.Append(count, seed);
  // Appends after a fork copy the shared tail block: always check those.
  const bool copied =
      std::any_of(alloc->layers.begin(), alloc->layers.end(),
                  [](const client::LayerAllocation& l) { return !l.copies.empty(); });
  if (copied || Uniform() < 0.2) Verify(id, copied ? "after copy-on-write" : "after append");
}

void ChaosWorker::FreeOne(const std::string& id) {
  absl::Duration latency;
  const absl::StatusOr<uint64_t> freed = Timed<absl::StatusOr<uint64_t>>(
      kFree, [&] { return session_.Free(id); }, &latency);
  if (freed.ok()) {
    RecordOk(kFree, id, latency);
    seqs_.erase(id);
    return;
  }
  if (Judge(kFree, id, freed.status(), latency, {}) == Verdict::kTransient) Drop(id);
}

void ChaosWorker::FreeUncertain() {
  const std::string id = *uncertain_.begin();
  absl::Duration latency;
  const absl::StatusOr<uint64_t> freed = Timed<absl::StatusOr<uint64_t>>(
      kFree, [&] { return session_.Free(id); }, &latency);
  if (freed.ok()) {
    RecordOk(kFree, id, latency);
    uncertain_.erase(id);
    return;
  }
  // NOT_FOUND: the call that left it unknown never created it.
  if (Judge(kFree, id, freed.status(), latency, {absl::StatusCode::kNotFound}) ==
      Verdict::kRefused) {
    uncertain_.erase(id);
  }
}

void ChaosWorker::ForkOne(const std::string& parent) {
  const bool operator_may_free = Uniform() < 0.2;
  const std::string child = NewId(operator_may_free);
  absl::Duration latency;
  const absl::StatusOr<client::SequenceInfo> info = Timed<absl::StatusOr<client::SequenceInfo>>(
      kFork, [&] { return session_.Fork(parent, child); }, &latency);
  if (!info.ok()) {
    if (Judge(kFork, parent, info.status(), latency, {}) == Verdict::kTransient) {
      uncertain_.insert(child);
    }
    return;
  }
  RecordOk(kFork, parent, latency);
  SequenceModel model = seqs_.at(parent);
  model.id = child;
  model.parent = parent;
  model.operator_may_free = operator_may_free;
  if (info->sequence_id != child || info->parent_sequence_id != parent ||
      info->num_positions != model.num_positions || info->layers.size() != model.layers.size()) {
    ReportCorruption(kFork, child,
                     {absl::StrCat("Fork answered sequence ", info->sequence_id, " (parent ",
                                   info->parent_sequence_id, ", ", info->num_positions,
                                   " positions, ", info->layers.size(), " layers)")});
    uncertain_.insert(child);
    return;
  }
  seqs_.emplace(child, std::move(model));
  if (Uniform() < 0.4) Verify(child, "after fork");
  // Copy on write: append to one side while the other still shares the tail block.
  const std::string& side = Uniform() < 0.5 ? child : parent;
  if (Uniform() < 0.6 && seqs_.contains(side) && !seqs_.at(side).any_parked()) Append(side);
}

void ChaosWorker::CompressOne(const std::string& id) {
  const SequenceModel& before = seqs_.at(id);
  const uint32_t rows = before.layers[0].rows();
  const Preset& preset = kPresets[Rand() % std::size(kPresets)];
  client::CompressOptions options;
  options.policy.preset = preset.name;
  float theta_k = 0.98f, theta_v = 0.95f;
  if (preset.codebook) {
    if (Uniform() < 0.4) {
      theta_k = static_cast<float>(0.90 + 0.09 * Uniform());
      theta_v = static_cast<float>(0.85 + 0.13 * Uniform());
      options.policy.theta_k = theta_k;
      options.policy.theta_v = theta_v;
    }
    if (Uniform() < 0.5) options.policy.codebook_only_if_smaller = false;
    if (Uniform() < 0.3) options.policy.codebook_scope = client::CodebookScope::kKvHead;
    if (Uniform() < 0.5) options.policy.append_batch = 2 + static_cast<uint32_t>(Rand() % 15);
  }
  if (preset.scores && Uniform() < 0.4)
    options.policy.window = 4 + static_cast<uint32_t>(Rand() % 28);
  if (std::string(preset.name) == "streamingllm" && Uniform() < 0.4) {
    options.policy.sinks = static_cast<uint32_t>(Rand() % 8);
  }
  if (Uniform() < 0.5) {
    options.target_kind = client::CompressTargetKind::kReserveRatio;
    options.target = 0.15 + 0.8 * Uniform();
  } else {
    options.target_kind = client::CompressTargetKind::kByteRatio;
    options.target = 0.2 + 0.75 * Uniform();
  }
  // Inputs, written into the input buffer: window queries [layers, queries, q_heads, head_dim]
  // or scores [layers, q_heads, rows].
  const std::span<float> buffer = session_.input_buffer();
  const size_t per_query = size_t{model_.num_layers} * model_.num_q_heads * model_.head_dim;
  const size_t score_floats = size_t{model_.num_layers} * model_.num_q_heads * rows;
  size_t floats = 0;
  if (preset.scores) {
    if (Uniform() < 0.7 || score_floats > buffer.size()) {
      options.input = client::CompressInputSource::kWindowQueries;
      const size_t most = std::min<size_t>(rows, buffer.size() / per_query);
      options.num_queries = 1 + static_cast<uint32_t>(Rand() % most);
      floats = per_query * options.num_queries;
    } else {
      options.input = client::CompressInputSource::kScores;
      floats = score_floats;
    }
  }
  if (!session_.lease_ok()) return;
  uint64_t state = Rand();
  for (size_t i = 0; i < floats; ++i) {
    // Scores must be non-negative; queries any sign.
    const float u = static_cast<float>(UniformUnit(&state));
    buffer[i] = options.input == client::CompressInputSource::kScores ? u : 2.0f * u - 1.0f;
  }
  absl::Duration latency;
  const absl::StatusOr<client::CompressResult> result =
      Timed<absl::StatusOr<client::CompressResult>>(
          kCompress, [&] { return session_.Compress(id, options); }, &latency);
  if (!result.ok()) {
    // OUT_OF_RANGE: a byte ratio the policy cannot reach here; RESOURCE_EXHAUSTED: a layer shared
    // with a fork needs fresh blocks.
    switch (Judge(kCompress, id, result.status(), latency,
                  {absl::StatusCode::kOutOfRange, absl::StatusCode::kResourceExhausted})) {
      case Verdict::kRefused:
        Verify(id, "after refused compress");
        return;
      case Verdict::kTransient:
        Drop(id);
        return;
      default:
        return;
    }
  }
  RecordOk(kCompress, id, latency);
  SequenceModel after;
  if (const auto problems =
          CheckCompress(before, *result, session_.pool().layout(), theta_k, theta_v, &after);
      !problems.empty()) {
    ReportCorruption(kCompress, id, problems);
    Drop(id);
    return;
  }
  seqs_[id] = std::move(after);
  Verify(id, "after compress");
}

void ChaosWorker::FetchOne(const std::string& id) {
  const SequenceModel& before = seqs_.at(id);
  std::vector<uint32_t> layers;
  if (Uniform() < 0.3) {
    for (uint32_t l = 0; l < model_.num_layers; ++l) {
      if (Uniform() < 0.5) layers.push_back(l);
    }
    std::shuffle(layers.begin(), layers.end(), std::mt19937_64(Rand()));
  }
  absl::Duration latency;
  const absl::StatusOr<std::vector<client::FetchedLayer>> fetched =
      Timed<absl::StatusOr<std::vector<client::FetchedLayer>>>(
          kFetch, [&] { return session_.Fetch(id, layers); }, &latency);
  if (!fetched.ok()) {
    OnMemoryBoundFailure(kFetch, id, fetched.status(), latency, "after refused fetch");
    return;
  }
  RecordOk(kFetch, id, latency);
  const bool reconstructed = before.any_parked();
  SequenceModel after;
  if (const auto problems = CheckFetch(before, layers, *fetched, session_.pool().layout(), &after);
      !problems.empty()) {
    ReportCorruption(kFetch, id, problems);
    Drop(id);
    return;
  }
  seqs_[id] = std::move(after);
  if (reconstructed || Uniform() < 0.2) Verify(id, "after fetch");
}

void ChaosWorker::ParkOne(const std::string& id) {
  const SequenceModel& before = seqs_.at(id);
  std::vector<uint32_t> layers;
  if (Uniform() < 0.3) {
    for (uint32_t l = 0; l < model_.num_layers; ++l) {
      if (before.layers[l].codebook && Uniform() < 0.6) layers.push_back(l);
    }
  }
  absl::Duration latency;
  const absl::StatusOr<std::vector<client::ParkedLayer>> parked =
      Timed<absl::StatusOr<std::vector<client::ParkedLayer>>>(
          kPark, [&] { return session_.Park(id, layers); }, &latency);
  if (!parked.ok()) {
    if (Judge(kPark, id, parked.status(), latency, {}) == Verdict::kTransient) Drop(id);
    return;
  }
  RecordOk(kPark, id, latency);
  SequenceModel after;
  if (const auto problems = CheckPark(before, layers, *parked, &after); !problems.empty()) {
    ReportCorruption(kPark, id, problems);
    Drop(id);
    return;
  }
  seqs_[id] = std::move(after);
  if (Uniform() < 0.3) Verify(id, "after park");
}

void ChaosWorker::CorruptOnPurpose() {
  const auto resident =
      Ids([](const SequenceModel& m) { return !m.layers[0].parked && m.layers[0].rows() > 0; });
  if (resident.empty()) {
    Step();  // nothing to corrupt yet
    return;
  }
  const std::string id = Pick(resident);
  const absl::StatusOr<client::SequenceInfo> info = session_.GetSequence(id);
  if (!info.ok() || info->layers.empty() || info->layers[0].block_ids.empty() ||
      !session_.lease_ok()) {
    return;  // try again
  }
  const client::KvPoolView& pool = session_.pool();
  // The element's top byte (sign and exponent): a change no tolerance for reconstructed rows
  // absorbs.
  std::byte* at =
      pool.layer_base(0) +
      pool.layout().head_offset(kernels::KvPlane::kKey, info->layers[0].block_ids[0], 0, 0) +
      pool.layout().elem_bytes - 1;
  *at ^= std::byte{0x40};
  client_->Report({{"event", "corrupted_on_purpose"}, {"sequence", id}});
  const uint64_t reported = totals_.corruptions;
  Verify(id, "after a deliberate corruption");
  // Done once the check reported it; when the check could not run (the lease or the daemon went
  // meanwhile, taking the sequence along), plant another.
  corrupt_at_ = totals_.corruptions > reported ? absl::InfiniteFuture() : absl::Now();
}

void ChaosWorker::OnMemoryBoundFailure(const char* op, const std::string& id,
                                       const absl::Status& status, absl::Duration latency,
                                       const char* verify_why) {
  switch (Judge(op, id, status, latency, {absl::StatusCode::kResourceExhausted})) {
    case Verdict::kRefused:
      need_free_ = true;
      if (Uniform() < 0.3) Verify(id, verify_why);
      return;
    case Verdict::kTransient:
      Drop(id);
      return;
    default:
      return;
  }
}

void ChaosWorker::Verify(const std::string& id, const char* why) {
  absl::Duration latency;
  const absl::StatusOr<client::SequenceInfo> info = Timed<absl::StatusOr<client::SequenceInfo>>(
      kGetSequence, [&] { return session_.GetSequence(id, /*include_kv_digest=*/true); }, &latency);
  if (!info.ok()) {
    Judge(kGetSequence, id, info.status(), latency, {});
    return;
  }
  RecordOk(kGetSequence, id, latency);
  SequenceModel checked = seqs_.at(id);
  CheckCounts counts;
  std::vector<std::string> problems =
      CheckSequence(*info, session_.pool(), content_, &checked, &counts);
  // The reader's protocol: what was read counts only if no revocation had begun.
  if (!session_.lease_ok()) return;
  totals_.vectors_exact += counts.exact;
  totals_.vectors_reconstructed += counts.reconstructed;
  totals_.vectors_unchanged += counts.unchanged;
  if (!problems.empty()) {
    problems.insert(problems.begin(), absl::StrCat("checked ", why));
    ReportCorruption(kGetSequence, id, problems);
    Drop(id);
    return;
  }
  ++totals_.verified;
  seqs_[id] = std::move(checked);
}

void ChaosWorker::ListAll() {
  absl::Duration latency;
  const absl::StatusOr<std::vector<client::SequenceSummary>> listed =
      Timed<absl::StatusOr<std::vector<client::SequenceSummary>>>(
          kList, [&] { return session_.ListSequences(); }, &latency);
  if (!listed.ok()) {
    Judge(kList, "", listed.status(), latency, {});
    return;
  }
  RecordOk(kList, "", latency);
  // The other workers' sequences change meanwhile: only this worker's are checked.
  const std::string mine = absl::StrCat(options_.name, ".", getpid(), ".w", index_, ".");
  std::set<std::string> seen;
  std::vector<std::string> problems;
  for (const client::SequenceSummary& s : *listed) {
    seen.insert(s.sequence_id);
    if (s.owner_client_id != session_.client_id()) {
      problems.push_back(
          absl::StrCat("ListSequences shows ", s.sequence_id, " of client ", s.owner_client_id));
    } else if (absl::StartsWith(s.sequence_id, mine) && !seqs_.contains(s.sequence_id) &&
               !uncertain_.contains(s.sequence_id)) {
      problems.push_back(
          absl::StrCat("ListSequences shows ", s.sequence_id, ", which this client does not hold"));
    }
  }
  std::vector<std::string> freed;
  for (const auto& [id, m] : seqs_) {
    if (seen.contains(id)) continue;
    if (m.operator_may_free) {
      freed.push_back(id);
    } else {
      problems.push_back(absl::StrCat("ListSequences omits ", id));
    }
  }
  for (const std::string& id : freed) Vanished(id, /*recreated=*/false);
  if (!problems.empty() && session_.lease_ok()) {
    if (problems.size() > kMaxProblems) problems.resize(kMaxProblems);
    ReportCorruption(kList, "", problems);
  }
}

void ChaosWorker::Misuse() {
  // A request the daemon must refuse with a precise code, changing nothing.
  const auto parked = Ids([](const SequenceModel& m) { return m.any_parked(); });
  const auto compressed = Ids([](const SequenceModel& m) { return m.compressed; });
  const auto plain = Ids([](const SequenceModel& m) { return !m.compressed; });
  const auto all = Ids([](const SequenceModel&) { return true; });
  std::string target;
  std::string may_create;  // what an accepted call would have created
  absl::Status status;
  absl::StatusCode expected;
  std::string what;
  absl::Duration latency;
  const uint64_t kind = Rand() % 6;
  if (kind == 0 && !parked.empty()) {
    target = Pick(parked);
    may_create = target;
    what = "Allocate on a parked sequence";
    expected = absl::StatusCode::kFailedPrecondition;
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Allocate(target, 1).status(); }, &latency);
  } else if (kind == 1 && !compressed.empty()) {
    target = Pick(compressed);
    what = "Compress of a compressed sequence";
    expected = absl::StatusCode::kFailedPrecondition;
    client::CompressOptions options;
    options.policy.preset = "streamingllm";
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Compress(target, options).status(); }, &latency);
  } else if (kind == 2 && all.size() >= 2) {
    target = Pick(all);
    const std::string other = Pick(all);
    if (other == target) return;
    may_create = other;
    what = "Fork onto an existing sequence";
    expected = absl::StatusCode::kAlreadyExists;
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Fork(target, other).status(); }, &latency);
  } else if (kind == 3) {
    target = Pick(all);
    what = "Fetch of a layer past the model";
    expected = absl::StatusCode::kInvalidArgument;
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Fetch(target, {model_.num_layers}).status(); }, &latency);
  } else if (kind == 4 && !plain.empty()) {
    target = Pick(plain);
    what = "Park of a sequence never compressed";
    expected = absl::StatusCode::kFailedPrecondition;
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Park(target).status(); }, &latency);
  } else if (kind == 5 && !plain.empty()) {
    target = Pick(plain);
    what = "Compress with more window queries than tokens";
    expected = absl::StatusCode::kInvalidArgument;
    client::CompressOptions options;
    options.policy.preset = "snapkv";
    options.input = client::CompressInputSource::kWindowQueries;
    options.num_queries = static_cast<uint32_t>(seqs_.at(target).layers[0].rows()) + 1;
    status = Timed<absl::Status>(
        kMisuse, [&] { return session_.Compress(target, options).status(); }, &latency);
  } else {
    return;
  }
  if (status.ok()) {
    ++totals_.ops;
    stats_.Record(kMisuse, "OK", latency);
    if (OperatorMayFree(may_create)) {
      Vanished(may_create, /*recreated=*/true);  // the operator freed it meanwhile
    } else {
      ReportAnomaly(kMisuse, target, absl::StrCat(what, " was accepted"));
      Drop(target);
    }
    return;
  }
  // A code other than `expected` is reported as an anomaly by Judge.
  Judge(kMisuse, target, status, latency, {expected});
  if (seqs_.contains(target) && session_.lease_ok()) Verify(target, "after a refused misuse");
}

}  // namespace cachemgr::soak
