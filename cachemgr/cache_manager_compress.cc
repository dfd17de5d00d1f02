// CacheManager::Compress, Fetch and Park (docs/COMPRESSION.md). Each runs in three steps:
// under the lock it validates and copies what it needs out of the pool and marks the sequence
// busy; outside the lock it does the math on those private copies (never touching the pool or
// the manager's state); under the lock again it finds the sequence (by serial: it may have been
// freed meanwhile) and applies the result, or changes nothing.
//
// Sizes: what a client chooses (the input a Compress reads from its buffer) is overflow-checked
// against the buffer. Every other scratch size is a row count (< 2^32) times a validated model's
// per-row floats (num_kv_heads * head_dim <= 2^22) or a product of an existing pool's counts,
// whose total bytes PlanPool checked to fit 2^63: none can wrap.
#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/backend/sharded_pool_memory.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/compress/validation.h"
#include "cachemgr/reply_size.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/parallel_for.h"
#include "cachemgr/util/status_macros.h"
#include "kernels/cpu/token_rows.h"

namespace cachemgr {

using cache_manager_internal::CeilDiv;
using cache_manager_internal::CheckNotBusy;
using cache_manager_internal::GatherLayerRows;
using cache_manager_internal::RowSlots;
using cache_manager_internal::ShapeOf;
using cache_manager_internal::ShutdownCancelled;
using cache_manager_internal::SlotOf;

namespace {

// A private copy of Compress's inputs, laid out per layer as the compression library reads them
// (window queries [num_queries, H_q, head_dim], scores [H_q, n]). A group's ranks each wrote
// their query heads' share to their own buffer (H_q / size heads per layer, in the same
// layout), joined here by head.
std::vector<float> CopyInputs(const std::vector<std::shared_ptr<const MemfdRegion>>& buffers,
                              CompressInput input, const compress::ModelShape& shape,
                              uint32_t num_queries, uint32_t n, size_t per_layer) {
  const uint32_t parts = static_cast<uint32_t>(buffers.size());
  const uint32_t heads = shape.num_q_heads, part_heads = heads / parts;
  const size_t part_per_layer = per_layer / parts;
  const bool queries = input == CompressInput::kWindowQueries;
  const size_t outer = queries ? num_queries : 1, inner = queries ? shape.head_dim : n;
  std::vector<float> out(size_t{shape.num_layers} * per_layer);
  for (uint32_t r = 0; r < parts; ++r) {
    const float* buffer = reinterpret_cast<const float*>(buffers[r]->data());
    for (uint32_t l = 0; l < shape.num_layers; ++l) {
      CopyHeadRange(buffer + l * part_per_layer, part_heads, 0, out.data() + l * per_layer, heads,
                    r * part_heads, part_heads, outer, inner);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<compress::PolicyConfig> ResolvePreset(const std::string& preset) {
  const std::string name = preset.empty() ? std::string(compress::kDefaultPreset) : preset;
  absl::StatusOr<compress::PolicyConfig> policy = compress::PresetPolicy(name);
  if (!policy.ok()) {
    // The library's message quotes the whole name; this one quotes at most 64 bytes of it.
    return absl::InvalidArgumentError(
        absl::StrCat("policy.preset ", QuoteForMessage(name),
                     " is unknown; known: ", absl::StrJoin(compress::PresetNames(), ", ")));
  }
  return policy;
}

absl::StatusOr<std::shared_ptr<const ClientEvent>> CacheManager::WriteEventLocked(
    Client& client, const std::string& handle) {
  if (handle.empty()) return nullptr;
  if (client.write_event == nullptr || client.write_event_handle != handle) {
    ASSIGN_OR_RETURN(std::unique_ptr<ClientEvent> opened,
                     client.pool->rank_backends[client.rank]->OpenClientEvent(handle));
    client.write_event = std::move(opened);
    client.write_event_handle = handle;
  }
  return client.write_event;
}

namespace cache_manager_internal {

compress::ModelShape ShapeOf(const ModelSpec& m) {
  compress::ModelShape s;
  s.num_layers = m.num_layers;
  s.num_q_heads = m.num_q_heads;
  s.num_kv_heads = m.num_kv_heads;
  s.head_dim = m.head_dim;
  s.elem_bytes = DTypeBytes(m.dtype);
  s.stored_float = m.dtype == DType::kFp16   ? compress::StoredFloat::kFp16
                   : m.dtype == DType::kBf16 ? compress::StoredFloat::kBf16
                                             : compress::StoredFloat::kFloat32;
  switch (m.rope.style) {
    case RopeStyle::kNone:
      s.rope_style = compress::RopeStyle::kNone;
      break;
    case RopeStyle::kInterleaved:
      s.rope_style = compress::RopeStyle::kInterleaved;
      break;
    case RopeStyle::kHalfSplit:
      s.rope_style = compress::RopeStyle::kHalfSplit;
      break;
  }
  s.rope_theta = m.rope.theta;
  s.rope_scaling = m.rope.scaling_factor == 0 ? 1.0 : m.rope.scaling_factor;
  s.rotary_dim = m.rope.rotary_dim;
  return s;
}

// The slots of rows [begin, end) of a layer table.
std::vector<int64_t> RowSlots(const std::vector<uint32_t>& blocks, uint32_t begin, uint32_t end,
                              uint32_t block_size) {
  std::vector<int64_t> slots;
  slots.reserve(end - begin);
  for (uint32_t r = begin; r < end; ++r) slots.push_back(SlotOf(blocks, r, block_size));
  return slots;
}

// A layer's rows at `slots` as float32 [slots.size(), num_kv_heads, head_dim].
absl::Status GatherLayerRows(const PoolMemory& memory, uint32_t layer,
                             const std::vector<int64_t>& slots, std::vector<float>* keys,
                             std::vector<float>* values) {
  const kernels::KvLayerLayout& layout = memory.layout();
  keys->resize(slots.size() * layout.num_kv_heads * layout.head_dim);
  values->resize(keys->size());
  return memory.GatherTokens(layer, slots, keys->data(), values->data());
}

}  // namespace cache_manager_internal

namespace {

absl::Status FreedMeanwhile(const std::string& sequence_id, const char* call) {
  return absl::AbortedError(absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                                         " was freed while ", call,
                                         " worked on it; nothing was changed"));
}

// `layers` resolved against the model: empty means all; INVALID_ARGUMENT for one out of range or
// listed twice.
absl::StatusOr<std::vector<uint32_t>> ResolveLayers(const std::vector<uint32_t>& layers,
                                                    uint32_t num_layers) {
  std::vector<uint32_t> which = layers;
  if (which.empty()) {
    for (uint32_t l = 0; l < num_layers; ++l) which.push_back(l);
  }
  std::vector<bool> seen(num_layers, false);
  for (size_t i = 0; i < which.size(); ++i) {
    if (which[i] >= num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layers[", i, "] = ", which[i],
                                                     " but the model has ", num_layers, " layers"));
    }
    if (seen[which[i]]) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", i, "] = ", which[i], " is listed twice"));
    }
    seen[which[i]] = true;
  }
  return which;
}

}  // namespace

