#include "cachemgr/service/proto_convert.h"

#include "absl/strings/str_cat.h"

namespace cachemgr {

absl::StatusOr<ModelSpec> ModelSpecFromProto(const v1::ModelSpec& p) {
  ModelSpec s;
  s.name = p.name();
  s.num_layers = p.num_layers();
  s.num_q_heads = p.num_q_heads();
  s.num_kv_heads = p.num_kv_heads();
  s.head_dim = p.head_dim();
  s.block_size = p.block_size();
  switch (p.dtype()) {
    case v1::DTYPE_FP16:
      s.dtype = DType::kFp16;
      break;
    case v1::DTYPE_BF16:
      s.dtype = DType::kBf16;
      break;
    case v1::DTYPE_FP32:
      s.dtype = DType::kFp32;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("model.dtype must be DTYPE_FP16, DTYPE_BF16 or DTYPE_FP32 (got ",
                       static_cast<int>(p.dtype()), ")"));
  }
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
  p->set_dtype(s.dtype == DType::kFp16   ? v1::DTYPE_FP16
               : s.dtype == DType::kBf16 ? v1::DTYPE_BF16
                                         : v1::DTYPE_FP32);
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
  }
  for (uint32_t l = 0; l < r.pool.layers.size(); ++l) {
    v1::LayerPool* lp = d->add_layers();
    lp->set_layer(l);
    lp->set_region_index(r.pool.layers[l].region_index);
    lp->set_offset(r.pool.layers[l].offset);
    lp->set_bytes(r.pool.layers[l].bytes);
  }
  d->set_share_socket_path(share_socket_path);
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
  }
}

void StatsToProto(const StatsSnapshot& s, v1::StatsResponse* p) {
  p->set_num_sequences(s.num_sequences);
  for (const PoolSnapshot& pool : s.pools) {
    v1::PoolStats* ps = p->add_pools();
    ps->set_pool_id(pool.pool_id);
    ps->set_model_name(pool.model_name);
    ps->set_backend(BackendToProto(pool.backend));
    ps->set_device(pool.device);
    ps->set_bytes(pool.bytes);
    ps->set_clients(pool.clients);
    for (uint32_t l = 0; l < pool.layers.size(); ++l) {
      v1::LayerOccupancy* o = ps->add_layers();
      o->set_layer(l);
      o->set_capacity_blocks(pool.layers[l].capacity_blocks);
      o->set_used_blocks(pool.layers[l].used_blocks);
      o->set_free_blocks(pool.layers[l].free_blocks);
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

}  // namespace cachemgr
