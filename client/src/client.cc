// The C++ client of cachemgrd: gRPC calls, status conversion, pool mapping, heartbeats.
#include "cachemgr/client/client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/status_macros.h"
#include "cachemgr/util/unique_fd.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "cachemgr/v1/cachemgr.pb.h"
#include "client/src/fast_path_client.h"
#include "client/src/lease_clock.h"
#include "client/src/mapped_region.h"

namespace cachemgr::client {
namespace {

namespace pb = ::cachemgr::v1;

// Every unary call gets this deadline.
constexpr auto kCallDeadline = std::chrono::seconds(10);
// Used when the daemon asks for no particular heartbeat interval.
constexpr uint32_t kDefaultHeartbeatIntervalMs = 1000;

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

void SetDeadline(grpc::ClientContext& context);

std::shared_ptr<grpc::Channel> MakeChannel(
    const std::string& socket_path,
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials(),
    const std::string& address = "") {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  // A private connection per channel, so one session's reconnect backoff (say, while the
  // daemon restarts) never delays another's; short backoff because the peer is local.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Allocate replies carry a slot per token per layer: a long prefill on a deep model exceeds
  // gRPC's 4 MiB default.
  args.SetMaxReceiveMessageSize(256 << 20);
  return grpc::CreateCustomChannel(address.empty() ? "unix:" + socket_path : address,
                                   std::move(credentials), args);
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, const char* what) {
  std::ifstream in(path);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read ", path));
  return buf.str();
}

// A session-less call's channel and context: TLS and the bearer token for TCP, the operator
// credential when there is one.
struct Inspector {
  std::shared_ptr<grpc::Channel> channel;
  std::string bearer_token;
  std::string operator_token;

  static absl::StatusOr<Inspector> Make(const std::string& socket_path,
                                        const ConnectOptions& options) {
    Inspector inspector;
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
    if (options.tls) {
      grpc::SslCredentialsOptions ssl;
      if (!options.tls_ca_file.empty()) {
        ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadWholeFile(options.tls_ca_file, "tls_ca_file"));
      }
      if (!options.tls_cert_file.empty() || !options.tls_key_file.empty()) {
        ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadWholeFile(options.tls_cert_file, "tls_cert_file"));
        ASSIGN_OR_RETURN(ssl.pem_private_key, ReadWholeFile(options.tls_key_file, "tls_key_file"));
      }
      credentials = grpc::SslCredentials(ssl);
    }
    inspector.channel = MakeChannel(socket_path, std::move(credentials), options.address);
    inspector.bearer_token = options.bearer_token;
    std::string token_file = options.operator_token_file;
    const bool named = !token_file.empty();
    if (!named && !socket_path.empty()) token_file = DefaultOperatorTokenPath(socket_path);
    if (!token_file.empty()) {
      absl::StatusOr<std::string> token = ReadWholeFile(token_file, "operator_token_file");
      if (token.ok()) {
        inspector.operator_token = std::string(absl::StripAsciiWhitespace(*token));
      } else if (named) {
        return token.status();
      }
    }
    return inspector;
  }

  void Prepare(grpc::ClientContext& context) const {
    SetDeadline(context);
    if (!bearer_token.empty()) context.AddMetadata("authorization", "Bearer " + bearer_token);
    if (!operator_token.empty()) context.AddMetadata(kOperatorMetadataKey, operator_token);
  }
};

void SetDeadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
}

// Compress, FinishCompress, Fetch and Park do CPU work that grows with the sequence.
constexpr auto kHeavyCallDeadline = std::chrono::minutes(10);

// ---- Enum conversion -------------------------------------------------------------------------

pb::DType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
      return pb::DTYPE_FP16;
    case DType::kBf16:
      return pb::DTYPE_BF16;
    case DType::kFp32:
      return pb::DTYPE_FP32;
  }
  return pb::DTYPE_UNSPECIFIED;
}

pb::CacheLayout ToProto(CacheLayout layout) {
  switch (layout) {
    case CacheLayout::kFlashAttn:
      return pb::CACHE_LAYOUT_FLASH_ATTN;
    case CacheLayout::kFlashInfer:
      return pb::CACHE_LAYOUT_FLASHINFER;
  }
  return pb::CACHE_LAYOUT_UNSPECIFIED;
}

pb::RopeStyle ToProto(RopeStyle style) {
  switch (style) {
    case RopeStyle::kNone:
      return pb::ROPE_STYLE_NONE;
    case RopeStyle::kInterleaved:
      return pb::ROPE_STYLE_INTERLEAVED;
    case RopeStyle::kHalfSplit:
      return pb::ROPE_STYLE_HALF_SPLIT;
  }
  return pb::ROPE_STYLE_UNSPECIFIED;
}

absl::StatusOr<DType> FromProto(pb::DType dtype) {
  switch (dtype) {
    case pb::DTYPE_FP16:
      return DType::kFp16;
    case pb::DTYPE_BF16:
      return DType::kBf16;
    case pb::DTYPE_FP32:
      return DType::kFp32;
    default:
      return absl::InternalError(
          absl::StrCat("daemon sent pool.model.dtype ", static_cast<int>(dtype)));
  }
}

absl::StatusOr<CacheLayout> FromProto(pb::CacheLayout layout) {
  switch (layout) {
    case pb::CACHE_LAYOUT_FLASH_ATTN:
      return CacheLayout::kFlashAttn;
    case pb::CACHE_LAYOUT_FLASHINFER:
      return CacheLayout::kFlashInfer;
    default:
      return absl::InternalError(
          absl::StrCat("daemon sent pool.model.layout ", static_cast<int>(layout)));
  }
}

// Unspecified keeps `fallback` (the style the client asked for).
RopeStyle FromProto(pb::RopeStyle style, RopeStyle fallback) {
  switch (style) {
    case pb::ROPE_STYLE_NONE:
      return RopeStyle::kNone;
    case pb::ROPE_STYLE_INTERLEAVED:
      return RopeStyle::kInterleaved;
    case pb::ROPE_STYLE_HALF_SPLIT:
      return RopeStyle::kHalfSplit;
    default:
      return fallback;
  }
}

std::string BackendName(pb::Backend backend) {
  switch (backend) {
    case pb::BACKEND_HOST:
      return "host";
    case pb::BACKEND_CUDA:
      return "cuda";
    default:
      return "unspecified";
  }
}

// ---- Message conversion ----------------------------------------------------------------------

void ToProto(const ModelSpec& model, pb::ModelSpec* out) {
  out->set_name(model.name);
  out->set_num_layers(model.num_layers);
  out->set_num_q_heads(model.num_q_heads);
  out->set_num_kv_heads(model.num_kv_heads);
  out->set_head_dim(model.head_dim);
  out->set_dtype(ToProto(model.dtype));
  out->set_block_size(model.block_size);
  out->set_layout(ToProto(model.layout));
  pb::RopeConfig* rope = out->mutable_rope();
  rope->set_style(ToProto(model.rope.style));
  rope->set_theta(model.rope.theta);
  rope->set_scaling_factor(model.rope.scaling_factor);
  rope->set_rotary_dim(model.rope.rotary_dim);
}

absl::StatusOr<ModelSpec> FromProto(const pb::ModelSpec& in, const ModelSpec& requested) {
  ModelSpec model;
  model.name = in.name();
  model.num_layers = in.num_layers();
  model.num_q_heads = in.num_q_heads();
  model.num_kv_heads = in.num_kv_heads();
  model.head_dim = in.head_dim();
  ASSIGN_OR_RETURN(model.dtype, FromProto(in.dtype()));
  model.block_size = in.block_size();
  ASSIGN_OR_RETURN(model.layout, FromProto(in.layout()));
  model.rope.style = FromProto(in.rope().style(), requested.rope.style);
  model.rope.theta = in.rope().theta();
  model.rope.scaling_factor = in.rope().scaling_factor() == 0 ? 1.0 : in.rope().scaling_factor();
  model.rope.rotary_dim = in.rope().rotary_dim();
  return model;
}