uint32_t CacheManager::CompressThreads() const {
  return options_.compress_threads == 0 ? std::max(1u, std::thread::hardware_concurrency())
                                        : options_.compress_threads;
}

std::vector<uint32_t> CacheManager::RowPositionsLocked(const Sequence& seq, uint32_t layer) const {
  if (seq.compression == nullptr) return {};
  const Compression::Layer& cl = seq.compression->layers[layer];
  const uint32_t hkv = seq.owner->pool->model.num_kv_heads;
  const std::vector<uint32_t> base = cl.coded != nullptr ? cl.coded->Positions() : cl.positions;
  const uint32_t base_rows = cl.coded != nullptr ? cl.coded->rows() : cl.rows;
  const uint32_t rows = seq.layers[layer].num_tokens;
  // Rows past the stored ones were appended since, in position order: the sequence's last ones.
  std::vector<uint32_t> out;
  out.reserve(size_t{hkv} * rows);
  for (uint32_t h = 0; h < hkv; ++h) {
    out.insert(out.end(), base.begin() + size_t{h} * base_rows,
               base.begin() + size_t{h + 1} * base_rows);
    for (uint32_t r = base_rows; r < rows; ++r) {
      out.push_back(static_cast<uint32_t>(seq.num_positions - rows + r));
    }
  }
  return out;
}

