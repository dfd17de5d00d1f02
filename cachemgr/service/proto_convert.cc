#include "cachemgr/service/proto_convert.h"

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {
namespace {

// INVALID_ARGUMENT naming `field` for anything but the three dtypes.
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, const char* field) {
  switch (dtype) {
    case v1::DTYPE_FP16:
      return DType::kFp16;
    case v1::DTYPE_BF16:
      return DType::kBf16;
    case v1::DTYPE_FP32:
      return DType::kFp32;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " must be DTYPE_FP16, DTYPE_BF16 or DTYPE_FP32 (got ",
                       static_cast<int>(dtype), ")"));
  }
}

v1::DType DTypeToProto(DType dtype) {
  return dtype == DType::kFp16   ? v1::DTYPE_FP16
         : dtype == DType::kBf16 ? v1::DTYPE_BF16
                                 : v1::DTYPE_FP32;
}

}  // namespace

absl::StatusOr<ModelSpec> ModelSpecFromProto(const v1::ModelSpec& p) {
  ModelSpec s;
  s.name = p.name();
  s.num_layers = p.num_layers();
  s.num_q_heads = p.num_q_heads();
  s.num_kv_heads = p.num_kv_heads();
  s.head_dim = p.head_dim();
  s.block_size = p.block_size();
  ASSIGN_OR_RETURN(s.dtype, DTypeFromProto(p.dtype(), "model.dtype"));
  switch (p.layout()) {
    case v1::CACHE_LAYOUT_FLASH_ATTN:
      s.layout = kernels::KvOrder::kFlashAttn;
      break;
    case v1::CACHE_LAYOUT_FLASHINFER:
      s.layout = kernels::KvOrder::kFlashInfer;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "model.layout must be CACHE_LAYOUT_FLASH_ATTN or CACHE_LAYOUT_FLASHINFER (got ",
          static_cast<int>(p.layout()), ")"));
  }
  switch (p.rope().style()) {
    case v1::ROPE_STYLE_NONE:
      s.rope.style = RopeStyle::kNone;
      break;
    case v1::ROPE_STYLE_INTERLEAVED:
      s.rope.style = RopeStyle::kInterleaved;
      break;
    case v1::ROPE_STYLE_HALF_SPLIT:
      s.rope.style = RopeStyle::kHalfSplit;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("model.rope.style must be ROPE_STYLE_NONE, ROPE_STYLE_INTERLEAVED or "
                       "ROPE_STYLE_HALF_SPLIT (got ",
                       static_cast<int>(p.rope().style()), ")"));
  }
  s.rope.theta = p.rope().theta();
  s.rope.scaling_factor = p.rope().scaling_factor();
  s.rope.rotary_dim = p.rope().rotary_dim();
  return s;
}

void ModelSpecToProto(const ModelSpec& s, v1::ModelSpec* p) {
  p->set_name(s.name);
  p->set_num_layers(s.num_layers);
  p->set_num_q_heads(s.num_q_heads);
  p->set_num_kv_heads(s.num_kv_heads);
  p->set_head_dim(s.head_dim);
  p->set_block_size(s.block_size);
  p->set_dtype(DTypeToProto(s.dtype));
  p->set_layout(s.layout == kernels::KvOrder::kFlashAttn ? v1::CACHE_LAYOUT_FLASH_ATTN
                                                         : v1::CACHE_LAYOUT_FLASHINFER);
  v1::RopeConfig* r = p->mutable_rope();
  r->set_style(s.rope.style == RopeStyle::kNone          ? v1::ROPE_STYLE_NONE
               : s.rope.style == RopeStyle::kInterleaved ? v1::ROPE_STYLE_INTERLEAVED
                                                         : v1::ROPE_STYLE_HALF_SPLIT);
  r->set_theta(s.rope.theta);
  r->set_scaling_factor(s.rope.scaling_factor);
  r->set_rotary_dim(s.rope.rotary_dim);
}

