// PeerService: cachemgr.v1.Peer, the calls other daemons make (docs/MULTINODE.md). Served on
// both listeners; on TCP, the listener's credentials (bearer token or mutual TLS) admitted the
// caller before any handler runs. ReceiveSequence is answered on TCP only: it acts on the
// session its destination token names whoever attached it, which only a daemon of the cluster
// may do (a local user holding another user's token must not).
#pragma once

#include <string>

#include "cachemgr/cache_manager.h"
#include "cachemgr/peers/row_links.h"
#include "cachemgr/service/sequence_receiver.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"

namespace cachemgr {

class PeerService final : public v1::Peer::CallbackService {
 public:
  // `boot_id` is the manager's (tests may give another); `manager` outlives the service. Without
  // a manager (tests of Hello alone) ReceiveSequence is FAILED_PRECONDITION.
  // `links` (may be null: no row links) outlives the service too.
  PeerService(std::string boot_id, std::string version, std::string node_name,
              CacheManager* manager = nullptr, RowLinks* links = nullptr)
      : boot_id_(std::move(boot_id)),
        version_(std::move(version)),
        node_name_(std::move(node_name)),
        manager_(manager),
        links_(links) {}

  // Answers who this daemon is.
  grpc::ServerUnaryReactor* Hello(grpc::CallbackServerContext* ctx, const v1::HelloRequest* request,
                                  v1::HelloResponse* response) override;

  // A sequence a peer sends (SequenceReceiver).
  grpc::ServerReadReactor<v1::SequenceChunk>* ReceiveSequence(
      grpc::CallbackServerContext* ctx, v1::ReceiveSequenceResponse* response) override;

 private:
  const std::string boot_id_, version_, node_name_;
  CacheManager* const manager_;
  RowLinks* const links_;
  ReceiveLedger ledger_;
};

}  // namespace cachemgr