namespace {

const char* TargetField(const CompressParams& params) {
  return params.target.kind == compress::TargetKind::kReserveRatio ? "target.reserve_ratio"
                                                                   : "target.byte_ratio";
}

// A failed work's status as the request names things: the library calls the target
// "target.value", the request by its kind.
absl::Status WorkError(const CompressParams& params, const absl::Status& status) {
  std::string message(status.message());
  if (const size_t at = message.find("target.value"); at != std::string::npos) {
    message.replace(at, std::string("target.value").size(), TargetField(params));
  }
  return absl::Status(status.code(), message);
}

// Per KV head: the kept rows' positions, then `appended` rows at positions
// [num_positions - appended, num_positions).
std::vector<uint32_t> PositionsWithAppended(const std::vector<uint32_t>& kept, uint32_t rows,
                                            uint32_t num_kv_heads, uint32_t appended,
                                            uint64_t num_positions) {
  if (appended == 0) return kept;
  std::vector<uint32_t> out;
  out.reserve(size_t{num_kv_heads} * (rows + appended));
  for (uint32_t h = 0; h < num_kv_heads; ++h) {
    out.insert(out.end(), kept.begin() + size_t{h} * rows, kept.begin() + size_t{h + 1} * rows);
    for (uint32_t i = 0; i < appended; ++i) {
      out.push_back(static_cast<uint32_t>(num_positions - appended + i));
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::shared_ptr<CacheManager::CompressJob>> CacheManager::BeginCompressLocked(
    const Caller& caller, const std::string& sequence_id, const CompressParams& params) {
  ASSIGN_OR_RETURN(Sequence * seq, FindSequenceForCallerLocked(caller, sequence_id));
  Client* client = seq->owner;
  if (!caller.has_session() && params.input != CompressInput::kNone) {
    return absl::InvalidArgumentError(
        "input must be NONE for an operator Compress (no session_token): the window queries "
        "or scores of a sequence are its owner's");
  }
  if (!caller.has_session() && !params.cuda_ipc_event_handle.empty()) {
    return absl::InvalidArgumentError(
        "cuda_ipc_event_handle must be empty for an operator Compress (no session_token): the "
        "write event is the owner's");
  }
  if (!caller.has_session() && params.background) {
    return absl::InvalidArgumentError(
        "background must be false for an operator Compress (no session_token): only the owner "
        "can finish it");
  }
  RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
  if (seq->background != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                     " has a background Compress pending: FinishCompress it first"));
  }
  if (seq->compression != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                     " is already compressed; compressing a sequence twice is not supported"));
  }
  Pool& pool = *client->pool;
  const ModelSpec& model = pool.model;
  const uint32_t num_layers = model.num_layers;
  RETURN_IF_ERROR(compress::ValidatePolicy(params.policy));
  if (!(params.target.value > 0.0 && params.target.value <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(TargetField(params), " must be in (0, 1] (got ", params.target.value, ")"));
  }
  auto job = std::make_shared<CompressJob>();
  const uint32_t n = seq->layers[0].num_tokens;
  const uint32_t hq = model.num_q_heads, dim = model.head_dim;
  if (params.input != CompressInput::kNone) {
    if (pool.group_size == 1) {
      job->input_buffers.push_back(client->input_buffer);
    } else {
      for (uint32_t r = 0; r < pool.group_size; ++r) {
        if (pool.ranks[r] == nullptr) {
          return absl::FailedPreconditionError(absl::StrCat(
              "group.rank ", r, " of group ", QuoteForMessage(pool.group_name),
              " is not attached: its input buffer holds its heads' share of the input"));
        }
        job->input_buffers.push_back(pool.ranks[r]->input_buffer);
      }
    }
  }
  // Every buffer holds its share: the smallest bounds what the input may need.
  uint64_t buffer_bytes = UINT64_MAX;
  for (const auto& b : job->input_buffers) {
    buffer_bytes = std::min<uint64_t>(buffer_bytes, b->size());
  }
  const char* buffer_name =
      pool.group_size == 1 ? "the input buffer" : "the smallest input buffer of the group";
  if (params.input == CompressInput::kWindowQueries) {
    if (params.num_queries == 0) {
      return absl::InvalidArgumentError("num_queries must be >= 1 for WINDOW_QUERIES input");
    }
    // The window holds the last positions of the sequence; this also bounds the size math.
    if (params.num_queries > n) {
      return absl::InvalidArgumentError(absl::StrCat("num_queries ", params.num_queries,
                                                     " exceeds the sequence's ", n, " tokens"));
    }
    // num_queries <= n < 2^32, hq, dim <= 2^12 and num_layers <= 2^10: below 2^58 * 4.
    job->per_layer_inputs = size_t{params.num_queries} * hq * dim;
    const uint64_t need =
        CheckedProduct({num_layers, job->per_layer_inputs / pool.group_size, sizeof(float)})
            .value_or(UINT64_MAX);
    if (need > buffer_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("num_queries ", params.num_queries, " needs ",
                                                     need, " bytes of window queries but ",
                                                     buffer_name, " holds ", buffer_bytes));
    }
  } else if (params.input == CompressInput::kScores) {
    job->per_layer_inputs = size_t{hq} * n;
    const uint64_t need =
        CheckedProduct({num_layers, job->per_layer_inputs / pool.group_size, sizeof(float)})
            .value_or(UINT64_MAX);
    if (need > buffer_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("input: scores for ", n, " tokens need ", need,
                                                     " bytes but ", buffer_name, " holds ",
                                                     buffer_bytes));
    }
  }
  if (params.background &&
      client->background_compresses >= options_.max_background_compresses_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "background: the client has ", client->background_compresses,
        " background Compresses not yet finished, the daemon's limit; FinishCompress one first"));
  }
  job->slots.resize(num_layers);
  job->shared.assign(num_layers, false);
  for (uint32_t l = 0; l < num_layers; ++l) {
    const auto& t = seq->layers[l];
    if (t.num_tokens != n || t.parked) {
      return absl::InternalError(
          absl::StrCat("layer ", l, " holds ", t.num_tokens, " rows but layer 0 holds ", n));
    }
    job->slots[l] = RowSlots(t.blocks, 0, n, model.block_size);
    for (uint32_t b : t.blocks) {
      job->shared[l] = job->shared[l] || pool.allocators[l].refcount(b) > 1;
    }
  }
  ASSIGN_OR_RETURN(job->write_event, WriteEventLocked(*client, params.cuda_ipc_event_handle));
  job->client_id = client->client_id;
  job->sequence_id = sequence_id;
  job->serial = seq->serial;
  job->params = params;
  job->shape = ShapeOf(model);
  job->n = n;
  job->threads = CompressThreads();
  job->memory = pool.memory;
  seq->compress_error = absl::OkStatus();
  if (params.background) {
    // Every block of rows [0, n) stays referenced until the job ends, so an append into the
    // last one copies it on write and nothing else can write them meanwhile.
    job->pinned.resize(num_layers);
    for (uint32_t l = 0; l < num_layers; ++l) {
      job->pinned[l] = seq->layers[l].blocks;
      for (uint32_t b : job->pinned[l]) pool.allocators[l].AddRef(b);
    }
    seq->background = job;
    ++client->background_compresses;
  } else {
    seq->busy = "Compress";
  }
  return job;
}