namespace {

v1::Backend BackendToProto(BackendKind kind) {
  return kind == BackendKind::kHost ? v1::BACKEND_HOST : v1::BACKEND_CUDA;
}

}  // namespace

void AttachResultToProto(const AttachResult& r, const std::string& share_socket_path,
                         v1::AttachResponse* p) {
  p->set_client_id(r.client_id);
  p->set_session_token(r.session_token);
  p->set_boot_id(r.boot_id);
  p->set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(r.heartbeat_interval)));
  p->set_lease_timeout_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(r.lease_timeout)));
  v1::PoolDescriptor* d = p->mutable_pool();
  d->set_pool_id(r.pool.pool_id);
  d->set_backend(BackendToProto(r.pool.backend));
  switch (r.pool.share_method) {
    case ShareMethod::kMemfd:
      d->set_share_method(v1::SHARE_METHOD_MEMFD);
      break;
    case ShareMethod::kCudaIpcHandle:
      d->set_share_method(v1::SHARE_METHOD_CUDA_IPC_HANDLE);
      break;
    case ShareMethod::kCudaVmmFd:
      d->set_share_method(v1::SHARE_METHOD_CUDA_VMM_FD);
      break;
  }
  ModelSpecToProto(r.pool.model, d->mutable_model());
  d->set_num_blocks(r.pool.num_blocks);
  d->set_block_bytes(r.pool.block_bytes);
  for (uint32_t i = 0; i < r.pool.regions.size(); ++i) {
    v1::MemoryRegion* m = d->add_regions();
    m->set_index(i);
    m->set_bytes(r.pool.regions[i].bytes);
    if (!r.pool.regions[i].cuda_ipc_handle.empty()) {
      m->set_cuda_ipc_handle(r.pool.regions[i].cuda_ipc_handle);
    }
  }
  for (uint32_t l = 0; l < r.pool.layers.size(); ++l) {
    v1::LayerPool* lp = d->add_layers();
    lp->set_layer(l);
    lp->set_region_index(r.pool.layers[l].region_index);
    lp->set_offset(r.pool.layers[l].offset);
    lp->set_bytes(r.pool.layers[l].bytes);
  }
  d->set_share_socket_path(share_socket_path);
  d->set_input_buffer_region_index(r.input_buffer_region_index);
  d->set_input_buffer_bytes(r.input_buffer_bytes);
  d->set_device(r.pool.device);
  d->set_group_name(r.pool.group_name);
  d->set_group_rank(r.pool.group_rank);
  d->set_group_size(r.pool.group_size);
}

void AllocateResultToProto(const std::string& sequence_id, const AllocateResult& r,
                           v1::AllocateResponse* p) {
  p->set_sequence_id(sequence_id);
  p->set_created(r.created);
  p->set_first_position(r.first_position);
  p->set_num_positions(r.num_positions);
  p->mutable_layers()->Reserve(static_cast<int>(r.layers.size()));
  for (uint32_t l = 0; l < r.layers.size(); ++l) {
    const LayerAllocationResult& in = r.layers[l];
    v1::LayerAllocation* out = p->add_layers();
    out->set_layer(l);
    out->mutable_new_block_ids()->Add(in.new_block_ids.begin(), in.new_block_ids.end());
    out->mutable_slot_mapping()->Add(in.slot_mapping.begin(), in.slot_mapping.end());
    out->set_num_tokens(in.num_tokens);
    for (const auto& c : in.copies) {
      v1::BlockCopy* bc = out->add_copies();
      bc->set_src_block(c.src);
      bc->set_dst_block(c.dst);
    }
  }
}

