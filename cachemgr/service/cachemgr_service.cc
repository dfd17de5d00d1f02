#include "cachemgr/service/cachemgr_service.h"

#include <deque>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "cachemgr/peers/sequence_sender.h"
#include "cachemgr/service/proto_convert.h"
#include "cachemgr/service/session_calls.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/quote.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

namespace {

// A unary call's reactor: finishes with the handler's status and tells the service when the
// call is completely done (status delivered), which is what graceful shutdown waits for.
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryCall(CacheManagerService* service) : service_(service) { service_->CallStarted(); }
  void OnDone() override {
    service_->CallDone();
    delete this;
  }

 private:
  CacheManagerService* const service_;
};

// Streams events to one Watch caller. Events are queued by the hub's callback (never blocking
// the publisher) and written one at a time; a watcher that falls kMaxQueued events behind is
// ended with RESOURCE_EXHAUSTED rather than letting the daemon's memory grow.
class WatchReactor final : public grpc::ServerWriteReactor<v1::Event> {
 public:
  static constexpr size_t kMaxQueued = 16384;

  WatchReactor(CacheManagerService* service, EventHub* hub, const v1::WatchRequest& request)
      : service_(service), hub_(hub) {
    service_->CallStarted();
    for (int t : request.types()) types_.insert(t);
    subscription_ = hub_->Subscribe([this](const Event* e) { OnEvent(e); });
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, "watch stream broken"));
      return;
    }
    PumpLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    hub_->Unsubscribe(subscription_);
    service_->CallDone();
    delete this;
  }

 private:
  void OnEvent(const Event* e) {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    if (e == nullptr) {
      closing_ = true;
    } else {
      const v1::EventType type = EventTypeToProto(e->type);
      if (!types_.empty() && !types_.contains(type)) return;
      if (queue_.size() >= kMaxQueued) {
        FinishLocked(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                  absl::StrCat("watcher fell ", kMaxQueued,
                                               " events behind; reconnect and read faster")));
        return;
      }
      EventToProto(*e, &queue_.emplace_back());
    }
    PumpLocked();
  }

  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || writing_) return;
    if (queue_.empty()) {
      if (closing_) FinishLocked(grpc::Status::OK);
      return;
    }
    current_ = std::move(queue_.front());
    queue_.pop_front();
    writing_ = true;
    StartWrite(&current_);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  CacheManagerService* const service_;
  EventHub* const hub_;
  absl::flat_hash_set<int> types_;
  uint64_t subscription_ = 0;
  absl::Mutex mu_;
  std::deque<v1::Event> queue_ ABSL_GUARDED_BY(mu_);
  v1::Event current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// A Watch call refused before it started streaming.
class RefusedWatch final : public grpc::ServerWriteReactor<v1::Event> {
 public:
  RefusedWatch(CacheManagerService* service, const grpc::Status& status) : service_(service) {
    service_->CallStarted();
    Finish(status);
  }
  void OnDone() override {
    service_->CallDone();
    delete this;
  }

 private:
  CacheManagerService* const service_;
};

}  // namespace

CacheManagerService::CacheManagerService(CacheManager* manager, EventHub* events,
                                         std::string share_socket_path,
                                         std::string fast_socket_path,
                                         const PeerListener* unix_peers,
                                         const OperatorToken* operator_token, std::string version,
                                         size_t worker_threads, Metrics* metrics)
    : manager_(manager),
      metrics_(metrics),
      events_(events),
      share_socket_path_(std::move(share_socket_path)),
      fast_socket_path_(std::move(fast_socket_path)),
      unix_peers_(unix_peers),
      operator_token_(operator_token),
      version_(std::move(version)),
      started_(absl::Now()),
      workers_(worker_threads) {}

