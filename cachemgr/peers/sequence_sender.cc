#include "cachemgr/peers/sequence_sender.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/peers/link_rows.h"
#include "cachemgr/service/coded_layer_wire.h"
#include "cachemgr/service/proto_convert.h"
#include "cachemgr/util/status_macros.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"

namespace cachemgr {
namespace {

// What the stream ends with, shared by the caller and the stream (which outlives a caller that
// gave up at the deadline).
struct SendState {
  absl::Mutex mu;
  bool done ABSL_GUARDED_BY(mu) = false;       // OnDone ran (the stream is gone)
  bool abandoned ABSL_GUARDED_BY(mu) = false;  // the caller gave up: send nothing more
  // Row link transfers: the end waits until the caller says the link delivered the rows.
  bool end_released ABSL_GUARDED_BY(mu) = false;
  bool holding ABSL_GUARDED_BY(mu) = false;  // the stream waits for end_released
  absl::Status status ABSL_GUARDED_BY(mu);
  v1::ReceiveSequenceResponse response ABSL_GUARDED_BY(mu);
  uint64_t payload_bytes ABSL_GUARDED_BY(mu) = 0;
  uint64_t wire_bytes ABSL_GUARDED_BY(mu) = 0;
};

// One ReceiveSequence stream on the callback API: each message is produced when the previous
// one was written, so a peer that stops reading holds no thread (gRPC's deadline and even a
// cancellation cannot complete a write the transport cannot flush). Owned by the caller and by
// itself until OnDone.
class SendStream final : public grpc::ClientWriteReactor<v1::SequenceChunk>,
                         public std::enable_shared_from_this<SendStream> {
 public:
  // With `link_chunk_rows` > 0 the rows go over options.link: the header offers it and the
  // stream holds before its end until ReleaseEnd.
  SendStream(SequenceInTransit sequence, const SendOptions& options,
             std::vector<v1::CodedLayerImage> coded, std::vector<uint64_t> digests,
             std::shared_ptr<SendState> state, uint32_t link_chunk_rows)
      : sequence_(std::move(sequence)),
        coded_(std::move(coded)),
        digests_(std::move(digests)),
        state_(std::move(state)),
        linked_(link_chunk_rows > 0) {
    const uint64_t row_pair_bytes = 2 * sequence_.header.RowBytes();
    rows_per_chunk_ =
        static_cast<uint32_t>(std::max<uint64_t>(1, options.chunk_bytes / row_pair_bytes));
    v1::SequenceImageHeader* h = chunk_.mutable_header();
    SequenceImageHeaderToProto(sequence_.header, h);
    h->set_transfer_id(options.transfer_id);
    h->set_destination_session_token(options.destination_session_token);
    h->set_destination_sequence_id(options.destination_sequence_id);
    h->set_sender_boot_id(options.sender_boot_id);
    if (linked_) {
      const RowLinks::SenderLease& lease = *options.link;
      v1::RowLinkOffer* offer = h->mutable_row_link();
      offer->set_kind(lease.kind);
      offer->set_link_id(lease.link_id);
      if (lease.pending != nullptr) offer->set_offer(lease.pending->offer());
      offer->set_chunk_rows(link_chunk_rows);
    }
  }

  grpc::ClientContext* context() { return &context_; }

  void Start(const std::shared_ptr<grpc::Channel>& channel) {
    self_ = shared_from_this();
    stub_ = v1::Peer::NewStub(channel);
    stub_->async()->ReceiveSequence(&context_, &response_, this);
    Write();
    StartCall();
  }

  // The caller gave up: send nothing more, and cancel. (The context holds a reference on the
  // call, so cancelling one that ended meanwhile is harmless; not under the lock, since gRPC may
  // run reactions inline.)
  void Abandon() {
    {
      absl::MutexLock lock(&state_->mu);
      state_->abandoned = true;
    }
    context_.TryCancel();
  }

  // The link delivered the rows: the end may go (at once if the stream is holding for it).
  void ReleaseEnd() {
    {
      absl::MutexLock lock(&state_->mu);
      state_->end_released = true;
      if (!state_->holding || state_->done || state_->abandoned) return;
      state_->holding = false;
    }
    Continue();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return;  // the stream broke: OnDone says how
    {
      absl::MutexLock lock(&state_->mu);
      if (state_->abandoned) return;  // cancelled: OnDone follows
    }
    if (ended_) {
      StartWritesDone();
      return;
    }
    Continue();
  }

  void OnDone(const grpc::Status& status) override {
    {
      absl::MutexLock lock(&state_->mu);
      state_->done = true;
      state_->status = !read_error_.ok()
                           ? read_error_
                           : absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                                          status.error_message());
      state_->response = std::move(response_);
      state_->payload_bytes = payload_bytes_;
      state_->wire_bytes = wire_bytes_;
    }
    self_.reset();  // the caller may still hold it
  }