void StepResultsToProto(absl::Span<const StepOp> ops, absl::Span<const StepOpResult> results,
                        bool include_slot_mapping, v1::StepResponse* p) {
  p->mutable_results()->Reserve(static_cast<int>(results.size()));
  for (size_t i = 0; i < results.size(); ++i) {
    const StepOpResult& r = results[i];
    v1::StepResult* out = p->add_results();
    if (!r.status.ok()) {
      out->set_code(static_cast<int>(r.status.code()));
      out->set_message(std::string(r.status.message()));
      continue;
    }
    switch (ops[i].kind) {
      case StepOp::Kind::kAllocate: {
        const AllocateResult& a = r.allocate;
        out->set_created(a.created);
        out->set_first_position(a.first_position);
        out->set_num_positions(a.num_positions);
        // Every layer alike (and something to say): one entry for all.
        bool uniform = a.layers.size() > 1;
        for (uint32_t l = 1; uniform && l < a.layers.size(); ++l) {
          const LayerAllocationResult& x = a.layers[0];
          const LayerAllocationResult& y = a.layers[l];
          uniform = x.new_block_ids == y.new_block_ids && x.num_tokens == y.num_tokens &&
                    x.slot_mapping == y.slot_mapping && x.copies.size() == y.copies.size();
          for (size_t c = 0; uniform && c < x.copies.size(); ++c) {
            uniform = x.copies[c].src == y.copies[c].src && x.copies[c].dst == y.copies[c].dst;
          }
        }
        for (uint32_t l = 0; l < a.layers.size(); ++l) {
          const LayerAllocationResult& in = a.layers[l];
          if (!include_slot_mapping && in.new_block_ids.empty() && in.copies.empty()) continue;
          v1::LayerAllocation* layer = uniform ? out->mutable_all_layers() : out->add_layers();
          layer->set_layer(uniform ? 0 : l);
          layer->mutable_new_block_ids()->Add(in.new_block_ids.begin(), in.new_block_ids.end());
          layer->mutable_slot_mapping()->Add(in.slot_mapping.begin(), in.slot_mapping.end());
          layer->set_num_tokens(in.num_tokens);
          for (const auto& c : in.copies) {
            v1::BlockCopy* bc = layer->add_copies();
            bc->set_src_block(c.src);
            bc->set_dst_block(c.dst);
          }
          if (uniform) break;  // the one entry says it for every layer
        }
        break;
      }
      case StepOp::Kind::kFree:
        out->set_blocks_released(r.blocks_released);
        break;
      case StepOp::Kind::kFork:
        break;
      case StepOp::Kind::kMatchPrefix:
        out->set_matched_blocks(r.matched_blocks);
        break;
    }
  }
}

void SequenceToProto(const SequenceSnapshot& s, v1::SequenceInfo* p) {
  p->set_sequence_id(s.sequence_id);
  p->set_owner_client_id(s.owner_client_id);
  p->set_parent_sequence_id(s.parent_sequence_id);
  p->set_num_positions(s.num_positions);
  for (uint32_t l = 0; l < s.layers.size(); ++l) {
    v1::LayerBlockTable* t = p->add_layers();
    t->set_layer(l);
    t->set_num_tokens(s.layers[l].num_tokens);
    t->mutable_block_ids()->Add(s.layers[l].block_ids.begin(), s.layers[l].block_ids.end());
    if (s.layers[l].kv_digest) t->set_kv_digest(*s.layers[l].kv_digest);
    t->set_codebook(s.layers[l].codebook);
    t->set_parked(s.layers[l].parked);
    t->set_key_codebook_size(s.layers[l].key_codebook_size);
    t->set_value_codebook_size(s.layers[l].value_codebook_size);
    t->set_arena_bytes(s.layers[l].arena_bytes);
  }
  p->set_compressed(s.compressed);
  p->set_compression_policy(s.compression_policy);
  p->mutable_kept_per_layer()->Add(s.kept_per_layer.begin(), s.kept_per_layer.end());
  p->set_busy(s.busy);
  p->set_compress_pending(s.compress_pending);
  p->set_compress_ready(s.compress_ready);
  p->set_compress_error(s.compress_error);
}