LayerAllocation FromProto(const pb::LayerAllocation& in) {
  LayerAllocation out;
  out.layer = in.layer();
  out.new_block_ids.assign(in.new_block_ids().begin(), in.new_block_ids().end());
  out.slot_mapping.assign(in.slot_mapping().begin(), in.slot_mapping().end());
  out.num_tokens = in.num_tokens();
  out.copies.reserve(in.copies_size());
  for (const pb::BlockCopy& copy : in.copies()) {
    out.copies.push_back(BlockCopy{copy.src_block(), copy.dst_block()});
  }
  return out;
}

SequenceInfo FromProto(const pb::SequenceInfo& in) {
  SequenceInfo out;
  out.sequence_id = in.sequence_id();
  out.owner_client_id = in.owner_client_id();
  out.parent_sequence_id = in.parent_sequence_id();
  out.num_positions = in.num_positions();
  out.layers.reserve(in.layers_size());
  for (const pb::LayerBlockTable& layer : in.layers()) {
    LayerBlockTable table;
    table.layer = layer.layer();
    table.num_tokens = layer.num_tokens();
    table.block_ids.assign(layer.block_ids().begin(), layer.block_ids().end());
    table.kv_digest = layer.kv_digest();
    table.codebook = layer.codebook();
    table.parked = layer.parked();
    out.layers.push_back(std::move(table));
  }
  out.compressed = in.compressed();
  out.compression_policy = in.compression_policy();
  out.kept_per_layer.assign(in.kept_per_layer().begin(), in.kept_per_layer().end());
  out.busy = in.busy();
  out.compress_pending = in.compress_pending();
  out.compress_ready = in.compress_ready();
  out.compress_error = in.compress_error();
  return out;
}

std::vector<SequenceSummary> FromProto(const pb::ListSequencesResponse& in) {
  std::vector<SequenceSummary> out;
  out.reserve(in.sequences_size());
  for (const pb::SequenceSummary& s : in.sequences()) {
    out.push_back(SequenceSummary{s.sequence_id(), s.owner_client_id(), s.owner_client_name(),
                                  s.num_positions(), s.num_blocks()});
  }
  return out;
}

Stats FromProto(const pb::StatsResponse& in) {
  Stats out;
  out.pools.reserve(in.pools_size());
  for (const pb::PoolStats& p : in.pools()) {
    PoolStats pool;
    pool.pool_id = p.pool_id();
    pool.model_name = p.model_name();
    pool.backend = BackendName(p.backend());
    pool.device = p.device();
    pool.bytes = p.bytes();
    pool.clients = p.clients();
    pool.layers.reserve(p.layers_size());
    for (const pb::LayerOccupancy& l : p.layers()) {
      pool.layers.push_back(LayerOccupancy{l.layer(), l.capacity_blocks(), l.used_blocks(),
                                           l.free_blocks(), l.shared_blocks(),
                                           l.quarantined_blocks()});
    }
    out.pools.push_back(std::move(pool));
  }
  out.clients.reserve(in.clients_size());
  for (const pb::ClientInfo& c : in.clients()) {
    out.clients.push_back(ClientInfo{c.client_id(), c.client_name(), c.pool_id(), c.sequences(),
                                     c.lease_remaining_ms()});
  }
  out.num_sequences = in.num_sequences();
  out.uptime_ms = in.uptime_ms();
  out.version = in.version();
  return out;
}

kernels::KvLayerLayout LayoutFor(const ModelSpec& model, uint32_t num_blocks) {
  kernels::KvLayerLayout layout;
  layout.order = model.layout == CacheLayout::kFlashInfer ? kernels::KvOrder::kFlashInfer
                                                          : kernels::KvOrder::kFlashAttn;
  layout.num_blocks = num_blocks;
  layout.block_size = model.block_size;
  layout.num_kv_heads = model.num_kv_heads;
  layout.head_dim = model.head_dim;
  layout.elem_bytes = DTypeBytes(model.dtype);
  return layout;
}

// Checks the descriptor's per-layer placement against the negotiated model and the regions the
// daemon announced; returns each layer's (region index, offset) in layer order.
absl::StatusOr<std::vector<const pb::LayerPool*>> ValidatePool(const pb::PoolDescriptor& pool,
                                                               const kernels::KvLayerLayout& layout,
                                                               uint32_t num_layers) {
  if (pool.num_blocks() == 0) return absl::InternalError("daemon sent pool.num_blocks 0");
  if (layout.block_size == 0 || layout.num_kv_heads == 0 || layout.head_dim == 0) {
    return absl::InternalError(absl::StrCat("daemon sent a degenerate pool.model: block_size ",
                                            layout.block_size, ", num_kv_heads ",
                                            layout.num_kv_heads, ", head_dim ", layout.head_dim));
  }
  // Every size below is checked: the descriptor's fields may be anything, and a product that
  // wrapped would describe a layer larger than the memory behind it.
  const std::optional<uint64_t> block_bytes = CheckedProduct(
      {2, layout.block_size, layout.num_kv_heads, layout.head_dim, layout.elem_bytes});
  const std::optional<uint64_t> layer_bytes =
      block_bytes.has_value() ? CheckedMul<uint64_t>(*block_bytes, layout.num_blocks)
                              : std::nullopt;
  if (!layer_bytes.has_value()) {
    return absl::DataLossError(absl::StrCat("daemon sent a pool of ", layout.num_blocks,
                                            " blocks whose layer size overflows 64 bits"));
  }
  if (pool.block_bytes() != *block_bytes) {
    return absl::InternalError(absl::StrCat("daemon sent pool.block_bytes ", pool.block_bytes(),
                                            ", the model implies ", *block_bytes));
  }
  if (static_cast<uint32_t>(pool.layers_size()) != num_layers) {
    return absl::InternalError(absl::StrCat("daemon sent ", pool.layers_size(),
                                            " pool.layers for a model of ", num_layers, " layers"));
  }
  for (int i = 0; i < pool.regions_size(); ++i) {
    if (pool.regions(i).index() != static_cast<uint32_t>(i)) {
      return absl::InternalError(
          absl::StrCat("daemon sent pool.regions[", i, "].index ", pool.regions(i).index()));
    }
  }
  std::vector<const pb::LayerPool*> by_layer(num_layers, nullptr);
  for (const pb::LayerPool& lp : pool.layers()) {
    if (lp.layer() >= num_layers || by_layer[lp.layer()] != nullptr) {
      return absl::InternalError(absl::StrCat("daemon sent pool.layers entry for layer ",
                                              lp.layer(), " (model has ", num_layers,
                                              " layers; duplicates not allowed)"));
    }
    if (lp.region_index() >= static_cast<uint32_t>(pool.regions_size())) {
      return absl::InternalError(absl::StrCat("daemon sent pool.layers[", lp.layer(),
                                              "].region_index ", lp.region_index(), " of ",
                                              pool.regions_size(), " regions"));
    }
    if (lp.bytes() != *layer_bytes) {
      return absl::InternalError(absl::StrCat("daemon sent pool.layers[", lp.layer(), "].bytes ",
                                              lp.bytes(), ", the model implies ", *layer_bytes));
    }
    if (lp.offset() % layout.elem_bytes != 0) {
      return absl::InternalError(absl::StrCat("daemon sent pool.layers[", lp.layer(), "].offset ",
                                              lp.offset(), " not aligned to ", layout.elem_bytes,
                                              " bytes"));
    }
    const uint64_t region_bytes = pool.regions(lp.region_index()).bytes();
    if (lp.offset() > region_bytes || lp.bytes() > region_bytes - lp.offset()) {
      return absl::DataLossError(absl::StrCat("pool.layers[", lp.layer(), "] spans [", lp.offset(),
                                              ", +", lp.bytes(), ") beyond region ",
                                              lp.region_index(), " of ", region_bytes, " bytes"));
    }
    by_layer[lp.layer()] = &lp;
  }
  return by_layer;
}

}  // namespace

uint32_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
    case DType::kBf16:
      return 2;
    case DType::kFp32:
      return 4;
  }
  return 0;
}

// ---- Session ---------------------------------------------------------------------------------