absl::Status CacheManagerService::Authorize(grpc::CallbackServerContext* ctx) const {
  const std::string peer = ctx->peer();
  if (absl::StartsWith(peer, "fd:")) {
    if (unix_peers_ != nullptr && unix_peers_->Lookup(peer).has_value()) return absl::OkStatus();
    return absl::UnauthenticatedError("connection was not admitted by cachemgrd's socket");
  }
  // The TCP port's AuthMetadataProcessor refused every call without valid credentials before
  // any handler ran.
  if (absl::StartsWith(peer, "ipv4:") || absl::StartsWith(peer, "ipv6:")) {
    return absl::OkStatus();
  }
  if (admit_in_process_ && peer == "unknown") return absl::OkStatus();
  return absl::UnauthenticatedError(absl::StrCat("unexpected transport \"", peer, "\""));
}

bool CacheManagerService::HasOperatorCredential(grpc::CallbackServerContext* ctx) const {
  if (operator_token_ == nullptr) return false;
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find(kOperatorMetadataKey);
  return it != metadata.end() &&
         operator_token_->Matches(absl::string_view(it->second.data(), it->second.size()));
}

void CacheManagerService::CallStarted() {
  absl::MutexLock lock(&calls_mu_);
  ++calls_in_flight_;
}

void CacheManagerService::CallDone() {
  absl::MutexLock lock(&calls_mu_);
  --calls_in_flight_;
}

void CacheManagerService::BeginDrain() { draining_.store(true); }