void StatsToProto(const StatsSnapshot& s, v1::StatsResponse* p) {
  p->set_num_sequences(s.num_sequences);
  p->set_memory_used_bytes(s.memory_used_bytes);
  p->set_memory_budget_bytes(s.memory_budget_bytes);
  p->set_input_buffer_bytes(s.input_buffer_bytes);
  p->set_sequence_bytes(s.sequence_bytes);
  v1::PrefixCounters* prefix = p->mutable_prefix();
  prefix->set_stored(s.prefix.stored);
  prefix->set_hits(s.prefix.hits);
  prefix->set_misses(s.prefix.misses);
  prefix->set_evictions(s.prefix.evictions);
  prefix->set_corrupt(s.prefix.corrupt);
  prefix->set_pools_reclaimed(s.prefix.pools_reclaimed);
  for (const PoolSnapshot& pool : s.pools) {
    v1::PoolStats* ps = p->add_pools();
    ps->set_pool_id(pool.pool_id);
    ps->set_model_name(pool.model_name);
    ps->set_backend(BackendToProto(pool.backend));
    ps->set_device(pool.device);
    ps->set_bytes(pool.bytes);
    ps->set_clients(pool.clients);
    ps->set_arena_bytes(pool.arena_bytes);
    ps->set_compressed_sequences(pool.compressed_sequences);
    ps->set_bookkeeping_bytes(pool.bookkeeping_bytes);
    ps->set_prefix_entries(pool.prefix_entries);
    ps->set_prefix_bytes(pool.prefix_bytes);
    ps->set_prefix_only_blocks(pool.prefix_only_blocks);
    ps->set_prefix_codebook_layers(pool.prefix_codebook_layers);
    ps->set_prefix_codebook_bytes(pool.prefix_codebook_bytes);
    ps->set_group_name(pool.group_name);
    ps->set_group_size(pool.group_size);
    ps->set_group_ranks_attached(pool.group_ranks_attached);
    for (uint32_t l = 0; l < pool.layers.size(); ++l) {
      v1::LayerOccupancy* o = ps->add_layers();
      o->set_layer(l);
      o->set_capacity_blocks(pool.layers[l].capacity_blocks);
      o->set_used_blocks(pool.layers[l].used_blocks);
      o->set_free_blocks(pool.layers[l].free_blocks);
      o->set_quarantined_blocks(pool.layers[l].quarantined_blocks);
      o->set_shared_blocks(pool.layers[l].shared_blocks);
    }
  }
  for (const ClientSnapshot& c : s.clients) {
    v1::ClientInfo* ci = p->add_clients();
    ci->set_client_id(c.client_id);
    ci->set_client_name(c.client_name);
    ci->set_pool_id(c.pool_id);
    ci->set_sequences(c.sequences);
    ci->set_lease_remaining_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(c.lease_remaining)));
    ci->set_group_rank(c.group_rank);
  }
}

v1::EventType EventTypeToProto(EventType type) {
  switch (type) {
    case EventType::kClientAttached:
      return v1::EVENT_TYPE_CLIENT_ATTACHED;
    case EventType::kClientDetached:
      return v1::EVENT_TYPE_CLIENT_DETACHED;
    case EventType::kClientExpired:
      return v1::EVENT_TYPE_CLIENT_EXPIRED;
    case EventType::kSequenceAllocated:
      return v1::EVENT_TYPE_SEQUENCE_ALLOCATED;
    case EventType::kSequenceFreed:
      return v1::EVENT_TYPE_SEQUENCE_FREED;
    case EventType::kSequenceForked:
      return v1::EVENT_TYPE_SEQUENCE_FORKED;
    case EventType::kPoolCreated:
      return v1::EVENT_TYPE_POOL_CREATED;
    case EventType::kSequenceCompressed:
      return v1::EVENT_TYPE_SEQUENCE_COMPRESSED;
    case EventType::kSequenceParked:
      return v1::EVENT_TYPE_SEQUENCE_PARKED;
    case EventType::kSequenceCompressReady:
      return v1::EVENT_TYPE_SEQUENCE_COMPRESS_READY;
    case EventType::kPoolReleased:
      return v1::EVENT_TYPE_POOL_RELEASED;
  }
  return v1::EVENT_TYPE_UNSPECIFIED;
}