void CacheManager::ComputeCompress(CompressJob& job) const {
  // Outside the lock, on the job's private copies and the pool rows [0, n) (which nothing
  // writes meanwhile: the sequence is busy, or the job references their blocks), after the
  // client's write event if it passed one: per layer, the window scores computed next to the
  // pool (on the GPU for a CUDA pool, so the keys never leave it), and host rows where they are
  // read: by the codebook build, and by a layer that shares a block with a fork (its kept rows
  // go to fresh blocks). Then the policy, then the codebook layers' coded form.
  const CompressParams& params = job.params;
  const compress::ModelShape& shape = job.shape;
  const uint32_t n = job.n;
  PoolMemory& memory = *job.memory;
  if (job.per_layer_inputs > 0 && job.inputs.empty()) {
    job.inputs = CopyInputs(job.input_buffers, params.input, shape, params.num_queries, n,
                            job.per_layer_inputs);
    job.input_buffers.clear();
  }
  const bool scores_needed =
      params.input == CompressInput::kWindowQueries && compress::PolicyNeedsScores(params.policy);
  const bool on_device = memory.computes_on_device();
  // Host rows are read for a codebook (every layer) and for a layer shared with a fork. Window
  // scores come from the pool where that saves a transfer: always on a device; on the host
  // only for a layer whose rows are not read anyway (else CompressSequence scores the rows it
  // has, bit for bit the same sums).
  auto rows_read = [&](uint32_t l) { return params.policy.codebook || job.shared[l]; };
  auto scores_from_pool = [&](uint32_t l) { return scores_needed && (on_device || !rows_read(l)); };
  std::vector<std::vector<float>> sums(shape.num_layers);
  job.keys.assign(shape.num_layers, {});
  job.values.assign(shape.num_layers, {});
  job.coded.assign(shape.num_layers, nullptr);
  absl::Status read = absl::OkStatus();
  if (job.write_event != nullptr) {
    if (absl::Status s = job.write_event->Wait(); !s.ok()) {
      read = absl::InternalError(
          absl::StrCat("waiting for the client's write event failed: ", s.message()));
    }
  }
  auto read_layer = [&](uint32_t l) -> absl::Status {
    if (shutting_down_.load()) return ShutdownCancelled("Compress");
    if (scores_from_pool(l)) {
      sums[l].resize(size_t{shape.num_q_heads} * n);
      if (absl::Status s = memory.AttentionColumnSums(l, job.slots[l], shape.num_q_heads,
                                                      job.inputs.data() + l * job.per_layer_inputs,
                                                      params.num_queries, sums[l].data());
          !s.ok()) {
        return absl::InternalError(absl::StrCat("scoring layer ", l, " failed: ", s.message()));
      }
    }
    if (rows_read(l)) {
      if (absl::Status s = GatherLayerRows(memory, l, job.slots[l], &job.keys[l], &job.values[l]);
          !s.ok()) {
        return absl::InternalError(absl::StrCat("reading layer ", l, " failed: ", s.message()));
      }
    }
    return absl::OkStatus();
  };
  if (read.ok()) read = ParallelFor(shape.num_layers, job.threads, read_layer);
  if (!read.ok()) {
    job.computed = read;
    return;
  }
  compress::SequenceInput input;
  input.num_tokens = n;
  input.layers.resize(shape.num_layers);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    compress::LayerInput& li = input.layers[l];
    li.keys = job.keys[l].empty() ? nullptr : job.keys[l].data();
    li.values = job.values[l].empty() ? nullptr : job.values[l].data();
    if (scores_from_pool(l)) {
      li.scores = sums[l].data();
    } else if (scores_needed) {
      li.queries = job.inputs.data() + l * job.per_layer_inputs;
      li.num_queries = params.num_queries;
    } else if (params.input == CompressInput::kScores) {
      li.scores = job.inputs.data() + l * job.per_layer_inputs;
    }
  }
  const compress::ComputeOptions compute{job.threads, memory.similarity_graph(), memory.ranker(),
                                         &shutting_down_};
  job.computed = compress::CompressSequence(shape, params.policy, input, params.target, compute);
  if (!job.computed.ok()) return;
  absl::Status coded = ParallelFor(shape.num_layers, job.threads, [&](uint32_t l) -> absl::Status {
    const compress::LayerResult& lr = job.computed->layers[l];
    if (!lr.key_codebook.has_value()) return absl::OkStatus();
    if (shutting_down_.load()) return ShutdownCancelled("Compress");
    absl::StatusOr<compress::CodedLayer> layer =
        compress::CodedLayer::FromResult(shape, params.policy, lr, {});
    if (!layer.ok()) {
      return absl::InternalError(absl::StrCat("layer ", l, ": ", layer.status().message()));
    }
    job.coded[l] = std::make_shared<const compress::CodedLayer>(*std::move(layer));
    return absl::OkStatus();
  });
  if (!coded.ok()) job.computed = coded;
}

absl::StatusOr<CompressResult> CacheManager::Compress(const Caller& caller,
                                                      const std::string& sequence_id,
                                                      const CompressParams& params) {
  std::shared_ptr<CompressJob> job;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(job, BeginCompressLocked(caller, sequence_id, params));
  }
  if (params.background) {
    // The inputs are copied before the reply, so the client may write its buffer again.
    if (job->per_layer_inputs > 0) {
      job->inputs = CopyInputs(job->input_buffers, params.input, job->shape, params.num_queries,
                               job->n, job->per_layer_inputs);
      job->input_buffers.clear();
    }
    background_->Submit(job->client_id, [this, job] { RunBackgroundCompress(job); });
    CompressResult pending;
    pending.pending = true;
    return pending;
  }
  ComputeCompress(*job);
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(sequence_id, job->serial);
  if (seq == nullptr) return FreedMeanwhile(sequence_id, "Compress");
  seq->busy = nullptr;
  return ApplyCompressLocked(*seq, *job);
}

void CacheManager::RunBackgroundCompress(const std::shared_ptr<CompressJob>& job) {
  ComputeCompress(*job);
  // The rows read are not kept until FinishCompress (a layer shared with a fork reads its kept
  // rows again then).
  job->keys.clear();
  job->values.clear();
  job->inputs.clear();
  absl::MutexLock lock(&mu_);
  job->done.Notify();
  Sequence* seq = FindSerialLocked(job->sequence_id, job->serial);
  if (seq == nullptr || seq->background != job) return;
  std::string detail = "ok";
  if (!job->computed.ok()) {
    // A work that failed changed nothing; the background Compress ends here and FinishCompress
    // answers its error.
    seq->compress_error = shutting_down_.load() ? ShutdownCancelled("Compress")
                                                : WorkError(job->params, job->computed.status());
    EndBackgroundLocked(*seq, std::nullopt);
    detail = absl::StrCat("error=", seq->compress_error.ToString());
  }
  PublishLocked(EventType::kSequenceCompressReady, seq->owner->client_id, job->sequence_id,
                seq->owner->pool->pool_id, std::move(detail));
}

uint64_t CacheManager::EndBackgroundLocked(Sequence& seq,
                                           std::optional<absl::Time> quarantine_until) {
  if (seq.background == nullptr) return 0;
  Pool& pool = *seq.owner->pool;
  uint64_t released = 0;
  for (uint32_t l = 0; l < seq.background->pinned.size(); ++l) {
    BlockAllocator& alloc = pool.allocators[l];
    for (uint32_t b : seq.background->pinned[l]) {
      const bool last = quarantine_until.has_value()
                            ? alloc.ReleaseToQuarantine(b, *quarantine_until)
                            : alloc.Release(b);
      released += last ? 1 : 0;
    }
  }
  seq.background->pinned.clear();
  --seq.owner->background_compresses;
  seq.background = nullptr;
  return released;
}

