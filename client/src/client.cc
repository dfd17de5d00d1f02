// The C++ client of cachemgrd: gRPC calls, status conversion, pool mapping, heartbeats.
#include "cachemgr/client/client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstddef>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/share_channel.h"
#include "cachemgr/util/status_macros.h"
#include "cachemgr/util/unique_fd.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "cachemgr/v1/cachemgr.pb.h"
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

// Compress, Fetch and Park do CPU work proportional to the sequence (codebooks are quadratic).
constexpr auto kHeavyCallDeadline = std::chrono::minutes(10);

void SetHeavyDeadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kHeavyCallDeadline);
}

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
    out.layers.push_back(std::move(table));
  }
  out.compressed = in.compressed();
  out.compression_policy = in.compression_policy();
  out.kept_per_layer.assign(in.kept_per_layer().begin(), in.kept_per_layer().end());
  out.busy = in.busy();
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
                                           l.free_blocks(), l.shared_blocks()});
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
  if (pool.block_bytes() != layout.block_bytes()) {
    return absl::InternalError(absl::StrCat("daemon sent pool.block_bytes ", pool.block_bytes(),
                                            ", the model implies ", layout.block_bytes()));
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
  const uint64_t layer_bytes = layout.layer_bytes();
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
    if (lp.bytes() != layer_bytes) {
      return absl::InternalError(absl::StrCat("daemon sent pool.layers[", lp.layer(), "].bytes ",
                                              lp.bytes(), ", the model implies ", layer_bytes));
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

struct Session::Impl {
  using Stub = pb::CacheManager::Stub;

  // Fixed after Attach.
  std::string client_id;
  std::string session_token;
  std::string pool_id;
  ModelSpec model;
  uint32_t num_blocks = 0;
  uint32_t heartbeat_interval_ms = 0;
  uint32_t lease_timeout_ms = 0;
  std::vector<std::unique_ptr<MappedRegion>> regions;
  KvPoolView pool;
  MemfdRegion input_buffer;
  // Created by the first RecordKvWrites; its handle goes with every later Compress and Park.
  absl::Mutex write_event_mu;
  std::unique_ptr<WriteEvent> write_event ABSL_GUARDED_BY(write_event_mu);
  std::string WriteEventHandle() {
    absl::MutexLock lock(&write_event_mu);
    return write_event == nullptr ? std::string() : write_event->handle();
  }

  absl::Mutex detach_mu;  // serializes Detach()
  // Null once Detach() ran (successfully or not): later calls fail locally, and the channel
  // closes when the last in-flight call drops its reference, so an idle detached Session holds
  // no connection (which would otherwise delay the daemon's graceful shutdown).
  absl::Mutex stub_mu;
  std::shared_ptr<Stub> stub ABSL_GUARDED_BY(stub_mu);

  // Heartbeat thread state.
  absl::Mutex hb_mu;
  bool hb_stop ABSL_GUARDED_BY(hb_mu) = false;
  grpc::ClientContext* hb_context ABSL_GUARDED_BY(hb_mu) = nullptr;  // in-flight heartbeat
  std::thread hb_thread;

  // The stub for one call, or FAILED_PRECONDITION after Detach().
  absl::StatusOr<std::shared_ptr<Stub>> GetStub() {
    absl::MutexLock lock(&stub_mu);
    if (stub == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("session of client ", client_id, " is detached"));
    }
    return stub;
  }

  // One Heartbeat RPC. When called from the heartbeat thread, `cancellable` registers the
  // context so StopHeartbeat() can cancel an in-flight call.
  absl::StatusOr<uint32_t> DoHeartbeat(bool cancellable) {
    ASSIGN_OR_RETURN(std::shared_ptr<Stub> call_stub, GetStub());
    grpc::ClientContext context;
    SetDeadline(context);
    if (cancellable) {
      absl::MutexLock lock(&hb_mu);
      if (hb_stop) return absl::CancelledError("heartbeat stopped");
      hb_context = &context;
    }
    pb::HeartbeatRequest request;
    request.set_session_token(session_token);
    pb::HeartbeatResponse response;
    const grpc::Status status = call_stub->Heartbeat(&context, request, &response);
    if (cancellable) {
      absl::MutexLock lock(&hb_mu);
      hb_context = nullptr;
    }
    RETURN_IF_ERROR(FromGrpc(status));
    return response.lease_remaining_ms();
  }

  void HeartbeatLoop() {
    const absl::Duration interval = absl::Milliseconds(
        heartbeat_interval_ms > 0 ? heartbeat_interval_ms : kDefaultHeartbeatIntervalMs);
    while (true) {
      {
        absl::MutexLock lock(&hb_mu);
        if (hb_mu.AwaitWithTimeout(absl::Condition(&hb_stop), interval)) return;
      }
      absl::StatusOr<uint32_t> result = DoHeartbeat(/*cancellable=*/true);
      if (!result.ok()) {
        const absl::StatusCode code = result.status().code();
        // Transient failures are retried at the next tick; anything else means the session is
        // gone (expired lease, detached, unknown token), so stop bothering the daemon.
        if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded &&
            code != absl::StatusCode::kResourceExhausted) {
          return;
        }
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
    grpc::ClientContext context;
    SetDeadline(context);
    pb::DetachRequest request;
    request.set_session_token(session_token);
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
  auto impl = std::make_unique<Impl>();
  std::shared_ptr<Impl::Stub> stub = pb::CacheManager::NewStub(MakeChannel(socket_path));

  pb::AttachRequest request;
  request.set_client_name(options.client_name);
  ToProto(options.model, request.mutable_model());
  request.set_num_blocks(options.num_blocks);
  request.set_input_buffer_bytes(options.input_buffer_bytes);
  pb::AttachResponse response;
  {
    grpc::ClientContext context;
    SetDeadline(context);
    RETURN_IF_ERROR(FromGrpc(stub->Attach(&context, request, &response)));
  }
  impl->client_id = response.client_id();
  impl->session_token = response.session_token();
  impl->heartbeat_interval_ms = response.heartbeat_interval_ms();
  impl->lease_timeout_ms = response.lease_timeout_ms();
  {
    absl::MutexLock lock(&impl->stub_mu);
    impl->stub = std::move(stub);
  }
  // From here on the daemon holds a session: wrap it so that any failure below detaches.
  std::unique_ptr<Session> session(new Session(std::move(impl)));
  Impl& s = *session->impl_;

  const pb::PoolDescriptor& pool = response.pool();
  s.pool_id = pool.pool_id();
  s.num_blocks = pool.num_blocks();
  ASSIGN_OR_RETURN(s.model, FromProto(pool.model(), options.model));
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
  const kernels::KvLayerLayout layout = LayoutFor(s.model, pool.num_blocks());
  ASSIGN_OR_RETURN(std::vector<const pb::LayerPool*> layers,
                   ValidatePool(pool, layout, s.model.num_layers));

  ASSIGN_OR_RETURN(std::vector<UniqueFd> fds,
                   FetchSharedFds(pool.share_socket_path(), s.session_token));
  // memfd and VMM pools pass one descriptor per region, legacy CUDA IPC none (its handles are
  // in the descriptor); the input buffer's memfd comes last.
  const size_t region_fds =
      method == pb::SHARE_METHOD_CUDA_IPC_HANDLE ? 0 : static_cast<size_t>(pool.regions_size());
  if (fds.size() != region_fds + 1 || pool.input_buffer_region_index() != region_fds) {
    return absl::DataLossError(absl::StrCat("share channel ", pool.share_socket_path(), " passed ",
                                            fds.size(), " descriptors for ", region_fds,
                                            " region descriptors and the input buffer (announced "
                                            "at index ",
                                            pool.input_buffer_region_index(), ")"));
  }
  {
    absl::StatusOr<MemfdRegion> input =
        MemfdRegion::Map(std::move(fds.back()), pool.input_buffer_bytes());
    if (!input.ok()) {
      return absl::Status(input.status().code(),
                          absl::StrCat("mapping the input buffer: ", input.status().message()));
    }
    s.input_buffer = *std::move(input);
    fds.pop_back();
  }
  s.regions.reserve(pool.regions_size());
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
    s.regions.push_back(*std::move(region));
  }
  std::vector<std::byte*> bases;
  bases.reserve(layers.size());
  for (const pb::LayerPool* lp : layers) {
    bases.push_back(s.regions[lp->region_index()]->data() + lp->offset());
  }
  s.pool = KvPoolView(layout, std::move(bases), method != pb::SHARE_METHOD_MEMFD, pool.device());

  if (options.auto_heartbeat) s.StartHeartbeat();
  return session;
}

const std::string& Session::client_id() const { return impl_->client_id; }
const ModelSpec& Session::model() const { return impl_->model; }
const std::string& Session::pool_id() const { return impl_->pool_id; }
uint32_t Session::num_blocks() const { return impl_->num_blocks; }
uint32_t Session::heartbeat_interval_ms() const { return impl_->heartbeat_interval_ms; }
uint32_t Session::lease_timeout_ms() const { return impl_->lease_timeout_ms; }
const KvPoolView& Session::pool() const { return impl_->pool; }
std::span<float> Session::input_buffer() const {
  return {reinterpret_cast<float*>(impl_->input_buffer.data()),
          impl_->input_buffer.size() / sizeof(float)};
}

absl::StatusOr<Allocation> Session::Allocate(std::string_view sequence_id,
                                             uint32_t num_new_tokens) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::AllocateRequest request;
  request.set_session_token(impl_->session_token);
  request.set_sequence_id(std::string(sequence_id));
  request.set_num_new_tokens(num_new_tokens);
  pb::AllocateResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Allocate(&context, request, &response)));
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