void EventToProto(const Event& e, v1::Event* p) {
  p->set_seq(e.seq);
  p->set_unix_micros(static_cast<uint64_t>(e.unix_micros));
  p->set_type(EventTypeToProto(e.type));
  p->set_client_id(e.client_id);
  p->set_sequence_id(e.sequence_id);
  p->set_pool_id(e.pool_id);
  p->set_detail(e.detail);
}

absl::StatusOr<CompressParams> CompressParamsFromProto(const v1::CompressRequest& r) {
  const v1::CompressionPolicy& p = r.policy();
  CompressParams out;
  ASSIGN_OR_RETURN(out.policy, ResolvePreset(p.preset()));
  out.cuda_ipc_event_handle = r.cuda_ipc_event_handle();
  out.background = r.background();
  compress::PolicyConfig& c = out.policy;
  auto bad_enum = [](const char* field, int value) {
    return absl::InvalidArgumentError(absl::StrCat(field, " holds an unknown value ", value));
  };
  switch (p.schedule()) {
    case v1::BUDGET_SCHEDULE_UNSPECIFIED:
      break;
    case v1::BUDGET_SCHEDULE_FULL:
      c.schedule = compress::BudgetSchedule::kFull;
      break;
    case v1::BUDGET_SCHEDULE_UNIFORM:
      c.schedule = compress::BudgetSchedule::kUniform;
      break;
    case v1::BUDGET_SCHEDULE_PYRAMID:
      c.schedule = compress::BudgetSchedule::kPyramid;
      break;
    case v1::BUDGET_SCHEDULE_ZIGZAG:
      c.schedule = compress::BudgetSchedule::kZigZag;
      break;
    default:
      return bad_enum("policy.schedule", p.schedule());
  }
  switch (p.scoring()) {
    case v1::SCORING_UNSPECIFIED:
      break;
    case v1::SCORING_WINDOW:
      c.scoring = compress::Scoring::kWindow;
      break;
    case v1::SCORING_ACCUMULATED:
      c.scoring = compress::Scoring::kAccumulated;
      break;
    case v1::SCORING_SINKS_RECENT:
      c.scoring = compress::Scoring::kSinksRecent;
      break;
    default:
      return bad_enum("policy.scoring", p.scoring());
  }
  switch (p.normalization()) {
    case v1::WINDOW_NORMALIZATION_UNSPECIFIED:
      break;
    case v1::WINDOW_NORMALIZATION_LITERAL:
      c.normalization = compress::WindowNormalization::kLiteral;
      break;
    case v1::WINDOW_NORMALIZATION_SUM:
      c.normalization = compress::WindowNormalization::kSum;
      break;
    default:
      return bad_enum("policy.normalization", p.normalization());
  }
  switch (p.pooling()) {
    case v1::POOLING_UNSPECIFIED:
      break;
    case v1::POOLING_NONE:
      c.pooling = compress::Pooling::kNone;
      break;
    case v1::POOLING_AVG:
      c.pooling = compress::Pooling::kAvg;
      break;
    case v1::POOLING_MAX:
      c.pooling = compress::Pooling::kMax;
      break;
    default:
      return bad_enum("policy.pooling", p.pooling());
  }
  switch (p.gqa()) {
    case v1::GQA_MODE_UNSPECIFIED:
      break;
    case v1::GQA_MODE_GROUP_MEAN:
      c.gqa = compress::GqaMode::kGroupMean;
      break;
    case v1::GQA_MODE_REPEAT:
      c.gqa = compress::GqaMode::kRepeat;
      break;
    default:
      return bad_enum("policy.gqa", p.gqa());
  }
  switch (p.codebook_scope()) {
    case v1::CODEBOOK_SCOPE_UNSPECIFIED:
      break;
    case v1::CODEBOOK_SCOPE_LAYER:
      c.codebook_scope = compress::CodebookScope::kLayer;
      break;
    case v1::CODEBOOK_SCOPE_KV_HEAD:
      c.codebook_scope = compress::CodebookScope::kKvHead;
      break;
    default:
      return bad_enum("policy.codebook_scope", p.codebook_scope());
  }
  switch (p.codebook_search()) {
    case v1::CODEBOOK_SEARCH_UNSPECIFIED:
      break;
    case v1::CODEBOOK_SEARCH_EXACT:
      c.codebook_search = compress::CodebookSearch::kExact;
      break;
    case v1::CODEBOOK_SEARCH_LSH:
      c.codebook_search = compress::CodebookSearch::kLsh;
      break;
    default:
      return bad_enum("policy.codebook_search", p.codebook_search());
  }
  if (p.has_beta()) c.beta = p.beta();
  if (p.has_zigzag_tau()) c.zigzag_tau = p.zigzag_tau();
  if (p.has_zigzag_min_fraction()) c.zigzag_min_fraction = p.zigzag_min_fraction();
  if (p.has_window()) c.window = p.window();
  if (p.has_pool_kernel()) c.pool_kernel = p.pool_kernel();
  if (p.has_sinks()) c.sinks = p.sinks();
  if (p.has_codebook()) c.codebook = p.codebook();
  if (p.has_theta_k()) c.theta_k = p.theta_k();
  if (p.has_theta_v()) c.theta_v = p.theta_v();
  if (p.has_codebook_only_if_smaller()) c.codebook_only_if_smaller = p.codebook_only_if_smaller();
  if (p.has_append_batch()) c.append_batch = p.append_batch();
  switch (r.target_case()) {
    case v1::CompressRequest::kReserveRatio:
      out.target = {compress::TargetKind::kReserveRatio, r.reserve_ratio()};
      break;
    case v1::CompressRequest::kByteRatio:
      out.target = {compress::TargetKind::kByteRatio, r.byte_ratio()};
      break;
    default:
      return absl::InvalidArgumentError("target: set reserve_ratio or byte_ratio");
  }
  switch (r.input()) {
    case v1::INPUT_SOURCE_UNSPECIFIED:
    case v1::INPUT_SOURCE_NONE:
      out.input = CompressInput::kNone;
      break;
    case v1::INPUT_SOURCE_WINDOW_QUERIES:
      out.input = CompressInput::kWindowQueries;
      break;
    case v1::INPUT_SOURCE_SCORES:
      out.input = CompressInput::kScores;
      break;
    default:
      return bad_enum("input", r.input());
  }
  out.num_queries = r.num_queries();
  return out;
}

