#include "cachemgr/service/sequence_receiver.h"

#include "absl/strings/str_cat.h"
#include "cachemgr/peers/link_rows.h"
#include "cachemgr/service/cachemgr_service.h"
#include "cachemgr/service/coded_layer_wire.h"
#include "cachemgr/service/proto_convert.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/quote.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

SequenceReceiver::SequenceReceiver(CacheManager* manager, ReceiveLedger* ledger, RowLinks* links,
                                   absl::Time deadline, v1::ReceiveSequenceResponse* response)
    : manager_(manager),
      ledger_(ledger),
      response_(response),
      arrival_(manager->Now()),
      links_(links),
      deadline_(deadline) {
  StartRead(&chunk_);
}

void SequenceReceiver::OnReadDone(bool ok) {
  if (!ok) {
    // The sender went away (or was cancelled, or the deadline passed) before the end.
    Fail(absl::AbortedError("the stream ended before its end message; nothing was kept"));
    return;
  }
  if (absl::Status s = Handle(); !s.ok()) {
    Fail(s);
    return;
  }
  if (done_) return;
  StartRead(&chunk_);
}

absl::Status SequenceReceiver::Handle() {
  switch (chunk_.part_case()) {
    case v1::SequenceChunk::kHeader:
      if (!transfer_id_.empty() || done_) {
        return absl::InvalidArgumentError("header: a stream carries one header, first");
      }
      return HandleHeader(chunk_.header());
    case v1::SequenceChunk::kRows:
      if (!import_.has_value()) return absl::InvalidArgumentError("rows: before the header");
      return HandleRows(chunk_.rows());
    case v1::SequenceChunk::kCoded:
      if (!import_.has_value()) return absl::InvalidArgumentError("coded: before the header");
      return HandleCoded(chunk_.coded());
    case v1::SequenceChunk::kEnd:
      if (!import_.has_value()) return absl::InvalidArgumentError("end: before the header");
      return HandleEnd(chunk_.end());
    case v1::SequenceChunk::PART_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("a chunk holds none of header, coded, rows, end");
}

absl::Status SequenceReceiver::HandleHeader(const v1::SequenceImageHeader& proto) {
  if (!IsValidIdentifier(proto.transfer_id(), kMaxSequenceIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat("header.transfer_id must be 1-",
                                                   kMaxSequenceIdLength,
                                                   " printable characters without spaces"));
  }
  ASSIGN_OR_RETURN(SequenceImageHeader header, SequenceImageHeaderFromProto(proto));
  if (proto.has_row_link()) RETURN_IF_ERROR(PrepareLink(proto.row_link(), header.RowBytes()));
  // A retry must name the same destination: the id is bound to it.
  const std::string fingerprint =
      absl::StrCat(proto.destination_session_token(), "\n", proto.destination_sequence_id());
  v1::ReceiveSequenceResponse recorded;
  switch (ledger_->Begin(proto.transfer_id(), fingerprint, &recorded)) {
    case ReceiveLedger::Claim::kNew:
      break;
    case ReceiveLedger::Claim::kDone:
      *response_ = std::move(recorded);
      response_->set_replayed(true);
      done_ = true;
      Finish(grpc::Status::OK);
      return absl::OkStatus();
    case ReceiveLedger::Claim::kInFlight:
      return absl::AbortedError(absl::StrCat("transfer_id ", QuoteForMessage(proto.transfer_id()),
                                             " is being received; retry when it returns"));
    case ReceiveLedger::Claim::kConflict:
      return absl::AlreadyExistsError(
          absl::StrCat("transfer_id ", QuoteForMessage(proto.transfer_id()),
                       " was used for a transfer to another destination"));
  }
  transfer_id_ = proto.transfer_id();
  Caller caller(proto.destination_session_token());
  caller.arrival = arrival_;
  caller.peer_daemon = true;
  ASSIGN_OR_RETURN(SequenceInTransit imported,
                   manager_->BeginImport(caller, proto.destination_sequence_id(), header));
  rows_received_.assign(imported.header.layers.size(), 0);
  coded_.assign(imported.header.layers.size(), nullptr);
  coded_digests_.assign(imported.header.layers.size(), 0);
  import_ = std::move(imported);
  if (linked_ != nullptr) return StartLink();
  return absl::OkStatus();
}

absl::Status SequenceReceiver::PrepareLink(const v1::RowLinkOffer& offer, uint64_t row_bytes) {
  RowLinkKind* kind = links_ != nullptr ? links_->Find(offer.kind()) : nullptr;
  if (kind == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("header.row_link.kind ", QuoteForMessage(offer.kind()),
                     " is not a row link this daemon joins (its --row_links)"));
  }
  if (!IsValidIdentifier(offer.link_id(), kMaxSequenceIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat("header.row_link.link_id must be 1-",
                                                   kMaxSequenceIdLength,
                                                   " printable characters without spaces"));
  }
  // One message's rows are held in one buffer: bounded like a stream's message.
  constexpr uint64_t kMaxChunkBytes = uint64_t{256} << 20;
  if (offer.chunk_rows() == 0 || 2 * uint64_t{offer.chunk_rows()} * row_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "header.row_link.chunk_rows must be 1 or more, and its rows (keys and values) at most ",
        kMaxChunkBytes, " bytes (got ", offer.chunk_rows(), " rows of ", row_bytes, " bytes)"));
  }
  auto linked = std::make_unique<Linked>();
  linked->kind = kind;
  linked->link_id = offer.link_id();
  linked->offer = offer.offer();
  linked->chunk_rows = offer.chunk_rows();
  if (offer.offer().empty()) {
    absl::StatusOr<std::unique_ptr<RowLink>> kept = links_->Take(offer.link_id());
    if (!kept.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("header.row_link.link_id ", QuoteForMessage(offer.link_id()),
                       ": no such link is kept here (closed, idle too long, or this daemon "
                       "restarted); offer a new one"));
    }
    linked->link = *std::move(kept);
    linked->reused = true;
  }
  linked_ = std::move(linked);
  return absl::OkStatus();
}