namespace {

// One attached session of the daemon: its identity, lease and mapping of the pool. A Session
// holds one current generation; Reattach() replaces a lost one with a new one. Generations are
// never destroyed before the Session, so references handed out earlier stay valid.
struct Generation {
  uint64_t number = 0;
  std::string client_id;
  std::string session_token;
  std::string fast_socket_path;  // empty: the daemon offers this session no fast path
  std::string boot_id;
  std::string pool_id;
  uint32_t group_rank = 0;
  uint32_t group_size = 1;
  ModelSpec model;
  uint32_t num_blocks = 0;
  uint32_t heartbeat_interval_ms = 0;
  uint32_t lease_timeout_ms = 0;
  std::vector<std::unique_ptr<MappedRegion>> regions;
  KvPoolView pool;
  std::unique_ptr<MappedRegion> input_buffer;
  size_t input_buffer_bytes = 0;
  // The local lease deadline (BootNanos); only moves forward.
  std::atomic<int64_t> lease_deadline_ns{0};

  void Renew(int64_t sent_ns, uint32_t granted_ms) {
    const int64_t deadline = LocalLeaseDeadline(sent_ns, granted_ms, lease_timeout_ms);
    int64_t seen = lease_deadline_ns.load(std::memory_order_relaxed);
    while (seen < deadline &&
           !lease_deadline_ns.compare_exchange_weak(seen, deadline, std::memory_order_release)) {
    }
  }
  bool LeaseLeft(int64_t now_ns) const {
    return now_ns < lease_deadline_ns.load(std::memory_order_acquire);
  }
  // Cuts every region (and the input buffer) off the daemon's memory; the first error.
  absl::Status Revoke() {
    absl::Status first;
    for (const std::unique_ptr<MappedRegion>& r : regions) first.Update(r->Revoke());
    if (input_buffer != nullptr) first.Update(input_buffer->Revoke());
    return first;
  }
  absl::Duration heartbeat_interval() const {
    return absl::Milliseconds(heartbeat_interval_ms > 0 ? heartbeat_interval_ms
                                                        : kDefaultHeartbeatIntervalMs);
  }
};

}  // namespace

struct Session::Impl {
  using Stub = pb::CacheManager::Stub;

  Impl(std::string socket, AttachOptions opts)
      : socket_path(std::move(socket)), options(std::move(opts)) {}

  const std::string socket_path;
  const AttachOptions options;

  absl::Mutex detach_mu;  // serializes Detach()
  // Null once Detach() ran (successfully or not): later calls fail locally, and the channel
  // closes when the last in-flight call drops its reference, so an idle detached Session holds
  // no connection (which would otherwise delay the daemon's graceful shutdown).
  absl::Mutex stub_mu;
  std::shared_ptr<Stub> stub ABSL_GUARDED_BY(stub_mu);

  // ---- Generations and loss ----
  absl::Mutex reattach_mu;  // serializes Reattach()
  mutable absl::Mutex state_mu;
  // Every generation adopted so far (the last is current), kept for the references they gave.
  std::vector<std::shared_ptr<Generation>> generations ABSL_GUARDED_BY(state_mu);
  std::atomic<Generation*> current{nullptr};
  std::atomic<bool> lost{false};
  absl::Status lost_status ABSL_GUARDED_BY(state_mu);
  std::optional<absl::Time> revoked_at ABSL_GUARDED_BY(state_mu);
  // Whether the lost generation's token was given back to the daemon (Detach, best effort).
  bool lost_released ABSL_GUARDED_BY(state_mu) = true;
  // Attached in the background after a loss, waiting for Reattach().
  std::shared_ptr<Generation> pending ABSL_GUARDED_BY(state_mu);
  // The last UNAVAILABLE of a heartbeat since the last success (the daemon is not there), and
  // when those failures began (BootNanos).
  absl::Status unreachable ABSL_GUARDED_BY(state_mu);
  int64_t unreachable_since_ns ABSL_GUARDED_BY(state_mu) = 0;

  // Created by the first RecordKvWrites; its handle goes with every later Compress and Park.
  absl::Mutex write_event_mu;
  std::unique_ptr<WriteEvent> write_event ABSL_GUARDED_BY(write_event_mu);
  std::string WriteEventHandle() {
    absl::MutexLock lock(&write_event_mu);
    return write_event == nullptr ? std::string() : write_event->handle();
  }

  // Calls in flight, cancelled when the session is lost (their replies would refer to a
  // revoked mapping, and a hung daemon must not hold the engine past its lease).
  absl::Mutex calls_mu;
  std::vector<grpc::ClientContext*> calls ABSL_GUARDED_BY(calls_mu);

  // Heartbeat thread state.
  absl::Mutex hb_mu;
  bool hb_stop ABSL_GUARDED_BY(hb_mu) = false;
  bool hb_nudge ABSL_GUARDED_BY(hb_mu) = false;
  grpc::ClientContext* hb_context ABSL_GUARDED_BY(hb_mu) = nullptr;  // in-flight heartbeat
  std::thread hb_thread;

  Generation& gen() const { return *current.load(std::memory_order_acquire); }

