// CacheManagerService: the cachemgr.v1 gRPC service (callback API) over a CacheManager.
//
// The only place absl::Status becomes grpc::Status. Bookkeeping handlers (microseconds) finish
// inline; Compress, Fetch and Park, which do seconds of CPU work on long sequences, and
// StorePrefix and LoadPrefix, which read KV for digests, run on a WorkerPool so they never hold
// gRPC's callback threads.
//
// Who calls: a Unix-socket caller is the peer the PeerListener admitted (its kernel credentials
// become Caller::peer); a TCP caller passed the TCP listener's TcpAuthProcessor (bearer token or
// verified client certificate) before any handler ran. A call carrying the operator credential
// (OperatorToken, metadata "x-cachemgr-operator") gets Caller::operator_credential. Watch is an
// operator call (events name every client's sequences).
#pragma once

#include <atomic>
#include <functional>
#include <string>

#include "absl/synchronization/mutex.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/event_hub.h"
#include "cachemgr/metrics/metrics.h"
#include "cachemgr/peers/peer_directory.h"
#include "cachemgr/peers/row_links.h"
#include "cachemgr/peers/sequence_sender.h"
#include "cachemgr/peers/transfer_ledger.h"
#include "cachemgr/service/operator_token.h"
#include "cachemgr/service/peer_listener.h"
#include "cachemgr/util/worker_pool.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"

namespace cachemgr {

grpc::Status ToGrpcStatus(const absl::Status& status);

class CacheManagerService final : public v1::CacheManager::CallbackService {
 public:
  // `manager`, `events`, `unix_peers`, `operator_token` and `metrics` (may be null) must
  // outlive the service. `worker_threads` (>= 1) run the heavy calls.
  // `fast_socket_path` (may be empty: none) goes to clients attaching over the Unix socket.
  CacheManagerService(CacheManager* manager, EventHub* events, std::string share_socket_path,
                      std::string fast_socket_path, const PeerListener* unix_peers,
                      const OperatorToken* operator_token, std::string version,
                      size_t worker_threads, Metrics* metrics = nullptr);

  grpc::ServerUnaryReactor* Attach(grpc::CallbackServerContext* ctx,
                                   const v1::AttachRequest* request,
                                   v1::AttachResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* Detach(grpc::CallbackServerContext* ctx,
                                   const v1::DetachRequest* request,
                                   v1::DetachResponse* response) override;
  grpc::ServerUnaryReactor* Allocate(grpc::CallbackServerContext* ctx,
                                     const v1::AllocateRequest* request,
                                     v1::AllocateResponse* response) override;
  grpc::ServerUnaryReactor* Free(grpc::CallbackServerContext* ctx, const v1::FreeRequest* request,
                                 v1::FreeResponse* response) override;
  grpc::ServerUnaryReactor* Fork(grpc::CallbackServerContext* ctx, const v1::ForkRequest* request,
                                 v1::ForkResponse* response) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* request,
                                 v1::StepResponse* response) override;
  grpc::ServerUnaryReactor* GetSequence(grpc::CallbackServerContext* ctx,
                                        const v1::GetSequenceRequest* request,
                                        v1::GetSequenceResponse* response) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* ctx,
                                          const v1::ListSequencesRequest* request,
                                          v1::ListSequencesResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* Compress(grpc::CallbackServerContext* ctx,
                                     const v1::CompressRequest* request,
                                     v1::CompressResponse* response) override;
  grpc::ServerUnaryReactor* FinishCompress(grpc::CallbackServerContext* ctx,
                                           const v1::FinishCompressRequest* request,
                                           v1::CompressResponse* response) override;
  grpc::ServerUnaryReactor* Fetch(grpc::CallbackServerContext* ctx, const v1::FetchRequest* request,
                                  v1::FetchResponse* response) override;
  grpc::ServerUnaryReactor* Park(grpc::CallbackServerContext* ctx, const v1::ParkRequest* request,
                                 v1::ParkResponse* response) override;
  grpc::ServerUnaryReactor* StorePrefix(grpc::CallbackServerContext* ctx,
                                        const v1::StorePrefixRequest* request,
                                        v1::StorePrefixResponse* response) override;
  grpc::ServerUnaryReactor* MatchPrefix(grpc::CallbackServerContext* ctx,
                                        const v1::MatchPrefixRequest* request,
                                        v1::MatchPrefixResponse* response) override;
  grpc::ServerUnaryReactor* LoadPrefix(grpc::CallbackServerContext* ctx,
                                       const v1::LoadPrefixRequest* request,
                                       v1::LoadPrefixResponse* response) override;
  grpc::ServerWriteReactor<v1::Event>* Watch(grpc::CallbackServerContext* ctx,
                                             const v1::WatchRequest* request) override;
  grpc::ServerUnaryReactor* ListPeers(grpc::CallbackServerContext* ctx,
                                      const v1::ListPeersRequest* request,
                                      v1::ListPeersResponse* response) override;