absl::StatusOr<CompressResult> CacheManager::FinishCompress(
    const Caller& caller, const std::string& sequence_id, bool wait,
    const std::string& cuda_ipc_event_handle) {
  std::shared_ptr<CompressJob> job;
  std::shared_ptr<const ClientEvent> write_event;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    ASSIGN_OR_RETURN(Sequence * seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
    if (seq->background == nullptr) {
      if (!seq->compress_error.ok()) return seq->compress_error;
      return absl::FailedPreconditionError(
          absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                       " has no background Compress pending (Compress with background first)"));
    }
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    ASSIGN_OR_RETURN(write_event, WriteEventLocked(*client, cuda_ipc_event_handle));
    job = seq->background;
  }
  if (!job->done.HasBeenNotified()) {
    if (!wait) {
      CompressResult pending;
      pending.pending = true;
      return pending;
    }
    job->done.WaitForNotification();  // the work stops early at shutdown
  }
  // Rows appended since the job started follow its kept rows, moved under the lock once the
  // client's write event completed (the sequence busy while it is waited for, so that no row is
  // appended meanwhile).
  {
    absl::MutexLock lock(&mu_);
    Sequence* seq = FindSerialLocked(sequence_id, job->serial);
    if (seq == nullptr) return FreedMeanwhile(sequence_id, "FinishCompress");
    if (seq->background != job) {
      if (seq->background == nullptr && !seq->compress_error.ok()) return seq->compress_error;
      return absl::AbortedError(absl::StrCat("the background Compress of sequence_id ",
                                             QuoteForMessage(sequence_id),
                                             " was finished by another call meanwhile"));
    }
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    if (write_event == nullptr || seq->layers[0].num_tokens == job->n || shutting_down_.load()) {
      return ApplyCompressLocked(*seq, *job);
    }
    seq->busy = "Compress";
  }
  const absl::Status waited = write_event->Wait();
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(sequence_id, job->serial);
  if (seq == nullptr) return FreedMeanwhile(sequence_id, "FinishCompress");
  seq->busy = nullptr;
  if (!waited.ok()) {
    return absl::InternalError(
        absl::StrCat("waiting for the client's write event failed: ", waited.message()));
  }
  return ApplyCompressLocked(*seq, *job);
}

