#include "cachemgr/service/peer_service.h"

namespace cachemgr {

grpc::ServerUnaryReactor* PeerService::Hello(grpc::CallbackServerContext* ctx,
                                             const v1::HelloRequest* /*request*/,
                                             v1::HelloResponse* response) {
  response->set_boot_id(boot_id_);
  response->set_version(version_);
  response->set_node_name(node_name_);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace cachemgr