 private:
  // Writes the next chunk, unless the stream holds for the link.
  void Continue() {
    absl::StatusOr<bool> next = NextChunk();
    if (!next.ok()) {
      read_error_ = next.status();
      context_.TryCancel();  // the peer drops what it received
      return;
    }
    if (*next) Write();
  }

  void Write() {
    wire_bytes_ += chunk_.ByteSizeLong();
    StartWrite(&chunk_);
  }

  // The coded layers, then the rows after those written (none with a link), then the end.
  // False: nothing to write now (the stream holds until ReleaseEnd).
  absl::StatusOr<bool> NextChunk() {
    chunk_.Clear();
    if (next_coded_ < coded_.size()) {
      *chunk_.mutable_coded() = std::move(coded_[next_coded_++]);
      payload_bytes_ += CodedLayerPayloadBytes(chunk_.coded());
      return true;
    }
    const auto& layers = sequence_.header.layers;
    while (layer_ < layers.size() &&
           (linked_ || layers[layer_].coded || next_row_ >= layers[layer_].num_tokens)) {
      ++layer_;
      next_row_ = 0;
    }
    if (layer_ == layers.size()) {
      if (linked_) {
        absl::MutexLock lock(&state_->mu);
        if (!state_->end_released) {
          state_->holding = true;
          return false;
        }
      }
      chunk_.mutable_end()->mutable_layer_digests()->Add(digests_.begin(), digests_.end());
      ended_ = true;
      return true;
    }
    const uint32_t count = std::min(rows_per_chunk_, layers[layer_].num_tokens - next_row_);
    v1::SequenceRows* r = chunk_.mutable_rows();
    r->set_layer(layer_);
    r->set_first_row(next_row_);
    r->set_num_rows(count);
    RETURN_IF_ERROR(
        sequence_.ReadRows(layer_, next_row_, count, r->mutable_keys(), r->mutable_values()));
    payload_bytes_ += r->keys().size() + r->values().size();
    next_row_ += count;
    return true;
  }

  const SequenceInTransit sequence_;
  std::vector<v1::CodedLayerImage> coded_;  // sent first (moved out as they go)
  size_t next_coded_ = 0;
  const std::vector<uint64_t> digests_;
  const std::shared_ptr<SendState> state_;
  uint32_t rows_per_chunk_ = 1;
  std::unique_ptr<v1::Peer::Stub> stub_;
  grpc::ClientContext context_;
  v1::ReceiveSequenceResponse response_;
  v1::SequenceChunk chunk_;
  uint32_t layer_ = 0, next_row_ = 0;
  bool ended_ = false;
  const bool linked_;
  absl::Status read_error_;
  uint64_t payload_bytes_ = 0, wire_bytes_ = 0;
  std::shared_ptr<SendStream> self_;  // from Start to OnDone
};

}  // namespace