  // The stub for one call, or FAILED_PRECONDITION after Detach().
  absl::StatusOr<std::shared_ptr<Stub>> GetStub() {
    absl::MutexLock lock(&stub_mu);
    if (stub == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("session of client ", gen().client_id, " is detached"));
    }
    return stub;
  }

  // ---- Attaching a generation ----

  // Attach RPC, share channel, mappings. The number is set when the generation is adopted.
  // `watchdog`: the heartbeat thread's attach, which StopHeartbeat() can cancel.
  absl::StatusOr<std::shared_ptr<Generation>> AttachGeneration(Stub& call_stub,
                                                               bool watchdog = false) {
    pb::AttachRequest request;
    request.set_client_name(options.client_name);
    ToProto(options.model, request.mutable_model());
    request.set_num_blocks(options.num_blocks);
    request.set_input_buffer_bytes(options.input_buffer_bytes);
    request.set_device(options.device);
    if (!options.group_name.empty()) {
      pb::GroupMembership* group = request.mutable_group();
      group->set_name(options.group_name);
      group->set_rank(options.group_rank);
      group->set_size(options.group_size);
      for (const std::string& d : options.group_devices) group->add_devices(d);
    }
    pb::AttachResponse response;
    // The daemon starts the lease when it handles the call, after this.
    const int64_t sent = BootNanos();
    {
      grpc::ClientContext context;
      SetDeadline(context);
      if (watchdog) {
        absl::MutexLock lock(&hb_mu);
        if (hb_stop) return absl::CancelledError("heartbeat stopped");
        hb_context = &context;
      }
      const grpc::Status status = call_stub.Attach(&context, request, &response);
      if (watchdog) {
        absl::MutexLock lock(&hb_mu);
        hb_context = nullptr;
      }
      RETURN_IF_ERROR(FromGrpc(status));
    }
    absl::StatusOr<std::shared_ptr<Generation>> g = MapGeneration(response);
    if (!g.ok()) {
      GiveBack(call_stub, response.session_token());  // attached but unusable
      return g.status();
    }
    (*g)->Renew(sent, (*g)->lease_timeout_ms);
    if (!(*g)->LeaseLeft(BootNanos())) {
      // Attaching took most of a lease (a slow daemon): renew before anyone relies on it.
      grpc::ClientContext context;
      SetDeadline(context);
      pb::HeartbeatRequest beat;
      beat.set_session_token((*g)->session_token);
      pb::HeartbeatResponse left;
      const int64_t beat_sent = BootNanos();
      const grpc::Status status = call_stub.Heartbeat(&context, beat, &left);
      if (status.ok()) {
        (*g)->Renew(beat_sent, std::min((*g)->lease_timeout_ms, left.lease_remaining_ms()));
      }
      if (!(*g)->LeaseLeft(BootNanos())) {
        GiveBack(call_stub, response.session_token());
        return absl::DeadlineExceededError(
            absl::StrCat("attaching took longer than the ", (*g)->lease_timeout_ms, " ms lease (",
                         status.ok() ? "renewed too late" : status.error_message(), ")"));
      }
    }
    return g;
  }

  absl::StatusOr<std::shared_ptr<Generation>> MapGeneration(const pb::AttachResponse& response) {
    auto g = std::make_shared<Generation>();
    g->client_id = response.client_id();
    g->session_token = response.session_token();
    g->fast_socket_path = response.fast_socket_path();
    g->boot_id = response.boot_id();
    g->heartbeat_interval_ms = response.heartbeat_interval_ms();
    g->lease_timeout_ms = response.lease_timeout_ms();
    const pb::PoolDescriptor& pool = response.pool();
    g->pool_id = pool.pool_id();
    g->group_rank = pool.group_rank();
    g->group_size = std::max<uint32_t>(1, pool.group_size());
    g->num_blocks = pool.num_blocks();
    ASSIGN_OR_RETURN(g->model, FromProto(pool.model(), options.model));
    const pb::ShareMethod method = pool.share_method();
    if (method != pb::SHARE_METHOD_MEMFD && method != pb::SHARE_METHOD_CUDA_VMM_FD &&
        method != pb::SHARE_METHOD_CUDA_IPC_HANDLE) {
      return absl::UnimplementedError(absl::StrCat("pool ", pool.pool_id(), " is shared by method ",
                                                   pb::ShareMethod_Name(method),
                                                   ", which this client does not know"));
    }
    if (method != pb::SHARE_METHOD_MEMFD && !CudaMappingAvailable()) {
      return absl::UnimplementedError(
          absl::StrCat("pool ", pool.pool_id(), " lives on GPU ", pool.device(), " (",
                       pb::ShareMethod_Name(method),
                       "): opening CUDA pools needs a client built with -DCACHEMGR_CUDA=ON"));
    }
    const kernels::KvLayerLayout layout = LayoutFor(g->model, pool.num_blocks());
    ASSIGN_OR_RETURN(std::vector<const pb::LayerPool*> layers,
                     ValidatePool(pool, layout, g->model.num_layers));

    ASSIGN_OR_RETURN(std::vector<UniqueFd> fds,
                     FetchSharedFds(pool.share_socket_path(), g->session_token));
    // memfd and VMM pools pass one descriptor per region, legacy CUDA IPC none (its handles are
    // in the descriptor); the input buffer's memfd comes last.
    const size_t region_fds =
        method == pb::SHARE_METHOD_CUDA_IPC_HANDLE ? 0 : static_cast<size_t>(pool.regions_size());
    if (fds.size() != region_fds + 1 || pool.input_buffer_region_index() != region_fds) {
      return absl::DataLossError(absl::StrCat(
          "share channel ", pool.share_socket_path(), " passed ", fds.size(), " descriptors for ",
          region_fds, " region descriptors and the input buffer (announced at index ",
          pool.input_buffer_region_index(), ")"));
    }
    if (pool.input_buffer_bytes() > std::numeric_limits<size_t>::max()) {
      return absl::DataLossError(
          absl::StrCat("input buffer of ", pool.input_buffer_bytes(), " bytes"));
    }
    {
      absl::StatusOr<std::unique_ptr<MappedRegion>> input =
          MapHostRegion(std::move(fds.back()), pool.input_buffer_bytes());
      if (!input.ok()) {
        return absl::Status(input.status().code(),
                            absl::StrCat("mapping the input buffer: ", input.status().message()));
      }
      g->input_buffer = *std::move(input);
      g->input_buffer_bytes = static_cast<size_t>(pool.input_buffer_bytes());
      fds.pop_back();
    }
    g->regions.reserve(pool.regions_size());
    for (int i = 0; i < pool.regions_size(); ++i) {
      const uint64_t bytes = pool.regions(i).bytes();
      if (bytes > std::numeric_limits<size_t>::max()) {
        return absl::DataLossError(absl::StrCat("region ", i, " of ", bytes, " bytes"));
      }
      absl::StatusOr<std::unique_ptr<MappedRegion>> region =
          method == pb::SHARE_METHOD_MEMFD ? MapHostRegion(std::move(fds[i]), bytes)
          : method == pb::SHARE_METHOD_CUDA_VMM_FD
              ? OpenCudaVmmRegion(pool.device(), std::move(fds[i]), bytes)
              : OpenCudaIpcRegion(pool.device(), pool.regions(i).cuda_ipc_handle());
      if (!region.ok()) {
        return absl::Status(region.status().code(),
                            absl::StrCat("mapping region ", i, " of pool ", pool.pool_id(), ": ",
                                         region.status().message()));
      }
      g->regions.push_back(*std::move(region));
    }
    std::vector<std::byte*> bases;
    bases.reserve(layers.size());
    for (const pb::LayerPool* lp : layers) {
      bases.push_back(g->regions[lp->region_index()]->data() + lp->offset());
    }
    g->pool = KvPoolView(layout, std::move(bases), method != pb::SHARE_METHOD_MEMFD, pool.device());
    return g;
  }

  // Best-effort Detach of a token this client no longer uses (a short deadline: the daemon's
  // lease reaps it anyway).
  static void GiveBack(Stub& call_stub, const std::string& token) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    pb::DetachRequest request;
    request.set_session_token(token);
    pb::DetachResponse response;
    (void)call_stub.Detach(&context, request, &response);
  }

  // Makes `g` the current generation (number = previous + 1) and clears the loss. Returns the
  // token of the generation it replaces if that one still has to be given back.
  std::optional<std::string> Adopt(std::shared_ptr<Generation> g) {
    std::optional<std::string> give_back;
    if (options.fast_path) {
      absl::MutexLock lock(&fast_mu);
      if (g->fast_socket_path.empty()) {
        fast = nullptr;
      } else if (fast == nullptr || fast->path() != g->fast_socket_path) {
        fast = std::make_shared<FastPathClient>(g->fast_socket_path,
                                                absl::Microseconds(options.fast_path_spin_us));
      }
    }
    absl::MutexLock lock(&state_mu);
    Generation* previous = current.load(std::memory_order_relaxed);
    g->number = previous == nullptr ? 1 : previous->number + 1;
    if (previous != nullptr && !lost_released) give_back = previous->session_token;
    generations.push_back(g);
    current.store(g.get(), std::memory_order_release);
    lost_status = absl::OkStatus();
    revoked_at.reset();
    lost_released = true;
    unreachable = absl::OkStatus();
    unreachable_since_ns = 0;
    lost.store(false, std::memory_order_release);
    return give_back;
  }

  // ---- Lease ----

  // True: the session is usable and no revocation has begun (so reads made before the call
  // came from the pool). False: the mapping is revoked (an in-progress revocation is waited for).
  bool LeaseOk() {
    if (lost.load(std::memory_order_acquire)) {
      absl::MutexLock lock(&state_mu);  // MarkLost revokes under it
      return false;
    }
    Generation* g = current.load(std::memory_order_acquire);
    if (g->LeaseLeft(BootNanos())) return true;
    MarkLost(g, ExpiredStatus(*g));
    return false;
  }

  absl::Status LostStatus() const {
    absl::MutexLock lock(&state_mu);
    return lost_status;
  }

  // OK if `g` is the current, usable generation; otherwise the status calls return.
  absl::Status CheckUsable(Generation* g) {
    if (g == current.load(std::memory_order_acquire)) {
      if (LeaseOk()) return absl::OkStatus();
      if (absl::Status why = LostStatus(); !why.ok()) return why;
    }
    // Reattach() ran meanwhile.
    return absl::AbortedError(
        absl::StrCat("generation ", g->number, " of client ", g->client_id,
                     " was lost while this call was made (the session is now generation ",
                     gen().number, "): the call's sequences are gone"));
  }

  absl::Status ExpiredStatus(const Generation& g) {
    const std::string when = FormatBootTime(g.lease_deadline_ns.load(std::memory_order_acquire));
    absl::MutexLock lock(&state_mu);
    if (!unreachable.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "cachemgrd unreachable since ", FormatBootTime(unreachable_since_ns), " (",
          unreachable.message(), "); the lease of client ", g.client_id, " (generation ", g.number,
          ") expired at ", when,
          ", so its sequences and blocks are gone; the pool mapping was revoked; Reattach() "
          "starts a new session once the daemon is back"));
    }
    return absl::AbortedError(absl::StrCat(
        "lease expired at ", when, " (client ", g.client_id, ", generation ", g.number,
        ", not renewed for ", g.lease_timeout_ms,
        " ms); the daemon reclaimed this client's blocks: its sequences are gone and the pool "
        "mapping was revoked; Reattach() starts a new session"));
  }

  // Revokes `g`'s mapping and marks the session lost with `why`, unless `g` is no longer current
  // or already lost. Reports kLost afterwards.
  void MarkLost(Generation* g, absl::Status why) {
    {
      absl::MutexLock lock(&state_mu);
      if (g != current.load(std::memory_order_relaxed) || lost.load(std::memory_order_relaxed)) {
        return;
      }
      // Lost before the revocation begins, so lease_ok() true means none has begun; lease_ok()
      // false waits for this lock, so it also means the stores are cut off.
      lost.store(true, std::memory_order_release);
      if (absl::Status revoked = g->Revoke(); !revoked.ok()) {
        why = absl::Status(why.code(),
                           absl::StrCat(why.message(), "; REVOKING THE MAPPING FAILED (",
                                        revoked.message(), "): stop writing into the pool"));
      } else {
        revoked_at = absl::Now();
      }
      lost_status = why;
      lost_released = false;
    }
    {
      absl::MutexLock lock(&calls_mu);
      for (grpc::ClientContext* call : calls) call->TryCancel();
    }
    if (std::shared_ptr<FastPathClient> f = FastClient(); f != nullptr) f->Interrupt();
    Nudge();
    if (options.on_event) options.on_event(SessionEvent{SessionEvent::Kind::kLost, g->number, why});
  }

  // ---- Heartbeats ----

  // One Heartbeat RPC for `g`. `watchdog`: registers the context so StopHeartbeat() can cancel
  // it. NOT_FOUND and FAILED_PRECONDITION (a token from an earlier boot) are definitive: the
  // session is gone, and `g` is marked lost if it is current.
  absl::StatusOr<uint32_t> HeartbeatGeneration(Generation* g, bool watchdog) {
    ASSIGN_OR_RETURN(std::shared_ptr<Stub> call_stub, GetStub());
    grpc::ClientContext context;
    // No later than the local deadline (plus a beat), so the thread is never stuck in a call
    // while the lease runs out.
    const int64_t left_ns = g->lease_deadline_ns.load() - BootNanos();
    const auto wait = std::clamp<std::chrono::nanoseconds>(
        std::chrono::nanoseconds(left_ns) + std::chrono::milliseconds(100),
        std::chrono::milliseconds(100), kCallDeadline);
    context.set_deadline(std::chrono::system_clock::now() + wait);
    if (watchdog) {
      absl::MutexLock lock(&hb_mu);
      if (hb_stop) return absl::CancelledError("heartbeat stopped");
      hb_context = &context;
    }
    pb::HeartbeatRequest request;
    request.set_session_token(g->session_token);
    pb::HeartbeatResponse response;
    const int64_t sent = BootNanos();
    const grpc::Status status = call_stub->Heartbeat(&context, request, &response);
    if (watchdog) {
      absl::MutexLock lock(&hb_mu);
      hb_context = nullptr;
    }
    if (status.ok()) {
      g->Renew(sent, std::min(g->lease_timeout_ms, response.lease_remaining_ms()));
      absl::MutexLock lock(&state_mu);
      unreachable = absl::OkStatus();
      return response.lease_remaining_ms();
    }
    const absl::Status failed = FromGrpc(status);
    switch (failed.code()) {
      case absl::StatusCode::kNotFound:
        MarkLost(g, absl::AbortedError(absl::StrCat(
                        "the daemon no longer knows client ", g->client_id, " (generation ",
                        g->number, "): ", failed.message(),
                        "; its sequences and blocks are gone and the pool mapping was revoked; "
                        "Reattach() starts a new session")));
        break;
      case absl::StatusCode::kFailedPrecondition:
        MarkLost(g, absl::AbortedError(absl::StrCat(
                        "cachemgrd restarted: ", failed.message(),
                        "; the pool mapping was revoked; Reattach() starts a new session")));
        break;
      case absl::StatusCode::kUnavailable: {
        absl::MutexLock lock(&state_mu);
        if (unreachable.ok()) unreachable_since_ns = sent;
        unreachable = failed;
        break;
      }
      default:
        break;
    }
    return failed;
  }

  // Wakes the heartbeat thread: a call failed in a way that may mean the session is gone, or
  // the session was lost and the thread should start re-attaching.
  void Nudge() {
    absl::MutexLock lock(&hb_mu);
    hb_nudge = true;
  }

  // Whether a call that failed with `code` may mean the session is gone.
  static bool MayMeanLost(absl::StatusCode code) {
    return code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kNotFound ||
           code == absl::StatusCode::kFailedPrecondition;
  }

  // Gives the lost generation's token back once (the daemon may still hold it when the loss
  // was local, e.g. a stalled process).
  void ReleaseLost() {
    std::string token;
    {
      absl::MutexLock lock(&state_mu);
      if (!lost.load(std::memory_order_relaxed) || lost_released) return;
      lost_released = true;
      token = current.load(std::memory_order_relaxed)->session_token;
    }
    absl::StatusOr<std::shared_ptr<Stub>> call_stub = GetStub();
    if (call_stub.ok()) GiveBack(**call_stub, token);
  }

  // While lost, with auto_reattach: attaches a new session once the daemon answers, and keeps
  // it alive until Reattach() adopts it.
  void TendPending() {
    std::shared_ptr<Generation> p;
    {
      absl::MutexLock lock(&state_mu);
      p = pending;
    }
    if (p != nullptr) {
      absl::StatusOr<uint32_t> beat = HeartbeatGeneration(p.get(), /*watchdog=*/true);
      if (!p->LeaseLeft(BootNanos()) ||
          (!beat.ok() && (beat.status().code() == absl::StatusCode::kNotFound ||
                          beat.status().code() == absl::StatusCode::kFailedPrecondition))) {
        absl::MutexLock lock(&state_mu);
        if (pending == p) pending = nullptr;  // try again next round
      }
      return;
    }
    absl::StatusOr<std::shared_ptr<Stub>> call_stub = GetStub();
    if (!call_stub.ok()) return;
    absl::StatusOr<std::shared_ptr<Generation>> g = AttachGeneration(**call_stub, true);
    if (!g.ok()) return;
    uint64_t number = 0;
    {
      absl::MutexLock lock(&state_mu);
      if (lost.load(std::memory_order_relaxed) && pending == nullptr) {
        pending = *g;
        number = current.load(std::memory_order_relaxed)->number + 1;
      }
    }
    if (number == 0) {  // adopted meanwhile by a Reattach() that attached on its own
      GiveBack(**call_stub, (*g)->session_token);
      return;
    }
    if (options.on_event) {
      options.on_event(SessionEvent{SessionEvent::Kind::kReady, number, absl::OkStatus()});
    }
  }

  void HeartbeatLoop() {
    int64_t last_beat = BootNanos();
    while (true) {
      Generation* g = current.load(std::memory_order_acquire);
      const int64_t interval = absl::ToInt64Nanoseconds(g->heartbeat_interval());
      int64_t wake = last_beat + interval;
      if (!lost.load(std::memory_order_acquire)) {
        wake = std::min(wake, g->lease_deadline_ns.load(std::memory_order_acquire));
      }
      bool nudged = false;
      {
        absl::MutexLock lock(&hb_mu);
        auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(hb_mu) { return hb_stop || hb_nudge; };
        const int64_t wait = wake - BootNanos();
        if (wait > 0) hb_mu.AwaitWithTimeout(absl::Condition(&woken), absl::Nanoseconds(wait));
        if (hb_stop) return;
        nudged = std::exchange(hb_nudge, false);
      }
      const int64_t now = BootNanos();
      if (!lost.load(std::memory_order_acquire)) {
        if (!LeaseOk()) continue;  // just lost (and revoked): re-attach from the next round
        // A nudge beats at most four times per interval, however fast calls fail.
        if (now >= last_beat + interval || (nudged && now >= last_beat + interval / 4)) {
          (void)HeartbeatGeneration(g, /*watchdog=*/true);
          last_beat = BootNanos();
        }
        continue;
      }
      ReleaseLost();
      if (now >= last_beat + interval / 4) {
        if (options.auto_reattach) TendPending();
        last_beat = BootNanos();
      }
    }
  }

  void StartHeartbeat() {
    hb_thread = std::thread([this] { HeartbeatLoop(); });
  }

  void StopHeartbeat() {
    {
      absl::MutexLock lock(&hb_mu);
      hb_stop = true;
      if (hb_context != nullptr) hb_context->TryCancel();
    }
    if (hb_thread.joinable()) hb_thread.join();
  }

  // ---- Calls ----

  // The fast path (null: none offered, or AttachOptions::fast_path is false).
  absl::Mutex fast_mu;
  std::shared_ptr<FastPathClient> fast ABSL_GUARDED_BY(fast_mu);
  std::shared_ptr<FastPathClient> FastClient() {
    absl::MutexLock lock(&fast_mu);
    return fast;
  }

  // One call of the current generation through the fast path, with Call()'s checks and lease
  // renewal; nullopt when the fast path cannot take it (nothing was sent: use Call()).
  template <typename Request>
  std::optional<absl::Status> FastCall(FastMethod method, Request& request,
                                       google::protobuf::Message* response) {
    std::shared_ptr<FastPathClient> f = FastClient();
    if (f == nullptr) return std::nullopt;
    {
      absl::MutexLock lock(&stub_mu);
      if (stub == nullptr) return std::nullopt;  // detached: Call() answers that
    }
    Generation* g = current.load(std::memory_order_acquire);
    if (absl::Status usable = CheckUsable(g); !usable.ok()) return usable;
    request.set_session_token(g->session_token);
    const int64_t sent = BootNanos();
    std::optional<absl::Status> status =
        f->Call(method, request, response, absl::FromChrono(kCallDeadline));
    if (!status.has_value()) return std::nullopt;
    if (!status->ok()) {
      if (lost.load(std::memory_order_acquire)) return CheckUsable(g);
      if (MayMeanLost(status->code())) Nudge();
      return status;
    }
    g->Renew(sent, g->lease_timeout_ms);
    return CheckUsable(g);
  }

  // One call of the current generation: `rpc(stub, context, token)` performs it. Fails with the
  // loss status, without calling, once the session is lost; renews the local lease when the
  // daemon answered; reports a loss that happened while the call was in flight instead of its
  // reply (which would refer to a revoked mapping).
  template <typename Rpc>
  absl::Status Call(std::chrono::nanoseconds timeout, Rpc&& rpc) {
    ASSIGN_OR_RETURN(std::shared_ptr<Stub> call_stub, GetStub());
    Generation* g = current.load(std::memory_order_acquire);
    RETURN_IF_ERROR(CheckUsable(g));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    {
      absl::MutexLock lock(&calls_mu);
      calls.push_back(&context);
    }
    absl::Cleanup unregister = [&] {
      absl::MutexLock lock(&calls_mu);
      calls.erase(std::find(calls.begin(), calls.end(), &context));
    };
    // Registered before this check, so a loss from now on cancels the call.
    RETURN_IF_ERROR(CheckUsable(g));
    const int64_t sent = BootNanos();
    const grpc::Status status = rpc(*call_stub, &context, g->session_token);
    if (!status.ok()) {
      if (lost.load(std::memory_order_acquire)) return CheckUsable(g);
      absl::Status failed = FromGrpc(status);
      if (MayMeanLost(failed.code())) Nudge();
      return failed;
    }
    g->Renew(sent, g->lease_timeout_ms);
    return CheckUsable(g);
  }

  // One bookkeeping call: through the fast path when it takes it, else the RPC `rpc`.
  template <typename Request, typename Response>
  absl::Status FastOrGrpc(FastMethod method, Request& request, Response* response,
                          grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Request&,
                                                    Response*)) {
    if (std::optional<absl::Status> fast = FastCall(method, request, response)) return *fast;
    return Call(kCallDeadline,
                [&](Stub& stub, grpc::ClientContext* context, const std::string& token) {
                  request.set_session_token(token);
                  return (stub.*rpc)(context, request, response);
                });
  }

  absl::StatusOr<uint64_t> Reattach() {
    absl::MutexLock serialize(&reattach_mu);
    ASSIGN_OR_RETURN(std::shared_ptr<Stub> call_stub, GetStub());
    if (LeaseOk()) {
      return absl::FailedPreconditionError(
          absl::StrCat("generation ", gen().number, " of client ", gen().client_id,
                       " is alive: Reattach() replaces a lost session only"));
    }
    std::shared_ptr<Generation> next;
    {
      absl::MutexLock lock(&state_mu);
      next = std::move(pending);
      pending = nullptr;
    }
    if (next != nullptr && !next->LeaseLeft(BootNanos())) next = nullptr;
    if (next == nullptr) {
      ASSIGN_OR_RETURN(next, AttachGeneration(*call_stub));
    }
    if (std::optional<std::string> old = Adopt(next); old.has_value()) GiveBack(*call_stub, *old);
    Nudge();  // the heartbeat thread follows the new generation's schedule
    return next->number;
  }

  absl::Status Detach() {
    absl::MutexLock lock(&detach_mu);
    std::shared_ptr<Stub> last_stub;
    {
      absl::MutexLock stub_lock(&stub_mu);
      last_stub = std::move(stub);
      stub = nullptr;
    }
    if (last_stub == nullptr) return absl::OkStatus();
    StopHeartbeat();
    std::shared_ptr<Generation> waiting;
    bool was_lost = false;
    bool released = true;
    {
      absl::MutexLock state_lock(&state_mu);
      waiting = std::move(pending);
      pending = nullptr;
      was_lost = lost.load(std::memory_order_relaxed);
      released = lost_released;
      lost_released = true;
    }
    if (waiting != nullptr) GiveBack(*last_stub, waiting->session_token);
    if (was_lost) {
      // Nothing of this session is left at the daemon but, maybe, the token of a loss the
      // daemon has not noticed yet.
      if (!released) GiveBack(*last_stub, gen().session_token);
      return absl::OkStatus();
    }
    grpc::ClientContext context;
    SetDeadline(context);
    pb::DetachRequest request;
    request.set_session_token(gen().session_token);
    pb::DetachResponse response;
    return FromGrpc(last_stub->Detach(&context, request, &response));
  }
};

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Session::~Session() {
  if (impl_ == nullptr) return;
  (void)impl_->Detach();  // best effort; also stops the heartbeat thread
  impl_->StopHeartbeat();
}