absl::Status SequenceReceiver::StartLink() {
  Linked& l = *linked_;
  const int device = import_->memory->cuda_device();
  if (!l.kind->Serves(device)) {
    return absl::FailedPreconditionError(
        absl::StrCat("header.row_link.kind ", std::string(l.kind->name()),
                     " does not reach the destination pool's memory (",
                     device < 0 ? std::string("host") : absl::StrCat("CUDA device ", device),
                     "); send without a row link"));
  }
  if (l.link == nullptr) RETURN_IF_ERROR(l.kind->CanJoin(l.offer, device));
  if (l.link != nullptr && l.link->device() >= 0 && l.link->device() != device) {
    return absl::FailedPreconditionError(
        absl::StrCat("header.row_link.link_id ", QuoteForMessage(l.link_id), " is on CUDA device ",
                     l.link->device(), ", the destination pool on ", device, "; offer a new one"));
  }
  l.thread = std::thread([this, &l, device, import = *import_] {
    const LinkWait wait{deadline_, [&l] { return l.stop.load(); }};
    if (l.link == nullptr) {
      absl::StatusOr<std::unique_ptr<RowLink>> joined = l.kind->Join(l.offer, device, wait);
      if (!joined.ok()) {
        l.status = joined.status();
        return;
      }
      l.link = *std::move(joined);
      links_->CountJoined();
    }
    l.status = ReceiveRowsOverLink(import, *l.link, l.chunk_rows, wait);
  });
  return absl::OkStatus();
}

absl::Status SequenceReceiver::FinishLink() {
  Linked& l = *linked_;
  if (l.thread.joinable()) l.thread.join();
  if (!l.status.ok()) {
    return absl::Status(l.status.code(), absl::StrCat("the row link's rows: ", l.status.message()));
  }
  const auto& layers = import_->header.layers;
  for (uint32_t i = 0; i < layers.size(); ++i) {
    if (!layers[i].coded) rows_received_[i] = layers[i].num_tokens;
  }
  return absl::OkStatus();
}

absl::Status SequenceReceiver::HandleRows(const v1::SequenceRows& rows) {
  if (linked_ != nullptr) {
    return absl::InvalidArgumentError("rows: this transfer's rows come over its row link");
  }
  if (rows.layer() >= rows_received_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows.layer ", rows.layer(), " is out of range"));
  }
  if (rows.first_row() != rows_received_[rows.layer()]) {
    return absl::InvalidArgumentError(absl::StrCat("rows.first_row ", rows.first_row(),
                                                   " of layer ", rows.layer(), " is not the next (",
                                                   rows_received_[rows.layer()], ")"));
  }
  RETURN_IF_ERROR(import_->WriteRows(rows.layer(), rows.first_row(), rows.num_rows(), rows.keys(),
                                     rows.values()));
  rows_received_[rows.layer()] += rows.num_rows();
  return absl::OkStatus();
}