bool CacheManagerService::WaitIdle(absl::Duration timeout) {
  absl::MutexLock lock(&calls_mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(calls_mu_) { return calls_in_flight_ == 0; };
  return calls_mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

Caller CacheManagerService::MakeCaller(grpc::CallbackServerContext* ctx,
                                       const std::string& session_token, absl::Time arrival) const {
  Caller caller(session_token);
  caller.arrival = arrival;
  // Called on the handler's thread while the call exists: see PeerListener on descriptor reuse.
  if (unix_peers_ != nullptr) caller.peer = unix_peers_->Lookup(ctx->peer());
  caller.operator_credential = HasOperatorCredential(ctx);
  return caller;
}

template <typename Body>
grpc::ServerUnaryReactor* CacheManagerService::Unary(grpc::CallbackServerContext* ctx,
                                                     const char* method,
                                                     const std::string& session_token,
                                                     Body&& body) {
  const absl::Time start = absl::Now();
  // On the manager's clock, which judges leases by it.
  const absl::Time arrival = manager_->Now();
  auto* reactor = new UnaryCall(this);
  absl::Status status =
      draining_.load() ? absl::UnavailableError("cachemgrd is shutting down") : Authorize(ctx);
  if (status.ok()) status = body(MakeCaller(ctx, session_token, arrival));
  Finished(method, status, start);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

void CacheManagerService::Finished(const char* method, const absl::Status& status,
                                   absl::Time start) {
  if (metrics_ == nullptr) return;
  metrics_->ObserveRpc(method, absl::StatusCodeToString(status.code()), absl::Now() - start);
}

grpc::ServerUnaryReactor* CacheManagerService::UnaryOnWorker(
    grpc::CallbackServerContext* ctx, const char* method, const std::string& session_token,
    std::function<absl::Status(const Caller&)> body) {
  const absl::Time start = absl::Now();
  // Stamped before the queue: the wait for a worker is not the caller's.
  const absl::Time arrival = manager_->Now();
  auto* reactor = new UnaryCall(this);
  absl::Status status =
      draining_.load() ? absl::UnavailableError("cachemgrd is shutting down") : Authorize(ctx);
  if (!status.ok()) {
    Finished(method, status, start);
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  }
  workers_.Submit([this, reactor, method, start, caller = MakeCaller(ctx, session_token, arrival),
                   body = std::move(body)] {
    const absl::Status result = body(caller);
    Finished(method, result, start);
    reactor->Finish(ToGrpcStatus(result));
  });
  return reactor;
}

grpc::ServerUnaryReactor* CacheManagerService::Attach(grpc::CallbackServerContext* ctx,
                                                      const v1::AttachRequest* request,
                                                      v1::AttachResponse* response) {
  return Unary(ctx, "Attach", std::string(), [&](const Caller& caller) -> absl::Status {
    if (!request->has_model()) return absl::InvalidArgumentError("model is required");
    AttachParams params;
    params.client_name = request->client_name();
    ASSIGN_OR_RETURN(params.model, ModelSpecFromProto(request->model()));
    params.num_blocks = request->num_blocks();
    params.input_buffer_bytes = request->input_buffer_bytes();
    if (request->has_group()) {
      params.group =
          GroupMembership{request->group().name(),
                          request->group().rank(),
                          request->group().size(),
                          {request->group().devices().begin(), request->group().devices().end()}};
    }
    params.device = request->device();
    ASSIGN_OR_RETURN(AttachResult result, manager_->Attach(params, caller));
    AttachResultToProto(result, share_socket_path_, response);
    // The fast path serves this host's Unix-socket clients only.
    if (caller.peer.has_value()) response->set_fast_socket_path(fast_socket_path_);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                         const v1::HeartbeatRequest* request,
                                                         v1::HeartbeatResponse* response) {
  return Unary(ctx, "Heartbeat", request->session_token(), [&](const Caller& caller) {
    return HeartbeatCall(*manager_, caller, *request, response);
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Detach(grpc::CallbackServerContext* ctx,
                                                      const v1::DetachRequest* request,
                                                      v1::DetachResponse* response) {
  return Unary(ctx, "Detach", request->session_token(), [&](const Caller& caller) -> absl::Status {
    ASSIGN_OR_RETURN(DetachResult r, manager_->Detach(caller));
    response->set_sequences_freed(r.sequences_freed);
    response->set_blocks_released(r.blocks_released);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Allocate(grpc::CallbackServerContext* ctx,
                                                        const v1::AllocateRequest* request,
                                                        v1::AllocateResponse* response) {
  return Unary(ctx, "Allocate", request->session_token(), [&](const Caller& caller) {
    return AllocateCall(*manager_, caller, *request, response);
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Free(grpc::CallbackServerContext* ctx,
                                                    const v1::FreeRequest* request,
                                                    v1::FreeResponse* response) {
  return Unary(ctx, "Free", request->session_token(), [&](const Caller& caller) {
    return FreeCall(*manager_, caller, *request, response);
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Fork(grpc::CallbackServerContext* ctx,
                                                    const v1::ForkRequest* request,
                                                    v1::ForkResponse* response) {
  return Unary(ctx, "Fork", request->session_token(), [&](const Caller& caller) {
    return ForkCall(*manager_, caller, *request, response);
  });
}

grpc::ServerUnaryReactor* CacheManagerService::Step(grpc::CallbackServerContext* ctx,
                                                    const v1::StepRequest* request,
                                                    v1::StepResponse* response) {
  return Unary(ctx, "Step", request->session_token(), [&](const Caller& caller) {
    return StepCall(*manager_, caller, *request, response);
  });
}

grpc::ServerUnaryReactor* CacheManagerService::GetSequence(grpc::CallbackServerContext* ctx,
                                                           const v1::GetSequenceRequest* request,
                                                           v1::GetSequenceResponse* response) {
  return Unary(
      ctx, "GetSequence", request->session_token(), [&](const Caller& caller) -> absl::Status {
        ASSIGN_OR_RETURN(SequenceSnapshot seq, manager_->GetSequence(caller, request->sequence_id(),
                                                                     request->include_kv_digest()));
        SequenceToProto(seq, response->mutable_sequence());
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* CacheManagerService::ListSequences(
    grpc::CallbackServerContext* ctx, const v1::ListSequencesRequest* request,
    v1::ListSequencesResponse* response) {
  return Unary(
      ctx, "ListSequences", request->session_token(), [&](const Caller& caller) -> absl::Status {
        ASSIGN_OR_RETURN(
            CacheManager::SequencePage page,
            manager_->ListSequencesPage(caller, request->page_token(), request->page_size()));
        response->set_next_page_token(page.next_page_token);
        for (const SequenceSummary& s : page.sequences) {
          v1::SequenceSummary* out = response->add_sequences();
          out->set_sequence_id(s.sequence_id);
          out->set_owner_client_id(s.owner_client_id);
          out->set_owner_client_name(s.owner_client_name);
          out->set_num_positions(s.num_positions);
          out->set_num_blocks(s.num_blocks);
        }
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* CacheManagerService::Compress(grpc::CallbackServerContext* ctx,
                                                        const v1::CompressRequest* request,
                                                        v1::CompressResponse* response) {
  return UnaryOnWorker(ctx, "Compress", request->session_token(),
                       [this, request, response](const Caller& caller) -> absl::Status {
                         ASSIGN_OR_RETURN(CompressParams params, CompressParamsFromProto(*request));
                         ASSIGN_OR_RETURN(
                             CompressResult r,
                             manager_->Compress(caller, request->sequence_id(), params));
                         CompressResultToProto(r, response);
                         if (metrics_ != nullptr && !r.pending) {
                           metrics_->ObserveCompress(params.policy.name, r);
                         }
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* CacheManagerService::FinishCompress(
    grpc::CallbackServerContext* ctx, const v1::FinishCompressRequest* request,
    v1::CompressResponse* response) {
  return UnaryOnWorker(
      ctx, "FinishCompress", request->session_token(),
      [this, request, response](const Caller& caller) -> absl::Status {
        ASSIGN_OR_RETURN(CompressResult r,
                         manager_->FinishCompress(caller, request->sequence_id(), request->wait(),
                                                  request->cuda_ipc_event_handle()));
        CompressResultToProto(r, response);
        if (metrics_ != nullptr && !r.pending) metrics_->ObserveCompress(r.policy_name, r);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* CacheManagerService::Fetch(grpc::CallbackServerContext* ctx,
                                                     const v1::FetchRequest* request,
                                                     v1::FetchResponse* response) {
  return UnaryOnWorker(ctx, "Fetch", request->session_token(),
                       [this, request, response](const Caller& caller) -> absl::Status {
                         std::vector<uint32_t> layers(request->layers().begin(),
                                                      request->layers().end());
                         ASSIGN_OR_RETURN(std::vector<FetchedLayerResult> r,
                                          manager_->Fetch(caller, request->sequence_id(), layers));
                         FetchResultToProto(r, response);
                         if (metrics_ != nullptr) metrics_->ObserveFetch(r);
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* CacheManagerService::StorePrefix(grpc::CallbackServerContext* ctx,
                                                           const v1::StorePrefixRequest* request,
                                                           v1::StorePrefixResponse* response) {
  return UnaryOnWorker(ctx, "StorePrefix", request->session_token(),
                       [this, request, response](const Caller& caller) -> absl::Status {
                         const std::vector<std::string> hashes(request->block_hashes().begin(),
                                                               request->block_hashes().end());
                         std::optional<PrefixCodebookOptions> codebook;
                         if (request->has_codebook()) {
                           codebook.emplace();
                           codebook->theta_k = request->codebook().theta_k();
                           codebook->theta_v = request->codebook().theta_v();
                           if (request->codebook().has_first_position()) {
                             codebook->first_position = request->codebook().first_position();
                           }
                         }
                         ASSIGN_OR_RETURN(
                             StorePrefixResult r,
                             manager_->StorePrefix(caller, request->sequence_id(),
                                                   request->first_block(), hashes, codebook));
                         response->set_stored(r.stored);
                         response->set_already_stored(r.already_stored);
                         response->set_codebook_layers(r.codebook_layers);
                         response->set_codebook_bytes(r.codebook_bytes);
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* CacheManagerService::MatchPrefix(grpc::CallbackServerContext* ctx,
                                                           const v1::MatchPrefixRequest* request,
                                                           v1::MatchPrefixResponse* response) {
  return Unary(ctx, "MatchPrefix", request->session_token(),
               [&](const Caller& caller) -> absl::Status {
                 const std::vector<std::string> hashes(request->block_hashes().begin(),
                                                       request->block_hashes().end());
                 ASSIGN_OR_RETURN(uint32_t matched, manager_->MatchPrefix(caller, hashes));
                 response->set_matched_blocks(matched);
                 return absl::OkStatus();
               });
}

grpc::ServerUnaryReactor* CacheManagerService::LoadPrefix(grpc::CallbackServerContext* ctx,
                                                          const v1::LoadPrefixRequest* request,
                                                          v1::LoadPrefixResponse* response) {
  return UnaryOnWorker(ctx, "LoadPrefix", request->session_token(),
                       [this, request, response](const Caller& caller) -> absl::Status {
                         const std::vector<std::string> hashes(request->block_hashes().begin(),
                                                               request->block_hashes().end());
                         ASSIGN_OR_RETURN(
                             LoadPrefixResult r,
                             manager_->LoadPrefix(caller, request->sequence_id(), hashes));
                         response->set_loaded_blocks(r.loaded_blocks);
                         response->set_corrupt_blocks(r.corrupt_blocks);
                         if (r.sequence.has_value()) {
                           SequenceToProto(*r.sequence, response->mutable_sequence());
                         }
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* CacheManagerService::Park(grpc::CallbackServerContext* ctx,
                                                    const v1::ParkRequest* request,
                                                    v1::ParkResponse* response) {
  return UnaryOnWorker(ctx, "Park", request->session_token(),
                       [this, request, response](const Caller& caller) -> absl::Status {
                         std::vector<uint32_t> layers(request->layers().begin(),
                                                      request->layers().end());
                         ASSIGN_OR_RETURN(std::vector<ParkedLayerResult> r,
                                          manager_->Park(caller, request->sequence_id(), layers,
                                                         request->cuda_ipc_event_handle()));
                         ParkResultToProto(r, response);
                         if (metrics_ != nullptr) metrics_->ObservePark(r);
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* CacheManagerService::Stats(grpc::CallbackServerContext* ctx,
                                                     const v1::StatsRequest* /*request*/,
                                                     v1::StatsResponse* response) {
  return Unary(ctx, "Stats", std::string(), [&](const Caller& caller) -> absl::Status {
    StatsToProto(manager_->Stats(caller), response);
    response->set_uptime_ms(
        static_cast<uint64_t>(absl::ToInt64Milliseconds(absl::Now() - started_)));
    response->set_version(version_);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* CacheManagerService::ListPeers(grpc::CallbackServerContext* ctx,
                                                         const v1::ListPeersRequest* /*request*/,
                                                         v1::ListPeersResponse* response) {
  return Unary(ctx, "ListPeers", std::string(), [&](const Caller& caller) -> absl::Status {
    if (!caller.operator_credential) {
      return absl::PermissionDeniedError(
          "ListPeers shows the daemon's peers and needs the operator credential: send the "
          "contents of the daemon's --operator_token_file as \"x-cachemgr-operator\" metadata");
    }
    if (peers_ == nullptr) return absl::FailedPreconditionError("this daemon has no peer list");
    response->set_boot_id(peers_->boot_id());
    response->set_node_name(peers_->node_name());
    for (const PeerSnapshot& p : peers_->Snapshot()) {
      v1::PeerInfo* info = response->add_peers();
      info->set_address(p.address);
      info->set_source(p.source);
      info->set_state(p.state == PeerState::kUp     ? v1::PEER_STATE_UP
                      : p.state == PeerState::kDown ? v1::PEER_STATE_DOWN
                      : p.state == PeerState::kSelf ? v1::PEER_STATE_SELF
                                                    : v1::PEER_STATE_UNKNOWN);
      info->set_boot_id(p.boot_id);
      info->set_version(p.version);
      info->set_node_name(p.node_name);
      info->set_last_seen_unix_ms(
          p.last_seen == absl::InfinitePast() ? 0 : absl::ToUnixMillis(p.last_seen));
      info->set_rtt_ms(absl::ToDoubleMilliseconds(p.rtt));
      info->set_probes_ok(p.probes_ok);
      info->set_probes_failed(p.probes_failed);
      info->set_last_error(p.last_error);
      for (const std::string& kind : p.row_links) info->add_row_links(kind);
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<SendResult> CacheManagerService::SendWithRowLink(
    const PeerRoute& route, const SequenceInTransit& exported, SendOptions options,
    v1::TransferSequenceResponse* response) {
  const auto authenticate = [this](grpc::ClientContext* c) { peers_->Authenticate(c); };
  // The rows over a row link when both daemons have a kind for the pool's memory. The receiver
  // refuses one it cannot take at the header, before it claims anything ("header.row_link"):
  // a link it no longer keeps is offered anew, a kind that cannot reach its pool falls back to
  // the stream (and that destination is not offered a link again for a while).
  for (int attempt = 0; row_links_ != nullptr && attempt < 2; ++attempt) {
    absl::StatusOr<RowLinks::SenderLease> lease =
        row_links_->Acquire(route.address, route.boot_id, options.destination_session_token,
                            exported.memory->cuda_device(), route.row_links);
    if (!lease.ok()) {
      if (lease.status().code() != absl::StatusCode::kNotFound) {
        Log(LogLevel::kWarning, "row link not offered; the rows take the stream",
            {{"peer", route.address}, {"error", lease.status().ToString()}});
      }
      break;
    }
    const bool reused = lease->link != nullptr;
    const std::string kind = lease->kind;
    const std::string key = lease->key;
    options.link = &*lease;
    options.link_chunk_bytes = row_links_->chunk_bytes();
    absl::StatusOr<SendResult> sent = SendSequence(route.channel, authenticate, exported, options);
    options.link = nullptr;
    row_links_->Release(*std::move(lease), sent.ok());
    if (sent.ok()) {
      if (!sent->replayed) {
        response->set_row_link(kind);
        response->set_row_link_reused(reused);
      }
      return sent;
    }
    const bool refused = sent.status().code() == absl::StatusCode::kFailedPrecondition &&
                         absl::StrContains(sent.status().message(), "header.row_link");
    if (!refused) return sent;
    Log(LogLevel::kInfo, "row link refused by the peer",
        {{"peer", route.address}, {"error", sent.status().ToString()}});
    if (!reused) {
      row_links_->Refuse(key);
      break;
    }
  }
  return SendSequence(route.channel, authenticate, exported, options);
}

grpc::ServerUnaryReactor* CacheManagerService::TransferSequence(
    grpc::CallbackServerContext* ctx, const v1::TransferSequenceRequest* request,
    v1::TransferSequenceResponse* response) {
  // The call's own deadline bounds the transfer too, less a margin to answer in (SendSequence
  // returns within 200 ms of its deadline).
  const absl::Time call_deadline = absl::FromChrono(ctx->deadline());
  return UnaryOnWorker(
      ctx, "TransferSequence", request->session_token(),
      [this, request, response, call_deadline](const Caller& caller) -> absl::Status {
        if (!caller.has_session()) {
          return absl::InvalidArgumentError("session_token must name the session of the sequence");
        }
        if (!IsValidIdentifier(request->transfer_id(), kMaxSequenceIdLength)) {
          return absl::InvalidArgumentError(absl::StrCat("transfer_id must be 1-",
                                                         kMaxSequenceIdLength,
                                                         " printable characters without spaces"));
        }
        if (request->peer().empty()) return absl::InvalidArgumentError("peer must not be empty");
        if (request->destination_session_token().empty()) {
          return absl::InvalidArgumentError("destination_session_token must not be empty");
        }
        const std::string destination_id = request->destination_sequence_id().empty()
                                               ? request->sequence_id()
                                               : request->destination_sequence_id();
        if (peers_ == nullptr) return absl::FailedPreconditionError("this daemon has no peer list");
        // The id is bound to everything the transfer names: a retry must name the same.
        const std::string fingerprint = absl::StrCat(
            request->session_token(), "\n", request->sequence_id(), "\n", request->peer(), "\n",
            request->destination_session_token(), "\n", destination_id, "\n", request->move());
        v1::TransferSequenceResponse recorded;
        switch (transfers_.Begin(request->transfer_id(), fingerprint, &recorded)) {
          case TransferLedger<v1::TransferSequenceResponse>::Claim::kNew:
            break;
          case TransferLedger<v1::TransferSequenceResponse>::Claim::kDone:
            *response = std::move(recorded);
            response->set_replayed(true);
            return absl::OkStatus();
          case TransferLedger<v1::TransferSequenceResponse>::Claim::kInFlight:
            return absl::AbortedError(absl::StrCat("transfer_id ",
                                                   QuoteForMessage(request->transfer_id()),
                                                   " is in flight; retry when it returns"));
          case TransferLedger<v1::TransferSequenceResponse>::Claim::kConflict:
            return absl::AlreadyExistsError(absl::StrCat("transfer_id ",
                                                         QuoteForMessage(request->transfer_id()),
                                                         " was used for another transfer"));
        }
        absl::Status status = [&]() -> absl::Status {
          ASSIGN_OR_RETURN(PeerRoute route, peers_->Route(request->peer()));
          ASSIGN_OR_RETURN(SequenceInTransit exported,
                           manager_->BeginExport(caller, request->sequence_id()));
          SendOptions options;
          options.transfer_id = request->transfer_id();
          options.destination_session_token = request->destination_session_token();
          options.destination_sequence_id = destination_id;
          options.sender_boot_id = manager_->boot_id();
          const absl::Duration timeout = request->timeout_ms() == 0
                                             ? absl::Seconds(30)
                                             : absl::Milliseconds(request->timeout_ms());
          options.deadline =
              std::min(absl::Now() + timeout, call_deadline - absl::Milliseconds(300));
          absl::StatusOr<SendResult> sent = SendWithRowLink(route, exported, options, response);
          const bool release = sent.ok() && request->move();
          const uint64_t released = manager_->EndExport(exported, release);
          if (!sent.ok()) {
            return absl::Status(sent.status().code(), absl::StrCat("peer ", route.address, ": ",
                                                                   sent.status().message()));
          }
          response->set_destination_sequence_id(sent->destination_sequence_id);
          response->set_payload_bytes(sent->payload_bytes);
          response->set_wire_bytes(sent->wire_bytes);
          response->mutable_layer_digests()->Add(sent->layer_digests.begin(),
                                                 sent->layer_digests.end());
          response->set_source_released(release);
          response->set_replayed(sent->replayed);
          Log(LogLevel::kInfo, "sequence transferred",
              {{"transfer_id", request->transfer_id()},
               {"peer", route.address},
               {"payload_bytes", static_cast<int64_t>(sent->payload_bytes)},
               {"moved", request->move() ? 1 : 0},
               {"blocks_released", static_cast<int64_t>(released)}});
          return absl::OkStatus();
        }();
        if (status.ok()) {
          v1::TransferSequenceResponse outcome = *response;
          transfers_.Complete(request->transfer_id(), std::move(outcome));
        } else {
          transfers_.Forget(request->transfer_id());
        }
        return status;
      });
}

grpc::ServerWriteReactor<v1::Event>* CacheManagerService::Watch(grpc::CallbackServerContext* ctx,
                                                                const v1::WatchRequest* request) {
  if (draining_.load()) {
    return new RefusedWatch(
        this, grpc::Status(grpc::StatusCode::UNAVAILABLE, "cachemgrd is shutting down"));
  }
  if (absl::Status s = Authorize(ctx); !s.ok()) return new RefusedWatch(this, ToGrpcStatus(s));
  if (!HasOperatorCredential(ctx)) {
    return new RefusedWatch(
        this, grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                           "Watch streams every client's events and needs the operator "
                           "credential: send the contents of the daemon's --operator_token_file "
                           "as \"x-cachemgr-operator\" metadata"));
  }
  for (int t : request->types()) {
    if (!v1::EventType_IsValid(t) || t == v1::EVENT_TYPE_UNSPECIFIED) {
      return new RefusedWatch(this,
                              grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                           absl::StrCat("types holds an unknown event type ", t)));
    }
  }
  return new WatchReactor(this, events_, *request);
}

}  // namespace cachemgr