absl::StatusOr<CompressResult> CacheManager::ApplyCompressLocked(Sequence& seq, CompressJob& job) {
  const std::string& sequence_id = job.sequence_id;
  const CompressParams& params = job.params;
  if (shutting_down_.load()) return ShutdownCancelled("Compress");
  if (!job.computed.ok()) return WorkError(params, job.computed.status());
  compress::SequenceResult& sr = *job.computed;
  Pool& pool = *seq.owner->pool;
  const ModelSpec& model = pool.model;
  const uint32_t num_layers = model.num_layers, bs = model.block_size, hkv = model.num_kv_heads;
  const kernels::KvLayerLayout& layout = pool.memory->layout();
  const uint32_t n = job.n;
  // Rows appended since a background job started (every layer holds the same count).
  const uint32_t m = seq.layers[0].num_tokens - n;
  if (job.keys.size() != num_layers) {  // a background job dropped the rows it read
    job.keys.assign(num_layers, {});
    job.values.assign(num_layers, {});
  }
  // Codebook layers go to the arena unless rows were appended: then they stay resident, as the
  // plain layers, with their kept rows as they were, then the appended ones, in blocks (Park
  // codes the appended rows later).
  auto parked = [&](uint32_t l) { return job.coded[l] != nullptr && m == 0; };
  // The reply lists every row's position: refuse it before the first row moves.
  {
    std::vector<reply_size::LayerCounts> counts;
    for (uint32_t l = 0; l < num_layers; ++l) {
      const compress::LayerResult& lr = sr.layers[l];
      counts.push_back(
          {parked(l) ? 0 : CeilDiv(lr.kept_per_head + m, bs), lr.kept.size() + size_t{hkv} * m});
    }
    RETURN_IF_ERROR(
        CheckReplyBytes(reply_size::CompressReplyBytes(counts, pool.num_blocks, seq.num_positions),
                        absl::StrCat("Compress of sequence_id ", QuoteForMessage(sequence_id))));
  }
  // A layer with a block shared with a fork is written to fresh blocks (the fork keeps the old
  // ones); the others are written in place. Plan and validate everything before the first row
  // moves, so a refusal changes nothing (a background job keeps its references until then: they
  // are not counted as sharing, and the blocks only they hold count as free).
  const bool background = seq.background.get() == &job;
  std::vector<std::vector<uint32_t>> pinned(num_layers);
  if (background) {
    for (uint32_t l = 0; l < num_layers; ++l) {
      pinned[l] = job.pinned[l];
      std::sort(pinned[l].begin(), pinned[l].end());
    }
  }
  auto pins = [&](uint32_t l, uint32_t b) -> uint32_t {
    return std::binary_search(pinned[l].begin(), pinned[l].end(), b) ? 1 : 0;
  };
  std::vector<bool> fresh(num_layers, false);
  std::vector<uint32_t> fresh_need(num_layers, 0);
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (parked(l)) continue;
    for (uint32_t b : seq.layers[l].blocks) {
      fresh[l] = fresh[l] || pool.allocators[l].refcount(b) > 1 + pins(l, b);
    }
    if (fresh[l]) fresh_need[l] = CeilDiv(sr.layers[l].kept_per_head + m, bs);
  }
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (parked(l) || fresh[l]) continue;
    RETURN_IF_ERROR(kernels::ValidateCompaction(layout, seq.layers[l].blocks, n, sr.layers[l].kept,
                                                sr.layers[l].kept_per_head));
  }
  std::vector<uint32_t> freed_by_pins(num_layers, 0);  // blocks only the job's references hold
  for (uint32_t l = 0; l < num_layers; ++l) {
    for (uint32_t b : pinned[l]) freed_by_pins[l] += pool.allocators[l].refcount(b) == 1 ? 1 : 0;
  }
  std::vector<uint32_t> room(num_layers, 0);  // what must be free before the references go
  for (uint32_t l = 0; l < num_layers; ++l) {
    room[l] = fresh_need[l] > freed_by_pins[l] ? fresh_need[l] - freed_by_pins[l] : 0;
  }
  MakeRoomLocked(pool, room);  // evicts stored prefixes only if that is enough
  for (uint32_t l = 0; l < num_layers; ++l) {
    const uint32_t need = fresh_need[l];
    const uint64_t free = uint64_t{pool.allocators[l].num_free()} + freed_by_pins[l];
    if (need > free) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "layer ", l, " shares blocks with a fork, so its ", sr.layers[l].kept_per_head + m,
          " rows need ", need, " fresh blocks, but ", free, " are free"));
    }
  }
  // Everything is validated: the job's references go (FinishCompress), then rows move.
  if (background) EndBackgroundLocked(seq, std::nullopt);

  // Writes layer l's rows to `blocks` (its own, or fresh ones): the kept rows (compacted in
  // place, or copied from what the job read), then the appended rows (a compaction in place
  // writes rows < n only).
  const size_t row_floats = size_t{hkv} * model.head_dim;
  auto write_layer = [&](uint32_t l, const std::vector<uint32_t>& blocks) -> absl::Status {
    const compress::LayerResult& lr = sr.layers[l];
    const uint32_t rows = lr.kept_per_head;
    const Sequence::LayerTable& t = seq.layers[l];
    std::vector<float> tail_k, tail_v;
    if (m > 0) {
      RETURN_IF_ERROR(
          GatherLayerRows(*pool.memory, l, RowSlots(t.blocks, n, n + m, bs), &tail_k, &tail_v));
    }
    const std::vector<int64_t> kept_slots = RowSlots(blocks, 0, rows, bs);
    if (&blocks == &t.blocks) {
      // Every row kept where it is (a codebook-only layer at ratio 1, say): nothing moves.
      bool in_place = rows == n;
      for (size_t i = 0; i < lr.kept.size() && in_place; ++i) in_place = lr.kept[i] == i % rows;
      if (!in_place) RETURN_IF_ERROR(pool.memory->CompactHeads(l, t.blocks, n, lr.kept, rows));
    } else {
      // Fork refuses a busy sequence, so a layer unshared when read stays so for a Compress that
      // blocks; a background one (or such a change) reads its rows here. The table's rows [0, n)
      // hold what the job read (a last block copied on write holds the same rows).
      if (job.keys[l].empty()) {
        RETURN_IF_ERROR(GatherLayerRows(*pool.memory, l, RowSlots(t.blocks, 0, n, bs), &job.keys[l],
                                        &job.values[l]));
      }
      std::vector<float> rows_k(size_t{rows} * row_floats), rows_v(rows_k.size());
      for (uint32_t h = 0; h < hkv; ++h) {
        for (uint32_t r = 0; r < rows; ++r) {
          const size_t src =
              size_t{lr.kept[size_t{h} * rows + r]} * row_floats + h * model.head_dim;
          const size_t dst = size_t{r} * row_floats + h * model.head_dim;
          std::copy_n(job.keys[l].data() + src, model.head_dim, rows_k.data() + dst);
          std::copy_n(job.values[l].data() + src, model.head_dim, rows_v.data() + dst);
        }
      }
      RETURN_IF_ERROR(pool.memory->ScatterTokens(l, kept_slots, rows_k.data(), rows_v.data()));
    }
    if (m > 0) {
      RETURN_IF_ERROR(pool.memory->ScatterTokens(l, RowSlots(blocks, rows, rows + m, bs),
                                                 tail_k.data(), tail_v.data()));
    }
    return absl::OkStatus();
  };
  // Layers that share blocks go to fresh blocks first: a failure there leaves every table as it
  // was.
  std::vector<std::vector<uint32_t>> fresh_blocks(num_layers);
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (!fresh[l]) continue;
    fresh_blocks[l] = pool.allocators[l].Allocate(fresh_need[l]).value();  // planned
    if (absl::Status s = write_layer(l, fresh_blocks[l]); !s.ok()) {
      for (uint32_t k = 0; k <= l; ++k) {
        for (uint32_t b : fresh_blocks[k]) pool.allocators[k].Release(b);
      }
      Log(LogLevel::kError, "compaction failed", {{"layer", l}, {"error", s.ToString()}});
      return absl::InternalError(absl::StrCat("writing layer ", l, " failed: ", s.message()));
    }
  }

  auto compression = std::make_shared<Compression>();
  compression->policy_name = params.policy.name;
  compression->policy = params.policy;
  compression->num_tokens = n;
  compression->layers.resize(num_layers);
  CompressResult result;
  result.rows_appended = m;
  result.policy_name = params.policy.name;
  result.layers.resize(num_layers);
  const uint64_t block_bytes = layout.block_bytes();
  for (uint32_t l = 0; l < num_layers; ++l) {
    compress::LayerResult& lr = sr.layers[l];
    Sequence::LayerTable& t = seq.layers[l];
    Compression::Layer& cl = compression->layers[l];
    const uint32_t rows = lr.kept_per_head;
    result.bytes_before += t.blocks.size() * block_bytes;
    cl.coded = job.coded[l];
    std::vector<uint32_t> dropped;  // references this sequence gives up
    if (parked(l)) {
      t.parked = true;
      dropped = std::exchange(t.blocks, {});
    } else if (fresh[l]) {
      dropped = std::exchange(t.blocks, std::move(fresh_blocks[l]));
    } else {
      // Validated above; the host backend cannot fail here. A device fault leaves the layer's
      // rows undefined but the books consistent.
      if (absl::Status s = write_layer(l, t.blocks); !s.ok()) {
        Log(LogLevel::kError, "compaction failed", {{"layer", l}, {"error", s.ToString()}});
      }
      const uint32_t keep = CeilDiv(rows + m, bs);
      dropped.assign(t.blocks.begin() + keep, t.blocks.end());
      t.blocks.resize(keep);
    }
    for (uint32_t b : dropped) result.blocks_released += pool.allocators[l].Release(b) ? 1 : 0;
    t.num_tokens = rows + m;
    cl.rows = rows;
    cl.positions = lr.kept;

    CompressedLayerResult& out = result.layers[l];
    out.context_ratio = lr.context_ratio;
    out.kept_per_head = lr.kept_per_head;
    out.num_tokens = rows + m;
    out.block_ids = t.blocks;
    out.kept_positions = PositionsWithAppended(lr.kept, rows, hkv, m, seq.num_positions);
    out.codebook = cl.coded != nullptr;
    out.bytes_held = lr.bytes_held;
    out.eq15_ratio = lr.eq15_ratio;
    if (cl.coded != nullptr) {
      out.key_codebook_size = cl.coded->key_entries();
      out.value_codebook_size = cl.coded->value_entries();
      result.bytes_after += cl.coded->bytes();
    }
    result.bytes_after += t.blocks.size() * block_bytes;
  }
  seq.compression = std::move(compression);
  result.honest_ratio = sr.stats.honest_ratio;
  result.eq15_ratio = sr.stats.eq15_ratio;
  result.reserve_ratio = sr.stats.reserve_ratio;
  PublishLocked(
      EventType::kSequenceCompressed, seq.owner->client_id, sequence_id, pool.pool_id,
      absl::StrCat("policy=", params.policy.name, " bytes_before=", result.bytes_before,
                   " bytes_after=", result.bytes_after, " blocks_released=", result.blocks_released,
                   m > 0 ? absl::StrCat(" rows_appended=", m) : std::string()));
  return result;
}

