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

absl::StatusOr<CompressResult> CacheManager::Compress(const Caller& caller,
                                                      const std::string& sequence_id,
                                                      const CompressParams& params) {
  const char* target_field = params.target.kind == compress::TargetKind::kReserveRatio
                                 ? "target.reserve_ratio"
                                 : "target.byte_ratio";
  compress::ModelShape shape;
  uint64_t serial = 0;
  uint32_t n = 0;
  size_t per_layer_inputs = 0;
  // A private copy of the inputs (the client may write the buffer concurrently), taken outside
  // the lock: up to --max_input_buffer_bytes.
  std::vector<float> inputs;
  // The buffers holding them: the owner's, or a group's ranks' (each its share of the heads).
  std::vector<std::shared_ptr<const MemfdRegion>> input_buffers;
  // What the work outside the lock reads: the pool's memory (kept alive should the pool be
  // released meanwhile), every layer's row slots, and which layers share a block with a fork.
  std::shared_ptr<PoolMemory> memory;
  std::shared_ptr<const ClientEvent> write_event;  // the client's, when it passed one
  std::vector<std::vector<int64_t>> slots;
  std::vector<bool> shared;
  {
    absl::MutexLock lock(&mu_);
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
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
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
          absl::StrCat(target_field, " must be in (0, 1] (got ", params.target.value, ")"));
    }
    n = seq->layers[0].num_tokens;
    const uint32_t hq = model.num_q_heads, dim = model.head_dim;
    if (params.input != CompressInput::kNone) {
      if (pool.group_size == 1) {
        input_buffers.push_back(client->input_buffer);
      } else {
        for (uint32_t r = 0; r < pool.group_size; ++r) {
          if (pool.ranks[r] == nullptr) {
            return absl::FailedPreconditionError(absl::StrCat(
                "group.rank ", r, " of group ", QuoteForMessage(pool.group_name),
                " is not attached: its input buffer holds its heads' share of the input"));
          }
          input_buffers.push_back(pool.ranks[r]->input_buffer);
        }
      }
    }
    // Every buffer holds its share: the smallest bounds what the input may need.
    uint64_t buffer_bytes = UINT64_MAX;
    for (const auto& b : input_buffers) buffer_bytes = std::min<uint64_t>(buffer_bytes, b->size());
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
      per_layer_inputs = size_t{params.num_queries} * hq * dim;
      const uint64_t need =
          CheckedProduct({num_layers, per_layer_inputs / pool.group_size, sizeof(float)})
              .value_or(UINT64_MAX);
      if (need > buffer_bytes) {
        return absl::InvalidArgumentError(
            absl::StrCat("num_queries ", params.num_queries, " needs ", need,
                         " bytes of window queries but ", buffer_name, " holds ", buffer_bytes));
      }
    } else if (params.input == CompressInput::kScores) {
      per_layer_inputs = size_t{hq} * n;
      const uint64_t need =
          CheckedProduct({num_layers, per_layer_inputs / pool.group_size, sizeof(float)})
              .value_or(UINT64_MAX);
      if (need > buffer_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("input: scores for ", n, " tokens need ",
                                                       need, " bytes but ", buffer_name, " holds ",
                                                       buffer_bytes));
      }
    }
    slots.resize(num_layers);
    shared.assign(num_layers, false);
    for (uint32_t l = 0; l < num_layers; ++l) {
      const auto& t = seq->layers[l];
      if (t.num_tokens != n || t.parked) {
        return absl::InternalError(
            absl::StrCat("layer ", l, " holds ", t.num_tokens, " rows but layer 0 holds ", n));
      }
      slots[l] = RowSlots(t.blocks, 0, n, model.block_size);
      for (uint32_t b : t.blocks) shared[l] = shared[l] || pool.allocators[l].refcount(b) > 1;
    }
    ASSIGN_OR_RETURN(write_event, WriteEventLocked(*client, params.cuda_ipc_event_handle));
    memory = pool.memory;
    shape = ShapeOf(model);
    seq->busy = "Compress";
    serial = seq->serial;
  }

  // Outside the lock (the sequence is busy, so its rows cannot change; a Free meanwhile only
  // makes the result moot), after the client's write event if it passed one: per layer, the window
  // scores computed next to the pool (on the GPU for a CUDA pool, so the keys never leave it), and
  // host rows where they are read: by the codebook build, and by a layer that shares a block with a
  // fork (its kept rows go to fresh blocks). Then the policy, then the codebook layers' coded form.
  if (per_layer_inputs > 0) {
    inputs =
        CopyInputs(input_buffers, params.input, shape, params.num_queries, n, per_layer_inputs);
    input_buffers.clear();
  }
  const uint32_t threads = options_.compress_threads == 0
                               ? std::max(1u, std::thread::hardware_concurrency())
                               : options_.compress_threads;
  const bool scores_needed =
      params.input == CompressInput::kWindowQueries && compress::PolicyNeedsScores(params.policy);
  const bool on_device = memory->computes_on_device();
  // Host rows are read for a codebook (every layer) and for a layer shared with a fork. Window
  // scores come from the pool where that saves a transfer: always on a device; on the host
  // only for a layer whose rows are not read anyway (else CompressSequence scores the rows it
  // has, bit for bit the same sums).
  auto rows_read = [&](uint32_t l) { return params.policy.codebook || shared[l]; };
  auto scores_from_pool = [&](uint32_t l) { return scores_needed && (on_device || !rows_read(l)); };
  std::vector<std::vector<float>> sums(shape.num_layers), keys(shape.num_layers),
      values(shape.num_layers);
  absl::Status read = absl::OkStatus();
  if (write_event != nullptr) {
    if (absl::Status s = write_event->Wait(); !s.ok()) {
      read = absl::InternalError(
          absl::StrCat("waiting for the client's write event failed: ", s.message()));
    }
  }
  auto read_layer = [&](uint32_t l) -> absl::Status {
    if (shutting_down_.load()) return ShutdownCancelled("Compress");
    if (scores_from_pool(l)) {
      sums[l].resize(size_t{shape.num_q_heads} * n);
      if (absl::Status s = memory->AttentionColumnSums(l, slots[l], shape.num_q_heads,
                                                       inputs.data() + l * per_layer_inputs,
                                                       params.num_queries, sums[l].data());
          !s.ok()) {
        return absl::InternalError(absl::StrCat("scoring layer ", l, " failed: ", s.message()));
      }
    }
    if (rows_read(l)) {
      if (absl::Status s = GatherLayerRows(*memory, l, slots[l], &keys[l], &values[l]); !s.ok()) {
        return absl::InternalError(absl::StrCat("reading layer ", l, " failed: ", s.message()));
      }
    }
    return absl::OkStatus();
  };
  if (read.ok()) read = ParallelFor(shape.num_layers, threads, read_layer);
  compress::SequenceInput input;
  input.num_tokens = n;
  input.layers.resize(shape.num_layers);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    compress::LayerInput& li = input.layers[l];
    li.keys = keys[l].empty() ? nullptr : keys[l].data();
    li.values = values[l].empty() ? nullptr : values[l].data();
    if (scores_from_pool(l)) {
      li.scores = sums[l].data();
    } else if (scores_needed) {
      li.queries = inputs.data() + l * per_layer_inputs;
      li.num_queries = params.num_queries;
    } else if (params.input == CompressInput::kScores) {
      li.scores = inputs.data() + l * per_layer_inputs;
    }
  }
  const compress::ComputeOptions compute{threads, memory->similarity_graph(), memory->ranker(),
                                         &shutting_down_};
  absl::StatusOr<compress::SequenceResult> computed =
      read.ok() ? compress::CompressSequence(shape, params.policy, input, params.target, compute)
                : absl::StatusOr<compress::SequenceResult>(read);
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded(shape.num_layers);
  absl::Status coding = absl::OkStatus();
  if (computed.ok()) {
    for (uint32_t l = 0; l < shape.num_layers && coding.ok(); ++l) {
      const compress::LayerResult& lr = computed->layers[l];
      if (!lr.key_codebook.has_value()) continue;
      if (shutting_down_.load()) {
        coding = ShutdownCancelled("Compress");
        break;
      }
      absl::StatusOr<compress::CodedLayer> layer =
          compress::CodedLayer::FromResult(shape, params.policy, lr, {});
      if (layer.ok()) {
        coded[l] = std::make_shared<const compress::CodedLayer>(*std::move(layer));
      } else {
        coding = absl::InternalError(absl::StrCat("layer ", l, ": ", layer.status().message()));
      }
    }
  }

  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(sequence_id, serial);
  if (seq == nullptr) return FreedMeanwhile(sequence_id, "Compress");
  seq->busy = nullptr;
  if (shutting_down_.load()) return ShutdownCancelled("Compress");
  if (!computed.ok()) {
    // The library names the target "target.value"; the request calls it by its kind.
    std::string message(computed.status().message());
    if (const size_t at = message.find("target.value"); at != std::string::npos) {
      message.replace(at, std::string("target.value").size(), target_field);
    }
    return absl::Status(computed.status().code(), message);
  }
  RETURN_IF_ERROR(coding);
  compress::SequenceResult& sr = *computed;
  Pool& pool = *seq->owner->pool;
  const ModelSpec& model = pool.model;
  const uint32_t num_layers = model.num_layers, bs = model.block_size;
  const kernels::KvLayerLayout& layout = pool.memory->layout();
  // The reply lists every kept position: refuse it before the first row moves.
  {
    std::vector<reply_size::LayerCounts> counts;
    for (const compress::LayerResult& lr : sr.layers) {
      counts.push_back(
          {lr.key_codebook.has_value() ? 0 : CeilDiv(lr.kept_per_head, bs), lr.kept.size()});
    }
    RETURN_IF_ERROR(
        CheckReplyBytes(reply_size::CompressReplyBytes(counts, pool.num_blocks, seq->num_positions),
                        absl::StrCat("Compress of sequence_id ", QuoteForMessage(sequence_id))));
  }
  // A plain layer with a block shared with a fork is written to fresh blocks (the fork keeps
  // the old ones); the others are compacted in place. Plan and validate everything before the
  // first row moves, so a refusal changes nothing.
  std::vector<bool> fresh(num_layers, false);
  std::vector<uint32_t> fresh_need(num_layers, 0);
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (coded[l] != nullptr) continue;
    for (uint32_t b : seq->layers[l].blocks) {
      fresh[l] = fresh[l] || pool.allocators[l].refcount(b) > 1;
    }
    if (fresh[l]) fresh_need[l] = CeilDiv(sr.layers[l].kept_per_head, bs);
  }
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (coded[l] != nullptr || fresh[l]) continue;
    RETURN_IF_ERROR(kernels::ValidateCompaction(layout, seq->layers[l].blocks, n, sr.layers[l].kept,
                                                sr.layers[l].kept_per_head));
  }
  MakeRoomLocked(pool, fresh_need);  // evicts stored prefixes only if that is enough
  for (uint32_t l = 0; l < num_layers; ++l) {
    const uint32_t need = fresh_need[l];
    if (need > pool.allocators[l].num_free()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("layer ", l, " shares blocks with a fork, so its ",
                       sr.layers[l].kept_per_head, " kept rows need ", need, " fresh blocks, but ",
                       pool.allocators[l].num_free(), " are free"));
    }
  }
  // Rows of layers that share blocks go to fresh blocks first: a failure there changes nothing.
  std::vector<std::vector<uint32_t>> fresh_blocks(num_layers);
  const size_t row_floats = size_t{model.num_kv_heads} * model.head_dim;
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (!fresh[l]) continue;
    const compress::LayerResult& lr = sr.layers[l];
    const uint32_t rows = lr.kept_per_head;
    // Fork refuses a busy sequence, so a layer unshared when read stays so; should that change,
    // its rows are read here.
    if (keys[l].empty()) {
      RETURN_IF_ERROR(GatherLayerRows(*pool.memory, l, slots[l], &keys[l], &values[l]));
    }
    std::vector<float> rows_k(size_t{rows} * row_floats), rows_v(rows_k.size());
    for (uint32_t h = 0; h < model.num_kv_heads; ++h) {
      for (uint32_t r = 0; r < rows; ++r) {
        const size_t src = size_t{lr.kept[size_t{h} * rows + r]} * row_floats + h * model.head_dim;
        const size_t dst = size_t{r} * row_floats + h * model.head_dim;
        std::copy_n(keys[l].data() + src, model.head_dim, rows_k.data() + dst);
        std::copy_n(values[l].data() + src, model.head_dim, rows_v.data() + dst);
      }
    }
    fresh_blocks[l] = pool.allocators[l].Allocate(CeilDiv(rows, bs)).value();  // planned
    if (absl::Status s = pool.memory->ScatterTokens(l, RowSlots(fresh_blocks[l], 0, rows, bs),
                                                    rows_k.data(), rows_v.data());
        !s.ok()) {
      for (uint32_t m = 0; m <= l; ++m) {
        for (uint32_t b : fresh_blocks[m]) pool.allocators[m].Release(b);
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
  result.layers.resize(num_layers);
  const uint64_t block_bytes = layout.block_bytes();
  for (uint32_t l = 0; l < num_layers; ++l) {
    compress::LayerResult& lr = sr.layers[l];
    Sequence::LayerTable& t = seq->layers[l];
    Compression::Layer& cl = compression->layers[l];
    const uint32_t rows = lr.kept_per_head;
    result.bytes_before += t.blocks.size() * block_bytes;
    std::vector<uint32_t> dropped;  // references this sequence gives up
    if (coded[l] != nullptr) {
      cl.coded = coded[l];
      t.parked = true;
      dropped = std::exchange(t.blocks, {});
    } else if (fresh[l]) {
      dropped = std::exchange(t.blocks, std::move(fresh_blocks[l]));
    } else {
      // Validated above; the host backend cannot fail here. A device fault leaves the layer's
      // rows undefined but the books consistent.
      if (absl::Status s = pool.memory->CompactHeads(l, t.blocks, n, lr.kept, rows); !s.ok()) {
        Log(LogLevel::kError, "compaction failed", {{"layer", l}, {"error", s.ToString()}});
      }
      const uint32_t keep = CeilDiv(rows, bs);
      dropped.assign(t.blocks.begin() + keep, t.blocks.end());
      t.blocks.resize(keep);
    }
    for (uint32_t b : dropped) result.blocks_released += pool.allocators[l].Release(b) ? 1 : 0;
    t.num_tokens = rows;
    cl.rows = rows;
    cl.positions = lr.kept;

    CompressedLayerResult& out = result.layers[l];
    out.context_ratio = lr.context_ratio;
    out.kept_per_head = lr.kept_per_head;
    out.num_tokens = rows;
    out.block_ids = t.blocks;
    out.kept_positions = lr.kept;
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
  seq->compression = std::move(compression);
  result.honest_ratio = sr.stats.honest_ratio;
  result.eq15_ratio = sr.stats.eq15_ratio;
  result.reserve_ratio = sr.stats.reserve_ratio;
  PublishLocked(EventType::kSequenceCompressed, seq->owner->client_id, sequence_id, pool.pool_id,
                absl::StrCat("policy=", params.policy.name, " bytes_before=", result.bytes_before,
                             " bytes_after=", result.bytes_after,
                             " blocks_released=", result.blocks_released));
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
  // are rebuilt here, so the math stays out of the lock.
  std::vector<compress::CodedRows> flat(which.size());
  std::vector<std::vector<float>> rec_k(which.size()), rec_v(which.size());
  for (size_t i = 0; i < which.size(); ++i) {
    if (parked[i] == nullptr) continue;
    if (shutting_down_.load()) break;
    if (on_device) {
      flat[i] = parked[i]->Flatten();
    } else {
      parked[i]->Reconstruct(&rec_k[i], &rec_v[i]);
    }
  }

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