absl::StatusOr<std::unique_ptr<Session>> Session::Attach(const std::string& socket_path,
                                                         const AttachOptions& options) {
  auto impl = std::make_unique<Impl>(socket_path, options);
  std::shared_ptr<Impl::Stub> stub = pb::CacheManager::NewStub(MakeChannel(socket_path));
  ASSIGN_OR_RETURN(std::shared_ptr<Generation> first, impl->AttachGeneration(*stub));
  {
    absl::MutexLock lock(&impl->stub_mu);
    impl->stub = std::move(stub);
  }
  (void)impl->Adopt(std::move(first));
  std::unique_ptr<Session> session(new Session(std::move(impl)));
  if (options.auto_heartbeat) session->impl_->StartHeartbeat();
  return session;
}

bool Session::lease_ok() const { return impl_->LeaseOk(); }
absl::Status Session::status() const {
  if (impl_->LeaseOk()) return absl::OkStatus();
  return impl_->LostStatus();
}
uint64_t Session::generation() const { return impl_->gen().number; }
std::optional<absl::Time> Session::mapping_revoked_at() const {
  absl::MutexLock lock(&impl_->state_mu);
  return impl_->revoked_at;
}
absl::StatusOr<uint64_t> Session::Reattach() { return impl_->Reattach(); }
const std::string& Session::boot_id() const { return impl_->gen().boot_id; }