absl::StatusOr<uint64_t> Session::Free(std::string_view sequence_id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::FreeRequest request;
  request.set_session_token(impl_->session_token);
  request.set_sequence_id(std::string(sequence_id));
  pb::FreeResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Free(&context, request, &response)));
  return response.blocks_released();
}

absl::StatusOr<SequenceInfo> Session::Fork(std::string_view parent_sequence_id,
                                           std::string_view child_sequence_id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::ForkRequest request;
  request.set_session_token(impl_->session_token);
  request.set_parent_sequence_id(std::string(parent_sequence_id));
  request.set_child_sequence_id(std::string(child_sequence_id));
  pb::ForkResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Fork(&context, request, &response)));
  return FromProto(response.child());
}

absl::StatusOr<SequenceInfo> Session::GetSequence(std::string_view sequence_id,
                                                  bool include_kv_digest) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::GetSequenceRequest request;
  request.set_session_token(impl_->session_token);
  request.set_sequence_id(std::string(sequence_id));
  request.set_include_kv_digest(include_kv_digest);
  pb::GetSequenceResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->GetSequence(&context, request, &response)));
  return FromProto(response.sequence());
}

absl::StatusOr<std::vector<SequenceSummary>> Session::ListSequences() {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::ListSequencesRequest request;
  request.set_session_token(impl_->session_token);
  pb::ListSequencesResponse response;
  grpc::ClientContext context;
  SetDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->ListSequences(&context, request, &response)));
  return FromProto(response);
}

