#include "cachemgr/service/peer_service.h"

#include "absl/strings/match.h"

namespace cachemgr {
namespace {

// Refuses a stream at once (reads nothing).
class Refusal final : public grpc::ServerReadReactor<v1::SequenceChunk> {
 public:
  explicit Refusal(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerUnaryReactor* PeerService::Hello(grpc::CallbackServerContext* ctx,
                                             const v1::HelloRequest* /*request*/,
                                             v1::HelloResponse* response) {
  response->set_boot_id(boot_id_);
  response->set_version(version_);
  response->set_node_name(node_name_);
  if (links_ != nullptr) {
    for (const std::string& kind : links_->names()) response->add_row_links(kind);
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerReadReactor<v1::SequenceChunk>* PeerService::ReceiveSequence(
    grpc::CallbackServerContext* ctx, v1::ReceiveSequenceResponse* response) {
  if (manager_ == nullptr) {
    return new Refusal(
        grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "this server holds no sequences"));
  }
  const std::string peer = ctx->peer();
  if (!absl::StartsWith(peer, "ipv4:") && !absl::StartsWith(peer, "ipv6:")) {
    return new Refusal(
        grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                     "ReceiveSequence is for peer daemons, on the TCP listener (--tcp_address)"));
  }
  return new SequenceReceiver(manager_, &ledger_, links_, absl::FromChrono(ctx->deadline()),
                              response);
}

}  // namespace cachemgr