void CompressResultToProto(const CompressResult& r, v1::CompressResponse* p) {
  for (uint32_t l = 0; l < r.layers.size(); ++l) {
    const CompressedLayerResult& in = r.layers[l];
    v1::CompressedLayer* out = p->add_layers();
    out->set_layer(l);
    out->set_context_ratio(in.context_ratio);
    out->set_kept_per_head(in.kept_per_head);
    out->set_num_tokens(in.num_tokens);
    out->mutable_block_ids()->Add(in.block_ids.begin(), in.block_ids.end());
    out->mutable_kept_positions()->Add(in.kept_positions.begin(), in.kept_positions.end());
    out->set_codebook(in.codebook);
    out->set_key_codebook_size(in.key_codebook_size);
    out->set_value_codebook_size(in.value_codebook_size);
    out->set_bytes_held(in.bytes_held);
    out->set_eq15_ratio(in.eq15_ratio);
  }
  p->set_bytes_before(r.bytes_before);
  p->set_bytes_after(r.bytes_after);
  p->set_honest_ratio(r.honest_ratio);
  p->set_eq15_ratio(r.eq15_ratio);
  p->set_reserve_ratio(r.reserve_ratio);
  p->set_blocks_released(r.blocks_released);
  p->set_pending(r.pending);
  p->set_rows_appended(r.rows_appended);
}