absl::StatusOr<std::vector<FetchedLayerResult>> CacheManager::Fetch(
    const Caller& caller, const std::string& sequence_id, const std::vector<uint32_t>& layers) {
  std::vector<uint32_t> which;
  std::vector<std::shared_ptr<const compress::CodedLayer>> parked;  // per entry of `which`
  uint64_t serial = 0;
  bool on_device = false;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    ASSIGN_OR_RETURN(Sequence * seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    ASSIGN_OR_RETURN(which, ResolveLayers(layers, client->pool->model.num_layers));
    {
      // The reply lists every layer's blocks and row positions (as they will be after Fetch).
      const uint32_t bs = client->pool->model.block_size;
      const uint64_t hkv = client->pool->model.num_kv_heads;
      std::vector<reply_size::LayerCounts> counts;
      for (uint32_t l : which) {
        const auto& t = seq->layers[l];
        counts.push_back({t.parked ? CeilDiv(t.num_tokens, bs) : t.blocks.size(),
                          seq->compression != nullptr ? hkv * t.num_tokens : 0});
      }
      RETURN_IF_ERROR(CheckReplyBytes(
          reply_size::FetchReplyBytes(counts, client->pool->num_blocks, seq->num_positions),
          absl::StrCat("Fetch of sequence_id ", QuoteForMessage(sequence_id))));
    }
    bool any = false;
    for (uint32_t l : which) {
      const bool is_parked = seq->layers[l].parked;
      parked.push_back(is_parked ? seq->compression->layers[l].coded : nullptr);
      any = any || is_parked;
    }
    if (any) {
      seq->busy = "Fetch";
      serial = seq->serial;
      on_device = client->pool->memory->computes_on_device();
    } else {
      std::vector<FetchedLayerResult> out;
      for (uint32_t l : which) {
        out.push_back(
            {l, seq->layers[l].num_tokens, seq->layers[l].blocks, RowPositionsLocked(*seq, l), 0});
      }
      return out;
    }
  }

  // Outside the lock, from the immutable coded layers: a device pool gets their flat form and
  // reconstructs next to its memory (only the codebooks cross PCIe); for a host pool the rows
  // are rebuilt here (the layers spread over compress_threads), so the math stays out of the lock.
  std::vector<compress::CodedRows> flat(which.size());
  std::vector<std::vector<float>> rec_k(which.size()), rec_v(which.size());
  (void)ParallelFor(static_cast<uint32_t>(which.size()), CompressThreads(), [&](uint32_t i) {
    if (parked[i] == nullptr || shutting_down_.load()) return absl::OkStatus();
    if (on_device) {
      flat[i] = parked[i]->Flatten();
    } else {
      parked[i]->Reconstruct(&rec_k[i], &rec_v[i]);
    }
    return absl::OkStatus();
  });

  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(sequence_id, serial);
  if (seq == nullptr) return FreedMeanwhile(sequence_id, "Fetch");
  seq->busy = nullptr;
  if (shutting_down_.load()) return ShutdownCancelled("Fetch");
  Pool& pool = *seq->owner->pool;
  const uint32_t bs = pool.model.block_size;
  // Other sequences may have taken blocks meanwhile: plan again, all or nothing.
  std::vector<uint32_t> needed(pool.allocators.size(), 0);
  for (uint32_t l : which) {
    if (seq->layers[l].parked) needed[l] = CeilDiv(seq->layers[l].num_tokens, bs);
  }
  MakeRoomLocked(pool, needed);  // evicts stored prefixes only if that is enough
  for (uint32_t l : which) {
    const auto& t = seq->layers[l];
    if (!t.parked) continue;
    const uint32_t need = needed[l];
    if (need > pool.allocators[l].num_free()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("layer ", l, " needs ", need, " blocks to reconstruct but ",
                       pool.allocators[l].num_free(), " of ", pool.num_blocks, " are free"));
    }
  }
  std::vector<FetchedLayerResult> out;
  for (size_t i = 0; i < which.size(); ++i) {
    const uint32_t l = which[i];
    Sequence::LayerTable& t = seq->layers[l];
    FetchedLayerResult r;
    r.layer = l;
    if (t.parked) {
      std::vector<uint32_t> blocks = pool.allocators[l].Allocate(CeilDiv(t.num_tokens, bs)).value();
      const std::vector<int64_t> slots = RowSlots(blocks, 0, t.num_tokens, bs);
      if (absl::Status s =
              on_device ? pool.memory->ScatterCodedRows(l, slots, flat[i])
                        : pool.memory->ScatterTokens(l, slots, rec_k[i].data(), rec_v[i].data());
          !s.ok()) {
        for (uint32_t b : blocks) pool.allocators[l].Release(b);
        Log(LogLevel::kError, "reconstruction write failed", {{"error", s.ToString()}});
        return absl::InternalError(absl::StrCat("writing layer ", l, " failed: ", s.message()));
      }
      t.blocks = std::move(blocks);
      t.parked = false;
      r.new_blocks = static_cast<uint32_t>(t.blocks.size());
    }
    r.num_tokens = t.num_tokens;
    r.block_ids = t.blocks;
    r.positions = RowPositionsLocked(*seq, l);
    out.push_back(std::move(r));
  }
  return out;
}