const std::string& Session::client_id() const { return impl_->gen().client_id; }
const std::string& Session::session_token() const { return impl_->gen().session_token; }
const ModelSpec& Session::model() const { return impl_->gen().model; }
const std::string& Session::pool_id() const { return impl_->gen().pool_id; }
uint32_t Session::group_rank() const { return impl_->gen().group_rank; }
uint32_t Session::group_size() const { return impl_->gen().group_size; }
uint32_t Session::num_blocks() const { return impl_->gen().num_blocks; }
uint32_t Session::heartbeat_interval_ms() const { return impl_->gen().heartbeat_interval_ms; }
uint32_t Session::lease_timeout_ms() const { return impl_->gen().lease_timeout_ms; }
const KvPoolView& Session::pool() const { return impl_->gen().pool; }
std::span<float> Session::input_buffer() const {
  const Generation& g = impl_->gen();
  return {reinterpret_cast<float*>(g.input_buffer->data()), g.input_buffer_bytes / sizeof(float)};
}

absl::StatusOr<Allocation> Session::Allocate(std::string_view sequence_id,
                                             uint32_t num_new_tokens) {
  pb::AllocateRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.set_num_new_tokens(num_new_tokens);
  pb::AllocateResponse response;
  RETURN_IF_ERROR(
      impl_->FastOrGrpc(FastMethod::kAllocate, request, &response, &Impl::Stub::Allocate));
  Allocation out;
  out.sequence_id = response.sequence_id();
  out.created = response.created();
  out.first_position = response.first_position();
  out.num_positions = response.num_positions();
  out.layers.reserve(response.layers_size());
  for (const pb::LayerAllocation& layer : response.layers()) {
    out.layers.push_back(FromProto(layer));
  }
  return out;
}