void FetchResultToProto(const std::vector<FetchedLayerResult>& layers, v1::FetchResponse* p) {
  for (const FetchedLayerResult& in : layers) {
    v1::FetchedLayer* out = p->add_layers();
    out->set_layer(in.layer);
    out->set_num_tokens(in.num_tokens);
    out->mutable_block_ids()->Add(in.block_ids.begin(), in.block_ids.end());
    out->mutable_positions()->Add(in.positions.begin(), in.positions.end());
    out->set_new_blocks(in.new_blocks);
  }
}

void ParkResultToProto(const std::vector<ParkedLayerResult>& layers, v1::ParkResponse* p) {
  uint64_t released = 0;
  for (const ParkedLayerResult& in : layers) {
    v1::ParkedLayer* out = p->add_layers();
    out->set_layer(in.layer);
    out->set_num_tokens(in.num_tokens);
    out->set_rows_appended(in.rows_appended);
    out->set_matched(in.append.matched);
    out->set_queued(in.append.queued);
    out->set_batch_coded(in.append.batch_coded);
    out->set_new_entries(in.append.new_entries);
    out->set_key_codebook_size(in.key_codebook_size);
    out->set_value_codebook_size(in.value_codebook_size);
    out->set_queued_total(in.queued);
    out->set_arena_bytes(in.arena_bytes);
    out->set_blocks_released(in.blocks_released);
    released += in.blocks_released;
  }
  p->set_blocks_released(released);
}

void SequenceImageHeaderToProto(const SequenceImageHeader& h, v1::SequenceImageHeader* p) {
  p->set_num_layers(h.num_layers);
  p->set_num_kv_heads(h.num_kv_heads);
  p->set_head_dim(h.head_dim);
  p->set_dtype(DTypeToProto(h.dtype));
  p->set_num_positions(h.num_positions);
  for (const SequenceImageLayer& l : h.layers) {
    v1::SequenceImageLayer* out = p->add_layers();
    out->set_num_tokens(l.num_tokens);
    out->set_coded(l.coded);
    out->set_compressed_rows(l.compressed_rows);
    out->mutable_compressed_positions()->Add(l.compressed_positions.begin(),
                                             l.compressed_positions.end());
  }
  p->set_compressed(h.compressed);
  p->set_compression_policy(h.compression_policy);
  p->set_compressed_tokens(h.compressed_tokens);
}

absl::StatusOr<SequenceImageHeader> SequenceImageHeaderFromProto(const v1::SequenceImageHeader& p) {
  SequenceImageHeader h;
  h.num_layers = p.num_layers();
  h.num_kv_heads = p.num_kv_heads();
  h.head_dim = p.head_dim();
  ASSIGN_OR_RETURN(h.dtype, DTypeFromProto(p.dtype(), "header.dtype"));
  h.num_positions = p.num_positions();
  h.layers.reserve(p.layers_size());
  for (const v1::SequenceImageLayer& l : p.layers()) {
    h.layers.push_back({l.num_tokens(),
                        l.coded(),
                        l.compressed_rows(),
                        {l.compressed_positions().begin(), l.compressed_positions().end()}});
  }
  h.compressed = p.compressed();
  if (p.compression_policy().size() > 64) {
    return absl::InvalidArgumentError("header.compression_policy must be at most 64 bytes");
  }
  h.compression_policy = p.compression_policy();
  h.compressed_tokens = p.compressed_tokens();
  return h;
}

}  // namespace cachemgr