absl::Status Session::RecordKvWrites(void* stream) {
  if (!impl_->pool.on_device()) {
    return absl::FailedPreconditionError(
        "RecordKvWrites is for CUDA pools; this pool is in host memory, where writes are "
        "complete when the stores return");
  }
  absl::MutexLock lock(&impl_->write_event_mu);
  if (impl_->write_event == nullptr) {
    absl::StatusOr<std::unique_ptr<WriteEvent>> event = CreateWriteEvent(impl_->pool.device());
    if (!event.ok()) return event.status();
    impl_->write_event = *std::move(event);
  }
  return impl_->write_event->Record(stream);
}

absl::StatusOr<CompressResult> Session::Compress(std::string_view sequence_id,
                                                 const CompressOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::CompressRequest request;
  request.set_session_token(impl_->session_token);
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
  pb::CompressResponse response;
  grpc::ClientContext context;
  SetHeavyDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Compress(&context, request, &response)));
  CompressResult out;
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

absl::StatusOr<std::vector<FetchedLayer>> Session::Fetch(std::string_view sequence_id,
                                                         const std::vector<uint32_t>& layers) {
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::FetchRequest request;
  request.set_session_token(impl_->session_token);
  request.set_sequence_id(std::string(sequence_id));
  request.mutable_layers()->Add(layers.begin(), layers.end());
  pb::FetchResponse response;
  grpc::ClientContext context;
  SetHeavyDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Fetch(&context, request, &response)));
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
  ASSIGN_OR_RETURN(std::shared_ptr<Impl::Stub> stub, impl_->GetStub());
  pb::ParkRequest request;
  request.set_session_token(impl_->session_token);
  request.set_sequence_id(std::string(sequence_id));
  request.set_cuda_ipc_event_handle(impl_->WriteEventHandle());
  request.mutable_layers()->Add(layers.begin(), layers.end());
  pb::ParkResponse response;
  grpc::ClientContext context;
  SetHeavyDeadline(context);
  RETURN_IF_ERROR(FromGrpc(stub->Park(&context, request, &response)));
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

absl::StatusOr<uint32_t> Session::Heartbeat() { return impl_->DoHeartbeat(/*cancellable=*/false); }

absl::Status Session::Detach() { return impl_->Detach(); }

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
  pb::ListSequencesResponse response;
  grpc::ClientContext context;
  inspector.Prepare(context);
  RETURN_IF_ERROR(FromGrpc(stub->ListSequences(&context, request, &response)));
  return FromProto(response);
}

}  // namespace cachemgr::client