absl::StatusOr<std::vector<StepResult>> Session::Step(std::span<const StepOp> ops,
                                                      bool include_slot_mapping) {
  pb::StepRequest request;
  request.set_include_slot_mapping(include_slot_mapping);
  request.mutable_ops()->Reserve(static_cast<int>(ops.size()));
  for (const StepOp& op : ops) {
    pb::StepOp* out = request.add_ops();
    switch (op.kind) {
      case StepOp::Kind::kAllocate:
        out->mutable_allocate()->set_sequence_id(op.sequence_id);
        out->mutable_allocate()->set_num_new_tokens(op.num_new_tokens);
        break;
      case StepOp::Kind::kFree:
        out->set_free(op.sequence_id);
        break;
      case StepOp::Kind::kFork:
        out->mutable_fork()->set_parent_sequence_id(op.sequence_id);
        out->mutable_fork()->set_child_sequence_id(op.child_sequence_id);
        break;
      case StepOp::Kind::kMatchPrefix:
        out->mutable_match_prefix()->mutable_block_hashes()->Add(op.block_hashes.begin(),
                                                                 op.block_hashes.end());
        break;
    }
  }
  pb::StepResponse response;
  RETURN_IF_ERROR(impl_->FastOrGrpc(FastMethod::kStep, request, &response, &Impl::Stub::Step));
  if (response.results_size() != static_cast<int>(ops.size())) {
    return absl::InternalError(absl::StrCat("Step answered ", response.results_size(),
                                            " results for ", ops.size(), " ops"));
  }
  std::vector<StepResult> out(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const pb::StepResult& r = response.results(static_cast<int>(i));
    StepResult& o = out[i];
    o.status = absl::Status(static_cast<absl::StatusCode>(r.code()), r.message());
    o.created = r.created();
    o.first_position = r.first_position();
    o.num_positions = r.num_positions();
    if (r.has_all_layers()) {  // every layer alike: expanded here
      const LayerAllocation all = FromProto(r.all_layers());
      o.layers.assign(model().num_layers, all);
      for (uint32_t l = 0; l < o.layers.size(); ++l) o.layers[l].layer = l;
    } else {
      o.layers.reserve(r.layers_size());
      for (const pb::LayerAllocation& layer : r.layers()) o.layers.push_back(FromProto(layer));
    }
    o.blocks_released = r.blocks_released();
    o.matched_blocks = r.matched_blocks();
  }
  return out;
}

absl::StatusOr<uint64_t> Session::Free(std::string_view sequence_id) {
  pb::FreeRequest request;
  request.set_sequence_id(std::string(sequence_id));
  pb::FreeResponse response;
  RETURN_IF_ERROR(impl_->FastOrGrpc(FastMethod::kFree, request, &response, &Impl::Stub::Free));
  return response.blocks_released();
}

absl::StatusOr<SequenceInfo> Session::Fork(std::string_view parent_sequence_id,
                                           std::string_view child_sequence_id) {
  pb::ForkRequest request;
  request.set_parent_sequence_id(std::string(parent_sequence_id));
  request.set_child_sequence_id(std::string(child_sequence_id));
  pb::ForkResponse response;
  RETURN_IF_ERROR(impl_->FastOrGrpc(FastMethod::kFork, request, &response, &Impl::Stub::Fork));
  return FromProto(response.child());
}

absl::StatusOr<TransferResult> Session::TransferSequence(const TransferOptions& options) {
  pb::TransferSequenceRequest request;
  request.set_sequence_id(options.sequence_id);
  request.set_peer(options.peer);
  request.set_destination_session_token(options.destination_session_token);
  request.set_destination_sequence_id(options.destination_sequence_id);
  request.set_transfer_id(options.transfer_id);
  request.set_move(options.move);
  request.set_timeout_ms(options.timeout_ms);
  pb::TransferSequenceResponse response;
  const auto deadline =
      std::chrono::milliseconds(options.timeout_ms == 0 ? 30000 : options.timeout_ms) +
      kCallDeadline;
  RETURN_IF_ERROR(impl_->Call(
      deadline, [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
        request.set_session_token(token);
        return stub.TransferSequence(context, request, &response);
      }));
  TransferResult out;
  out.destination_sequence_id = response.destination_sequence_id();
  out.payload_bytes = response.payload_bytes();
  out.wire_bytes = response.wire_bytes();
  out.layer_digests.assign(response.layer_digests().begin(), response.layer_digests().end());
  out.source_released = response.source_released();
  out.replayed = response.replayed();
  out.row_link = response.row_link();
  out.row_link_reused = response.row_link_reused();
  return out;
}

absl::StatusOr<SequenceInfo> Session::GetSequence(std::string_view sequence_id,
                                                  bool include_kv_digest) {
  pb::GetSequenceRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.set_include_kv_digest(include_kv_digest);
  pb::GetSequenceResponse response;
  RETURN_IF_ERROR(impl_->Call(
      kCallDeadline, [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
        request.set_session_token(token);
        return stub.GetSequence(context, request, &response);
      }));
  return FromProto(response.sequence());
}

