// SequenceReceiver: one Peer.ReceiveSequence stream (docs/MULTINODE.md). At the header it claims
// the transfer_id (a retry of a completed transfer is answered from the ledger at once) and
// creates the sequence (CacheManager::BeginImport: allocated, busy); each coded layer is
// rebuilt (compress::CodedLayer::FromImage) and each rows message written into the pool as it
// arrives, or, when the header offers a row link (peers/row_link.h), a thread joins the link (or
// takes the one the header reuses) and receives every row over it while the stream goes on; the
// end's digests are checked against the rows now held and the coded layers
// re-encoded, and only then is the sequence committed. Anything else (a bad chunk, a stream that
// ends early or is cancelled, a deadline) frees the sequence and forgets the claim, so nothing of a
// failed transfer remains and its retry runs again.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cachemgr/cache_manager.h"
#include "cachemgr/peers/row_links.h"
#include "cachemgr/peers/transfer_ledger.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"

namespace cachemgr {

using ReceiveLedger = TransferLedger<v1::ReceiveSequenceResponse>;

class SequenceReceiver final : public grpc::ServerReadReactor<v1::SequenceChunk> {
 public:
  // Starts reading; deletes itself when the call is done. `manager`, `ledger` and `links` (null:
  // no row links) outlive it; `deadline` is the call's (a row link's waits end there).
  SequenceReceiver(CacheManager* manager, ReceiveLedger* ledger, RowLinks* links,
                   absl::Time deadline, v1::ReceiveSequenceResponse* response);

  void OnReadDone(bool ok) override;
  void OnDone() override;

 private:
  // Handles chunk_; sets done_ when the call finished successfully.
  absl::Status Handle();
  absl::Status HandleHeader(const v1::SequenceImageHeader& header);
  absl::Status HandleRows(const v1::SequenceRows& rows);
  absl::Status HandleCoded(const v1::CodedLayerImage& coded);
  absl::Status HandleEnd(const v1::SequenceImageEnd& end);
  // The header's row link: its checks and, for a reused one, taking it (before the claim).
  absl::Status PrepareLink(const v1::RowLinkOffer& offer, uint64_t row_bytes);
  // After BeginImport: starts the thread that joins the link and receives the rows.
  absl::Status StartLink();
  // Waits for that thread; its outcome.
  absl::Status FinishLink();
  // Frees the import and forgets the claim (idempotent).
  void Drop();
  void Fail(const absl::Status& status);

  CacheManager* const manager_;
  ReceiveLedger* const ledger_;
  v1::ReceiveSequenceResponse* const response_;
  const absl::Time arrival_;
  v1::SequenceChunk chunk_;
  std::string transfer_id_;  // claimed (set once the header's claim was new)
  std::optional<SequenceInTransit> import_;
  std::vector<uint32_t> rows_received_;  // per layer: rows written, in order
  // Per coded layer: the layer as received, and the digest of its image re-encoded from it.
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded_;
  std::vector<uint64_t> coded_digests_;
  bool done_ = false;

  // The row link of this transfer, when the header offers one.
  struct Linked {
    RowLinkKind* kind = nullptr;
    std::string link_id, offer;
    uint32_t chunk_rows = 0;
    bool reused = false;
    std::unique_ptr<RowLink> link;  // the thread's until it is joined
    absl::Status status;            // the thread's outcome
    std::atomic<bool> stop{false};  // the stream failed: the thread gives up
    std::thread thread;
  };
  RowLinks* const links_;
  const absl::Time deadline_;
  std::unique_ptr<Linked> linked_;
};

}  // namespace cachemgr
