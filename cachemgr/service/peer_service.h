// PeerService: cachemgr.v1.Peer, the calls other daemons make (docs/MULTINODE.md). Served on
// both listeners; on TCP, the listener's credentials (bearer token or mutual TLS) admitted the
// caller before any handler runs.
#pragma once

#include <string>

#include "cachemgr/v1/cachemgr.grpc.pb.h"

namespace cachemgr {

class PeerService final : public v1::Peer::CallbackService {
 public:
  PeerService(std::string boot_id, std::string version, std::string node_name)
      : boot_id_(std::move(boot_id)),
        version_(std::move(version)),
        node_name_(std::move(node_name)) {}

  // Answers who this daemon is.
  grpc::ServerUnaryReactor* Hello(grpc::CallbackServerContext* ctx, const v1::HelloRequest* request,
                                  v1::HelloResponse* response) override;

 private:
  const std::string boot_id_, version_, node_name_;
};

}  // namespace cachemgr