absl::StatusOr<std::vector<SequenceSummary>> Session::ListSequences() {
  std::vector<SequenceSummary> out;
  pb::ListSequencesRequest request;
  do {  // one page per call, until the daemon says it was the last
    pb::ListSequencesResponse response;
    RETURN_IF_ERROR(impl_->Call(kCallDeadline, [&](Impl::Stub& stub, grpc::ClientContext* context,
                                                   const std::string& token) {
      request.set_session_token(token);
      return stub.ListSequences(context, request, &response);
    }));
    for (SequenceSummary& s : FromProto(response)) out.push_back(std::move(s));
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return out;
}

absl::Status Session::RecordKvWrites(void* stream) {
  if (!impl_->gen().pool.on_device()) {
    return absl::FailedPreconditionError(
        "RecordKvWrites is for CUDA pools; this pool is in host memory, where writes are "
        "complete when the stores return");
  }
  absl::MutexLock lock(&impl_->write_event_mu);
  if (impl_->write_event == nullptr) {
    absl::StatusOr<std::unique_ptr<WriteEvent>> event =
        CreateWriteEvent(impl_->gen().pool.device());
    if (!event.ok()) return event.status();
    impl_->write_event = *std::move(event);
  }
  return impl_->write_event->Record(stream);
}

namespace {

CompressResult CompressResultFromProto(const pb::CompressResponse& response) {
  CompressResult out;
  out.pending = response.pending();
  out.rows_appended = response.rows_appended();
  for (const pb::CompressedLayer& l : response.layers()) {
    CompressedLayer c;
    c.layer = l.layer();
    c.context_ratio = l.context_ratio();
    c.kept_per_head = l.kept_per_head();
    c.num_tokens = l.num_tokens();
    c.block_ids.assign(l.block_ids().begin(), l.block_ids().end());
    c.kept_positions.assign(l.kept_positions().begin(), l.kept_positions().end());
    c.codebook = l.codebook();
    c.key_codebook_size = l.key_codebook_size();
    c.value_codebook_size = l.value_codebook_size();
    c.bytes_held = l.bytes_held();
    c.eq15_ratio = l.eq15_ratio();
    out.layers.push_back(std::move(c));
  }
  out.bytes_before = response.bytes_before();
  out.bytes_after = response.bytes_after();
  out.honest_ratio = response.honest_ratio();
  out.eq15_ratio = response.eq15_ratio();
  out.reserve_ratio = response.reserve_ratio();
  out.blocks_released = response.blocks_released();
  return out;
}

}  // namespace

absl::StatusOr<CompressResult> Session::Compress(std::string_view sequence_id,
                                                 const CompressOptions& options) {
  pb::CompressRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.set_cuda_ipc_event_handle(impl_->WriteEventHandle());
  const CompressionPolicy& in = options.policy;
  pb::CompressionPolicy* p = request.mutable_policy();
  p->set_preset(in.preset);
  // The client enums list kPreset first, in the proto's order, so the values map directly.
  p->set_schedule(static_cast<pb::BudgetSchedule>(in.schedule));
  p->set_scoring(static_cast<pb::Scoring>(in.scoring));
  p->set_normalization(static_cast<pb::WindowNormalization>(in.normalization));
  p->set_pooling(static_cast<pb::Pooling>(in.pooling));
  p->set_gqa(static_cast<pb::GqaMode>(in.gqa));
  p->set_codebook_scope(static_cast<pb::CodebookScope>(in.codebook_scope));
  p->set_codebook_search(static_cast<pb::CodebookSearch>(in.codebook_search));
  if (in.beta) p->set_beta(*in.beta);
  if (in.zigzag_tau) p->set_zigzag_tau(*in.zigzag_tau);
  if (in.zigzag_min_fraction) p->set_zigzag_min_fraction(*in.zigzag_min_fraction);
  if (in.window) p->set_window(*in.window);
  if (in.pool_kernel) p->set_pool_kernel(*in.pool_kernel);
  if (in.sinks) p->set_sinks(*in.sinks);
  if (in.codebook) p->set_codebook(*in.codebook);
  if (in.theta_k) p->set_theta_k(*in.theta_k);
  if (in.theta_v) p->set_theta_v(*in.theta_v);
  if (in.codebook_only_if_smaller) p->set_codebook_only_if_smaller(*in.codebook_only_if_smaller);
  if (in.append_batch) p->set_append_batch(*in.append_batch);
  if (options.target_kind == CompressTargetKind::kReserveRatio) {
    request.set_reserve_ratio(options.target);
  } else {
    request.set_byte_ratio(options.target);
  }
  switch (options.input) {
    case CompressInputSource::kNone:
      request.set_input(pb::INPUT_SOURCE_NONE);
      break;
    case CompressInputSource::kWindowQueries:
      request.set_input(pb::INPUT_SOURCE_WINDOW_QUERIES);
      break;
    case CompressInputSource::kScores:
      request.set_input(pb::INPUT_SOURCE_SCORES);
      break;
  }
  request.set_num_queries(options.num_queries);
  request.set_background(options.background);
  pb::CompressResponse response;
  RETURN_IF_ERROR(
      impl_->Call(kHeavyCallDeadline,
                  [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
                    request.set_session_token(token);
                    return stub.Compress(context, request, &response);
                  }));
  return CompressResultFromProto(response);
}

absl::StatusOr<CompressResult> Session::FinishCompress(std::string_view sequence_id, bool wait) {
  pb::FinishCompressRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.set_wait(wait);
  request.set_cuda_ipc_event_handle(impl_->WriteEventHandle());
  pb::CompressResponse response;
  RETURN_IF_ERROR(
      impl_->Call(kHeavyCallDeadline,
                  [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
                    request.set_session_token(token);
                    return stub.FinishCompress(context, request, &response);
                  }));
  return CompressResultFromProto(response);
}

absl::StatusOr<std::vector<FetchedLayer>> Session::Fetch(std::string_view sequence_id,
                                                         const std::vector<uint32_t>& layers) {
  pb::FetchRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.mutable_layers()->Add(layers.begin(), layers.end());
  pb::FetchResponse response;
  RETURN_IF_ERROR(
      impl_->Call(kHeavyCallDeadline,
                  [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
                    request.set_session_token(token);
                    return stub.Fetch(context, request, &response);
                  }));
  std::vector<FetchedLayer> out;
  for (const pb::FetchedLayer& l : response.layers()) {
    FetchedLayer f;
    f.layer = l.layer();
    f.num_tokens = l.num_tokens();
    f.block_ids.assign(l.block_ids().begin(), l.block_ids().end());
    f.positions.assign(l.positions().begin(), l.positions().end());
    f.new_blocks = l.new_blocks();
    out.push_back(std::move(f));
  }
  return out;
}

absl::StatusOr<std::vector<ParkedLayer>> Session::Park(std::string_view sequence_id,
                                                       const std::vector<uint32_t>& layers) {
  pb::ParkRequest request;
  request.set_sequence_id(std::string(sequence_id));
  request.set_cuda_ipc_event_handle(impl_->WriteEventHandle());
  request.mutable_layers()->Add(layers.begin(), layers.end());
  pb::ParkResponse response;
  RETURN_IF_ERROR(
      impl_->Call(kHeavyCallDeadline,
                  [&](Impl::Stub& stub, grpc::ClientContext* context, const std::string& token) {
                    request.set_session_token(token);
                    return stub.Park(context, request, &response);
                  }));
  std::vector<ParkedLayer> out;
  for (const pb::ParkedLayer& l : response.layers()) {
    ParkedLayer p;
    p.layer = l.layer();
    p.num_tokens = l.num_tokens();
    p.rows_appended = l.rows_appended();
    p.matched = l.matched();
    p.queued = l.queued();
    p.batch_coded = l.batch_coded();
    p.new_entries = l.new_entries();
    p.key_codebook_size = l.key_codebook_size();
    p.value_codebook_size = l.value_codebook_size();
    p.queued_total = l.queued_total();
    p.arena_bytes = l.arena_bytes();
    p.blocks_released = l.blocks_released();
    out.push_back(p);
  }
  return out;
}

absl::StatusOr<uint32_t> Session::Heartbeat() {
  Generation* g = impl_->current.load(std::memory_order_acquire);
  RETURN_IF_ERROR(impl_->CheckUsable(g));
  absl::StatusOr<uint32_t> left = impl_->HeartbeatGeneration(g, /*watchdog=*/false);
  if (!left.ok() && impl_->lost.load(std::memory_order_acquire)) return impl_->LostStatus();
  return left;
}

absl::Status Session::Detach() { return impl_->Detach(); }

uint64_t Session::fast_path_calls() const {
  std::shared_ptr<FastPathClient> f = impl_->FastClient();
  return f == nullptr ? 0 : f->calls();
}

// ---- Session-less inspection -----------------------------------------------------------------

absl::StatusOr<Stats> GetStats(const std::string& socket_path, const ConnectOptions& options) {
  ASSIGN_OR_RETURN(Inspector inspector, Inspector::Make(socket_path, options));
  auto stub = pb::CacheManager::NewStub(inspector.channel);
  pb::StatsRequest request;
  pb::StatsResponse response;
  grpc::ClientContext context;
  inspector.Prepare(context);
  RETURN_IF_ERROR(FromGrpc(stub->Stats(&context, request, &response)));
  return FromProto(response);
}

absl::StatusOr<std::vector<SequenceSummary>> ListAllSequences(const std::string& socket_path,
                                                              const ConnectOptions& options) {
  ASSIGN_OR_RETURN(Inspector inspector, Inspector::Make(socket_path, options));
  auto stub = pb::CacheManager::NewStub(inspector.channel);
  pb::ListSequencesRequest request;  // no token: every client's sequences (operator) or ours
  std::vector<SequenceSummary> out;
  do {  // one page per call, until the daemon says it was the last
    pb::ListSequencesResponse response;
    grpc::ClientContext context;
    inspector.Prepare(context);
    RETURN_IF_ERROR(FromGrpc(stub->ListSequences(&context, request, &response)));
    for (SequenceSummary& s : FromProto(response)) out.push_back(std::move(s));
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return out;
}

}  // namespace cachemgr::client