absl::StatusOr<SendResult> SendSequence(
    const std::shared_ptr<grpc::Channel>& channel,
    const std::function<void(grpc::ClientContext*)>& authenticate,
    const SequenceInTransit& sequence, const SendOptions& options) {
  // Digests and coded images first: a failure here sends nothing.
  const SequenceImageHeader& header = sequence.header;
  std::vector<uint64_t> digests;
  std::vector<v1::CodedLayerImage> coded;
  for (uint32_t l = 0; l < header.layers.size(); ++l) {
    if (!header.layers[l].coded) {
      ASSIGN_OR_RETURN(uint64_t digest, sequence.DigestRows(l));
      digests.push_back(digest);
      continue;
    }
    if (l >= sequence.coded.size() || sequence.coded[l] == nullptr) {
      return absl::InternalError(absl::StrCat("coded layer ", l, " has no coded form"));
    }
    RETURN_IF_ERROR(CodedLayerImageToProto(sequence.coded[l]->ToImage(), l, header.num_kv_heads,
                                           header.head_dim, header.dtype, &coded.emplace_back()));
    digests.push_back(CodedLayerDigest(coded.back()));
  }
  // The header (with a compressed sequence's kept positions) and each coded layer travel as one
  // message each: refuse what a peer would not receive rather than fail mid-stream.
  {
    v1::SequenceImageHeader h;
    SequenceImageHeaderToProto(header, &h);
    uint64_t largest = h.ByteSizeLong();
    for (const v1::CodedLayerImage& c : coded) {
      largest = std::max<uint64_t>(largest, c.ByteSizeLong());
    }
    if (largest > kMaxPeerMessageBytes - (uint64_t{64} << 10)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the sequence's header or a coded layer is ", largest,
                       " bytes, more than a peer receives in one message (", kMaxPeerMessageBytes,
                       "): a shorter sequence, or one compressed further, "
                       "travels"));
    }
  }
  const uint32_t link_chunk_rows =
      options.link != nullptr ? LinkChunkRows(header, options.link_chunk_bytes) : 0;
  auto state = std::make_shared<SendState>();
  auto stream = std::make_shared<SendStream>(sequence, options, std::move(coded), digests, state,
                                             link_chunk_rows);
  stream->context()->set_deadline(absl::ToChronoTime(options.deadline));
  authenticate(stream->context());
  stream->Start(channel);
  SendResult result;
  result.layer_digests = std::move(digests);
  const std::string late =
      "the peer did not take the sequence within the deadline; it keeps nothing of it";
  if (options.link != nullptr) {
    // The rows over the link while the stream waits before its end. The link's waits stop as
    // soon as the stream ends (the peer refused or failed: its status says why).
    RowLinks::SenderLease& lease = *options.link;
    const LinkWait wait{options.deadline, [state] {
                          absl::MutexLock lock(&state->mu);
                          return state->done || state->abandoned;
                        }};
    absl::Status sent = absl::OkStatus();
    if (lease.pending != nullptr) {
      absl::StatusOr<std::unique_ptr<RowLink>> link = lease.pending->Complete(wait);
      lease.pending.reset();
      if (link.ok()) {
        lease.link = *std::move(link);
      } else {
        sent = link.status();
      }
    }
    if (sent.ok()) {
      sent = SendRowsOverLink(sequence, *lease.link, link_chunk_rows, wait, &result.link_bytes);
    }
    if (!sent.ok()) {
      if (lease.link != nullptr) lease.link->Abort();
      result.link_bytes = 0;
      bool ended = false;
      {
        absl::MutexLock lock(&state->mu);
        ended = state->done;
      }
      // A stream that ended already says more: the peer's refusal or failure, or a replay (a
      // completed transfer_id: nothing was to be sent, and its answer stands).
      if (!ended) {
        stream->Abandon();
        return sent.code() == absl::StatusCode::kDeadlineExceeded
                   ? absl::DeadlineExceededError(late)
                   : absl::Status(sent.code(), absl::StrCat("the row link: ", sent.message()));
      }
    } else {
      stream->ReleaseEnd();
    }
  }
  // gRPC ends the stream at the deadline unless a peer that stopped reading wedged the
  // connection; then the stream is abandoned (cancelled, never sending its end) and the peer,
  // once it reads again, finds the stream cancelled and keeps nothing.
  bool done = false;
  {
    absl::MutexLock lock(&state->mu);
    done = state->mu.AwaitWithDeadline(absl::Condition(&state->done),
                                       options.deadline + absl::Milliseconds(200));
  }
  if (!done) {
    stream->Abandon();
    return absl::DeadlineExceededError(late);
  }
  absl::MutexLock lock(&state->mu);
  if (state->status.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::DeadlineExceededError(late);
  }
  if (!state->status.ok()) return state->status;
  const v1::ReceiveSequenceResponse& response = state->response;
  if (response.sequence_id() != options.destination_sequence_id ||
      !std::equal(response.layer_digests().begin(), response.layer_digests().end(),
                  result.layer_digests.begin(), result.layer_digests.end())) {
    return absl::DataLossError(
        absl::StrCat("the peer answered for sequence ", response.sequence_id(), " with ",
                     response.layer_digests_size(), " layer digests that are not those sent"));
  }
  result.destination_sequence_id = response.sequence_id();
  result.replayed = response.replayed();
  result.payload_bytes = state->payload_bytes + result.link_bytes;
  result.wire_bytes = state->wire_bytes;
  return result;
}

}  // namespace cachemgr