  // What ListPeers reports (null: no peers, FAILED_PRECONDITION). Must outlive the service;
  // set before serving.
  // `links` (may be null: transfers send rows on the stream) outlives the service too.
  void set_peers(const PeerDirectory* peers, RowLinks* links = nullptr) {
    peers_ = peers;
    row_links_ = links;
  }
  // Sends the caller's sequence to a peer (peers/sequence_sender.h) on a worker; see the proto.
  grpc::ServerUnaryReactor* TransferSequence(grpc::CallbackServerContext* ctx,
                                             const v1::TransferSequenceRequest* request,
                                             v1::TransferSequenceResponse* response) override;

  // Shutdown support. After BeginDrain, new calls are answered UNAVAILABLE at once. WaitIdle
  // blocks until every call that started has completed (its status delivered), or `timeout`;
  // true when idle. gRPC's own Shutdown deadline cannot tell an in-flight call from an idle
  // client connection, so the daemon waits here and then shuts the server down at once.
  void BeginDrain();
  bool WaitIdle(absl::Duration timeout);

  // Admits calls through grpc::Server::InProcessChannel (whose peer gRPC reports as "unknown"):
  // for the fuzz harness, which drives the service inside its own process. Such callers have no
  // peer credentials (they form one owner, as TCP callers do) and operator rights only with the
  // operator credential. cachemgrd never calls it. Call before serving.
  void AdmitInProcessCallers() { admit_in_process_ = true; }

  // Call bookkeeping used by the reactors (public for them; not part of the API).
  void CallStarted();
  void CallDone();

 private:
  // TransferSequence's send: over a row link when both daemons have one for the pool's memory
  // (setting response's row_link fields), else on the stream.
  absl::StatusOr<SendResult> SendWithRowLink(const PeerRoute& route,
                                             const SequenceInTransit& exported, SendOptions options,
                                             v1::TransferSequenceResponse* response);
  // OK for a Unix-socket peer the PeerListener admitted and for TCP peers (authenticated by
  // the TCP credentials' processor), and in-process calls when admitted; UNAUTHENTICATED for
  // anything else.
  absl::Status Authorize(grpc::CallbackServerContext* ctx) const;
  // Whether the call carries the operator credential.
  bool HasOperatorCredential(grpc::CallbackServerContext* ctx) const;
  // Runs `body` after authorization and finishes the call with its status.
  // `method` names the RPC for the metrics.
  // `body` gets the Caller: `session_token` (from the request), the peer and the arrival time.
  template <typename Body>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method,
                                  const std::string& session_token, Body&& body);
  // The same, with `body` run on the worker pool (it must only capture what outlives the call:
  // the request and response messages do).
  grpc::ServerUnaryReactor* UnaryOnWorker(grpc::CallbackServerContext* ctx, const char* method,
                                          const std::string& session_token,
                                          std::function<absl::Status(const Caller&)> body);
  // The Caller of a call that arrived at `arrival` (the manager's clock) with `session_token`.
  Caller MakeCaller(grpc::CallbackServerContext* ctx, const std::string& session_token,
                    absl::Time arrival) const;
  // Records a finished call in the metrics.
  void Finished(const char* method, const absl::Status& status, absl::Time start);

  CacheManager* const manager_;
  Metrics* const metrics_;
  EventHub* const events_;
  const std::string share_socket_path_;
  const std::string fast_socket_path_;
  const PeerListener* const unix_peers_;
  const OperatorToken* const operator_token_;
  const std::string version_;
  const absl::Time started_;

  const PeerDirectory* peers_ = nullptr;
  RowLinks* row_links_ = nullptr;
  TransferLedger<v1::TransferSequenceResponse> transfers_;
  bool admit_in_process_ = false;
  std::atomic<bool> draining_{false};
  absl::Mutex calls_mu_;
  int64_t calls_in_flight_ ABSL_GUARDED_BY(calls_mu_) = 0;
  // Last member: destroyed (its queue run, its threads joined) before anything it uses.
  WorkerPool workers_;
};

}  // namespace cachemgr