absl::StatusOr<std::vector<ParkedLayerResult>> CacheManager::Park(
    const Caller& caller, const std::string& sequence_id, const std::vector<uint32_t>& layers,
    const std::string& cuda_ipc_event_handle) {
  struct Work {
    uint32_t layer = 0;
    std::shared_ptr<const compress::CodedLayer> coded;
    bool resident = false;
    std::vector<int64_t> slots;       // of the appended rows
    std::vector<float> keys, values;  // appended rows [count, num_kv_heads, head_dim]
    std::vector<uint32_t> positions;  // of the appended rows
    std::shared_ptr<compress::CodedLayer> updated;
    compress::AppendStats stats;
  };
  std::vector<Work> work;
  uint64_t serial = 0;
  std::shared_ptr<PoolMemory> memory;
  std::shared_ptr<const ClientEvent> write_event;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    ASSIGN_OR_RETURN(Sequence * seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    if (seq->compression == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                       " was never compressed: it has no codebook layers"));
    }
    const ModelSpec& model = client->pool->model;
    std::vector<uint32_t> which;
    if (layers.empty()) {
      for (uint32_t l = 0; l < model.num_layers; ++l) {
        if (seq->compression->layers[l].coded != nullptr) which.push_back(l);
      }
    } else {
      ASSIGN_OR_RETURN(which, ResolveLayers(layers, model.num_layers));
    }
    for (size_t i = 0; i < which.size(); ++i) {
      const uint32_t l = which[i];
      const Compression::Layer& cl = seq->compression->layers[l];
      if (cl.coded == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("layers[", i, "] = ", l, " is not a codebook layer (policy \"",
                         seq->compression->policy_name, "\" kept it as plain rows)"));
      }
      const Sequence::LayerTable& t = seq->layers[l];
      Work w;
      w.layer = l;
      w.coded = cl.coded;
      w.resident = !t.parked;
      if (w.resident) {
        const uint32_t begin = cl.coded->rows();
        w.slots = RowSlots(t.blocks, begin, t.num_tokens, model.block_size);
        const std::vector<uint32_t> all = RowPositionsLocked(*seq, l);  // head 0 first
        w.positions.assign(all.begin() + begin, all.begin() + t.num_tokens);
      }
      work.push_back(std::move(w));
    }
    ASSIGN_OR_RETURN(write_event, WriteEventLocked(*client, cuda_ipc_event_handle));
    memory = client->pool->memory;
    seq->busy = "Park";
    serial = seq->serial;
  }

  // Outside the lock, after the client's write event if it passed one: read the appended rows
  // and code them into copies of the coded layers.
  absl::Status coding = absl::OkStatus();
  if (write_event != nullptr) {
    if (absl::Status s = write_event->Wait(); !s.ok()) {
      coding = absl::InternalError(
          absl::StrCat("waiting for the client's write event failed: ", s.message()));
    }
  }
  for (Work& w : work) {
    if (!w.resident || !coding.ok()) continue;
    if (shutting_down_.load()) {
      coding = ShutdownCancelled("Park");
      continue;
    }
    if (absl::Status s = GatherLayerRows(*memory, w.layer, w.slots, &w.keys, &w.values); !s.ok()) {
      coding =
          absl::InternalError(absl::StrCat("reading layer ", w.layer, " failed: ", s.message()));
      continue;
    }
    w.updated = std::make_shared<compress::CodedLayer>(*w.coded);
    absl::StatusOr<compress::AppendStats> stats = w.updated->Append(w.keys, w.values, w.positions);
    if (stats.ok()) {
      w.stats = *stats;
    } else {
      coding = absl::Status(stats.status().code(),
                            absl::StrCat("layer ", w.layer, ": ", stats.status().message()));
    }
  }

  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(sequence_id, serial);
  if (seq == nullptr) return FreedMeanwhile(sequence_id, "Park");
  seq->busy = nullptr;
  if (shutting_down_.load()) return ShutdownCancelled("Park");
  RETURN_IF_ERROR(coding);
  Pool& pool = *seq->owner->pool;
  auto compression = std::make_shared<Compression>(*seq->compression);
  std::vector<ParkedLayerResult> out;
  uint64_t released_total = 0;
  for (Work& w : work) {
    Sequence::LayerTable& t = seq->layers[w.layer];
    ParkedLayerResult r;
    r.layer = w.layer;
    if (w.resident) {
      r.rows_appended = static_cast<uint32_t>(w.positions.size());
      r.append = w.stats;
      for (uint32_t b : t.blocks) r.blocks_released += pool.allocators[w.layer].Release(b) ? 1 : 0;
      t.blocks.clear();
      t.parked = true;
      compression->layers[w.layer].coded = std::move(w.updated);
    }
    const compress::CodedLayer& coded = *compression->layers[w.layer].coded;
    r.num_tokens = t.num_tokens;
    r.key_codebook_size = coded.key_entries();
    r.value_codebook_size = coded.value_entries();
    r.queued = coded.queued();
    r.arena_bytes = coded.bytes();
    released_total += r.blocks_released;
    out.push_back(r);
  }
  seq->compression = std::move(compression);
  PublishLocked(EventType::kSequenceParked, seq->owner->client_id, sequence_id, pool.pool_id,
                absl::StrCat("layers=", out.size(), " blocks_released=", released_total));
  return out;
}

}  // namespace cachemgr