absl::Status SequenceReceiver::HandleCoded(const v1::CodedLayerImage& coded) {
  const uint32_t l = coded.layer();
  const SequenceImageHeader& header = import_->header;
  if (l >= header.layers.size() || !header.layers[l].coded || coded_[l] != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("coded.layer ", l, " is not a coded layer of the header, or came twice"));
  }
  ASSIGN_OR_RETURN(
      compress::CodedLayerImage image,
      CodedLayerImageFromProto(coded, header.num_kv_heads, header.head_dim, header.dtype));
  ASSIGN_OR_RETURN(compress::CodedLayer layer,
                   compress::CodedLayer::FromImage(import_->shape, std::move(image)));
  if (layer.rows() != header.layers[l].num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("coded layer ", l, " holds ", layer.rows(),
                                                   " rows; the header says ",
                                                   header.layers[l].num_tokens));
  }
  for (uint32_t p : layer.Positions()) {
    if (p >= header.num_positions) {
      return absl::InvalidArgumentError(absl::StrCat("coded layer ", l, " has a row at position ",
                                                     p, " of ", header.num_positions));
    }
  }
  // What this daemon now holds, encoded again: equal digests mean equal layers.
  v1::CodedLayerImage held;
  RETURN_IF_ERROR(CodedLayerImageToProto(layer.ToImage(), l, header.num_kv_heads, header.head_dim,
                                         header.dtype, &held));
  coded_digests_[l] = CodedLayerDigest(held);
  coded_[l] = std::make_shared<const compress::CodedLayer>(std::move(layer));
  rows_received_[l] = header.layers[l].num_tokens;
  return absl::OkStatus();
}

absl::Status SequenceReceiver::HandleEnd(const v1::SequenceImageEnd& end) {
  if (linked_ != nullptr) RETURN_IF_ERROR(FinishLink());
  const auto& layers = import_->header.layers;
  for (uint32_t l = 0; l < layers.size(); ++l) {
    if (rows_received_[l] != layers[l].num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("end: layer ", l, " received ",
                                                     rows_received_[l], " of its ",
                                                     layers[l].num_tokens, " rows"));
    }
  }
  if (end.layer_digests_size() != static_cast<int>(layers.size())) {
    return absl::InvalidArgumentError(absl::StrCat("end.layer_digests holds ",
                                                   end.layer_digests_size(), " digests for ",
                                                   layers.size(), " layers"));
  }
  for (uint32_t l = 0; l < layers.size(); ++l) {
    uint64_t digest = coded_digests_[l];
    if (!layers[l].coded) {
      ASSIGN_OR_RETURN(digest, import_->DigestRows(l));
    }
    if (digest != end.layer_digests(l)) {
      return absl::DataLossError(absl::StrCat("layer ", l, "'s rows arrived with digest ", digest,
                                              ", the sender's is ", end.layer_digests(l)));
    }
  }
  RETURN_IF_ERROR(manager_->CommitImport(*import_, coded_).status());
  response_->set_sequence_id(import_->sequence_id);
  response_->mutable_layer_digests()->CopyFrom(end.layer_digests());
  ledger_->Complete(transfer_id_, *response_);
  import_.reset();
  if (linked_ != nullptr) {
    links_->Return(linked_->link_id, std::move(linked_->link), /*ok=*/true, linked_->reused);
    linked_.reset();
  }
  done_ = true;
  Finish(grpc::Status::OK);
  return absl::OkStatus();
}

void SequenceReceiver::Drop() {
  if (linked_ != nullptr) {
    // The thread polls the stop within milliseconds (its link calls' waits).
    linked_->stop.store(true);
    if (linked_->thread.joinable()) linked_->thread.join();
    links_->Return(linked_->link_id, std::move(linked_->link), /*ok=*/false, linked_->reused);
    linked_.reset();
  }
  if (import_.has_value()) {
    manager_->AbortImport(*import_);
    import_.reset();
  }
  if (!transfer_id_.empty()) ledger_->Forget(transfer_id_);  // no-op once completed
}

void SequenceReceiver::Fail(const absl::Status& status) {
  Drop();
  done_ = true;
  Log(LogLevel::kWarning, "sequence transfer not received",
      {{"transfer_id", transfer_id_}, {"error", status.ToString()}});
  Finish(ToGrpcStatus(status));
}

void SequenceReceiver::OnDone() {
  Drop();
  delete this;
}

}  // namespace cachemgr
