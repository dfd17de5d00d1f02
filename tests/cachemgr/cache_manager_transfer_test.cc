// CacheManager's side of transfers between daemons: BeginExport / EndExport on the sender,
// BeginImport / CommitImport / AbortImport on the receiver, rows copied through
// SequenceInTransit. Two managers on the host backend stand for two daemons.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/service/coded_layer_wire.h"
#include "tests/cachemgr/compress_fixture.h"

namespace cachemgr {
namespace {

// Copies every row of `from` into `to`, `chunk` rows per message; returns the sender's digests.
std::vector<uint64_t> CopyRows(const SequenceInTransit& from, const SequenceInTransit& to,
                               uint32_t chunk) {
  std::vector<uint64_t> digests;
  for (uint32_t l = 0; l < from.header.layers.size(); ++l) {
    const uint32_t rows = from.header.layers[l].num_tokens;
    for (uint32_t first = 0; first < rows; first += chunk) {
      const uint32_t count = std::min(chunk, rows - first);
      std::string k, v;
      REQUIRE(from.ReadRows(l, first, count, &k, &v).ok());
      CHECK(k.size() == count * from.header.RowBytes());
      REQUIRE(to.WriteRows(l, first, count, k, v).ok());
    }
    digests.push_back(*from.DigestRows(l));
  }
  return digests;
}

std::vector<uint64_t> Fnv(CacheManager& m, const std::string& token, const std::string& id) {
  auto snap = m.GetSequence(token, id, /*include_kv_digest=*/true);
  REQUIRE(snap.ok());
  std::vector<uint64_t> out;
  for (const auto& l : snap->layers) out.push_back(l.kv_digest.value());
  return out;
}

TEST_CASE("A transferred sequence holds the sender's rows in the receiver's own blocks", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 3);
  receiver.Fill("other", 4);  // the receiver's blocks are not the sender's
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  CHECK(out->header.num_positions == kTokens);
  CHECK(out->header.PayloadBytes() == 2ull * kLayers * kTokens * kKvHeads * kDim * 4);
  // Busy while it travels: every change but Free is refused.
  auto busy = sender.manager.Allocate(sender.a.session_token, "s", 1);
  CHECK(busy.status().code() == absl::StatusCode::kAborted);
  CHECK(sender.manager.BeginExport(sender.a.session_token, "s").status().code() ==
        absl::StatusCode::kAborted);

  auto in = receiver.manager.BeginImport(receiver.a.session_token, "t", out->header);
  REQUIRE(in.ok());
  // Visible as busy until committed.
  CHECK(receiver.manager.GetSequence(receiver.a.session_token, "t", false)->busy ==
        "ReceiveSequence");
  const std::vector<uint64_t> digests = CopyRows(*out, *in, 7);
  for (uint32_t l = 0; l < kLayers; ++l) CHECK(*in->DigestRows(l) == digests[l]);
  auto committed = receiver.manager.CommitImport(*in);
  REQUIRE(committed.ok());
  CHECK(committed->num_positions == kTokens);
  CHECK(committed->busy.empty());
  CHECK_FALSE(committed->compressed);
  CHECK(sender.manager.EndExport(*out, /*release=*/false) == 0);
  CHECK(Fnv(sender.manager, sender.a.session_token, "s") ==
        Fnv(receiver.manager, receiver.a.session_token, "t"));
  REQUIRE(sender.manager.CheckInvariants().ok());
  REQUIRE(receiver.manager.CheckInvariants().ok());
  // A copy: the source is there and usable again; the copy grows on its own.
  CHECK(sender.manager.Allocate(sender.a.session_token, "s", 1).ok());
  CHECK(receiver.manager.Allocate(receiver.a.session_token, "t", 5).ok());
  REQUIRE(receiver.manager.CheckInvariants().ok());
}

TEST_CASE("A move releases the source only at EndExport(release)", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 5);
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  auto in = receiver.manager.BeginImport(receiver.a.session_token, "s", out->header);
  REQUIRE(in.ok());
  CopyRows(*out, *in, 1000);
  REQUIRE(receiver.manager.CommitImport(*in).ok());
  CHECK(sender.UsedBlocks() == kLayers * kTokens / kBlock);
  CHECK(sender.manager.EndExport(*out, /*release=*/true) == kLayers * kTokens / kBlock);
  CHECK(sender.UsedBlocks() == 0);
  CHECK(sender.manager.GetSequence(sender.a.session_token, "s", false).status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(sender.manager.Stats().sequence_bytes == 0);
  REQUIRE(sender.manager.CheckInvariants().ok());
  CHECK(receiver.UsedBlocks() == kLayers * kTokens / kBlock);
}

TEST_CASE("A compressed sequence travels with its kept positions", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 6);
  auto r = sender.manager.Compress(sender.a.session_token, "s", Params("snapkv"));
  REQUIRE(r.ok());
  // Rows appended after Compress travel too (one position each).
  REQUIRE(sender.manager.Allocate(sender.a.session_token, "s", 3).ok());
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  CHECK(out->header.compressed);
  CHECK(out->header.compression_policy == "snapkv");
  CHECK(out->header.compressed_tokens == kTokens);
  auto in = receiver.manager.BeginImport(receiver.a.session_token, "t", out->header);
  REQUIRE(in.ok());
  CopyRows(*out, *in, 5);
  auto committed = receiver.manager.CommitImport(*in);
  REQUIRE(committed.ok());
  sender.manager.EndExport(*out, false);
  CHECK(committed->compressed);
  CHECK(committed->compression_policy == "snapkv");
  auto sent = sender.manager.GetSequence(sender.a.session_token, "s", false);
  CHECK(committed->kept_per_layer == sent->kept_per_layer);
  CHECK(Fnv(sender.manager, sender.a.session_token, "s") ==
        Fnv(receiver.manager, receiver.a.session_token, "t"));
  // Fetch reports the same position for every row on both sides.
  auto fs = sender.manager.Fetch(sender.a.session_token, "s", {});
  auto fr = receiver.manager.Fetch(receiver.a.session_token, "t", {});
  REQUIRE(fs.ok());
  REQUIRE(fr.ok());
  for (uint32_t l = 0; l < kLayers; ++l) CHECK((*fr)[l].positions == (*fs)[l].positions);
  // Compressed once, on either side.
  CHECK(
      receiver.manager.Compress(receiver.a.session_token, "t", Params("snapkv")).status().code() ==
      absl::StatusCode::kFailedPrecondition);
  REQUIRE(receiver.manager.CheckInvariants().ok());
}

TEST_CASE("Parked codebook layers travel coded and reconstruct to the same rows", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 7);
  REQUIRE(sender.manager.Compress(sender.a.session_token, "s", Params("codebook", 0.5)).ok());
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  auto in = receiver.manager.BeginImport(receiver.a.session_token, "t", out->header);
  REQUIRE(in.ok());
  std::vector<std::shared_ptr<const compress::CodedLayer>> coded(kLayers);
  uint32_t coded_layers = 0;
  uint64_t arena_bytes = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    if (!out->header.layers[l].coded) {
      std::string k, v;
      REQUIRE(out->ReadRows(l, 0, out->header.layers[l].num_tokens, &k, &v).ok());
      REQUIRE(in->WriteRows(l, 0, out->header.layers[l].num_tokens, k, v).ok());
      continue;
    }
    ++coded_layers;
    REQUIRE(out->coded[l] != nullptr);
    // A coded layer has no rows to read: it travels as its image.
    std::string k, v;
    CHECK(out->ReadRows(l, 0, 1, &k, &v).code() == absl::StatusCode::kInvalidArgument);
    v1::CodedLayerImage wire;
    REQUIRE(CodedLayerImageToProto(out->coded[l]->ToImage(), l, kKvHeads, kDim, DType::kFp32, &wire)
                .ok());
    CHECK(CodedLayerPayloadBytes(wire) == out->coded[l]->bytes());
    arena_bytes += out->coded[l]->bytes();
    auto image = CodedLayerImageFromProto(wire, kKvHeads, kDim, DType::kFp32);
    REQUIRE(image.ok());
    auto layer = compress::CodedLayer::FromImage(in->shape, *std::move(image));
    REQUIRE(layer.ok());
    coded[l] = std::make_shared<const compress::CodedLayer>(*std::move(layer));
  }
  REQUIRE(coded_layers > 0);
  // The receiver allocated no blocks for coded layers: they arrive parked.
  CHECK(receiver.UsedBlocks() == sender.UsedBlocks());
  // A coded layer missing at commit is refused (and the import stays until aborted).
  CHECK(receiver.manager.CommitImport(*in).status().code() == absl::StatusCode::kInvalidArgument);
  auto committed = receiver.manager.CommitImport(*in, coded);
  REQUIRE(committed.ok());
  sender.manager.EndExport(*out, false);
  uint64_t received_arena = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK(committed->layers[l].parked == out->header.layers[l].coded);
    received_arena += committed->layers[l].arena_bytes;
  }
  CHECK(received_arena == arena_bytes);
  REQUIRE(receiver.manager.CheckInvariants().ok());
  // Fetched on both sides, every layer holds the same rows.
  auto fs = sender.manager.Fetch(sender.a.session_token, "s", {});
  auto fr = receiver.manager.Fetch(receiver.a.session_token, "t", {});
  REQUIRE(fs.ok());
  REQUIRE(fr.ok());
  CHECK(Fnv(sender.manager, sender.a.session_token, "s") ==
        Fnv(receiver.manager, receiver.a.session_token, "t"));
  for (uint32_t l = 0; l < kLayers; ++l) CHECK((*fr)[l].positions == (*fs)[l].positions);
  // A fetched codebook layer does not travel: Park it first.
  auto fetched = sender.manager.BeginExport(sender.a.session_token, "s");
  CHECK(fetched.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(absl::StrContains(fetched.status().message(), "Park"));
  CHECK(sender.manager.GetSequence(sender.a.session_token, "s", false)->busy.empty());
  REQUIRE(sender.manager.Park(sender.a.session_token, "s", {}).ok());
  CHECK(sender.manager.BeginExport(sender.a.session_token, "s").ok());
}

TEST_CASE("Free during an export or an import wins; nothing leaks", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 8);
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  auto in = receiver.manager.BeginImport(receiver.a.session_token, "t", out->header);
  REQUIRE(in.ok());
  CHECK(receiver.UsedBlocks() == kLayers * kTokens / kBlock);
  REQUIRE(sender.manager.Free(sender.a.session_token, "s").ok());
  CHECK(sender.manager.EndExport(*out, true) == 0);  // already gone
  REQUIRE(receiver.manager.Free(receiver.a.session_token, "t").ok());
  CHECK(receiver.manager.CommitImport(*in).status().code() == absl::StatusCode::kAborted);
  CHECK(receiver.manager.AbortImport(*in) == 0);
  CHECK(sender.UsedBlocks() == 0);
  CHECK(receiver.UsedBlocks() == 0);
  REQUIRE(sender.manager.CheckInvariants().ok());
  REQUIRE(receiver.manager.CheckInvariants().ok());
}

TEST_CASE("AbortImport gives back every block and the sequence's charge", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 9);
  const uint64_t used_before = receiver.manager.Stats().memory_used_bytes;
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  auto in = receiver.manager.BeginImport(receiver.a.session_token, "t", out->header);
  REQUIRE(in.ok());
  std::string k, v;
  REQUIRE(out->ReadRows(0, 0, 4, &k, &v).ok());
  REQUIRE(in->WriteRows(0, 0, 4, k, v).ok());
  // Rows of the wrong size or range are refused and write nothing.
  CHECK(in->WriteRows(0, 4, 4, k.substr(1), v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(in->WriteRows(0, kTokens - 2, 4, k, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(in->WriteRows(kLayers, 0, 4, k, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(receiver.manager.AbortImport(*in) == kLayers * kTokens / kBlock);
  CHECK(receiver.UsedBlocks() == 0);
  CHECK(receiver.manager.Stats().memory_used_bytes == used_before);
  CHECK(receiver.manager.GetSequence(receiver.a.session_token, "t", false).status().code() ==
        absl::StatusCode::kNotFound);
  sender.manager.EndExport(*out, false);
  REQUIRE(receiver.manager.CheckInvariants().ok());
}

TEST_CASE("BeginImport refuses a header that does not fit, naming the field, changing nothing",
          "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 10);
  receiver.Fill("taken", 11);
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  const uint64_t used = receiver.UsedBlocks();
  const uint64_t bytes = receiver.manager.Stats().memory_used_bytes;
  auto refused = [&](SequenceImageHeader h, absl::StatusCode code, const std::string& words,
                     const std::string& id = "t") {
    auto r = receiver.manager.BeginImport(receiver.a.session_token, id, h);
    INFO(r.status());
    CHECK(r.status().code() == code);
    CHECK(absl::StrContains(r.status().message(), words));
    CHECK(receiver.UsedBlocks() == used);
    CHECK(receiver.manager.Stats().memory_used_bytes == bytes);
  };
  SequenceImageHeader h = out->header;
  h.head_dim = kDim * 2;
  refused(h, absl::StatusCode::kInvalidArgument, "header");
  h = out->header;
  h.dtype = DType::kBf16;
  refused(h, absl::StatusCode::kInvalidArgument, "bf16");
  h = out->header;
  h.layers.pop_back();
  refused(h, absl::StatusCode::kInvalidArgument, "header.layers");
  h = out->header;
  h.layers[1].num_tokens = kTokens - 1;  // uncompressed: one row per position everywhere
  refused(h, absl::StatusCode::kInvalidArgument, "header.layers[1]");
  h = out->header;
  for (auto& l : h.layers) l.num_tokens = 64 * kBlock + 1;
  h.num_positions = 64 * kBlock + 1;
  refused(h, absl::StatusCode::kResourceExhausted, "whole pool");
  h = out->header;
  for (auto& l : h.layers) l.num_tokens = 60 * kBlock;  // fits the pool, not what is free
  h.num_positions = 60 * kBlock;
  refused(h, absl::StatusCode::kResourceExhausted, "are free");
  h = out->header;
  h.compressed = true;
  h.compressed_tokens = kTokens;
  for (auto& l : h.layers) {
    l.num_tokens = l.compressed_rows = 2;
    l.compressed_positions = {1, 2, 3, 4};
  }
  h.layers[0].compressed_positions = {5, 3, 1, 2};  // head 0 not ascending
  refused(h, absl::StatusCode::kInvalidArgument, "ascend");
  refused(out->header, absl::StatusCode::kAlreadyExists, "already exists", "taken");
  refused(out->header, absl::StatusCode::kInvalidArgument, "destination_sequence_id", "");
  sender.manager.EndExport(*out, false);
  REQUIRE(receiver.manager.CheckInvariants().ok());
}

TEST_CASE("A peer daemon's import names the session by its token alone", "[cpu]") {
  Fixture sender, receiver;
  sender.Fill("s", 12);
  auto out = sender.manager.BeginExport(sender.a.session_token, "s");
  REQUIRE(out.ok());
  // The receiving session was attached in process (no uid); a local caller of another uid
  // presenting its token is refused, a peer daemon delivering to it is not.
  Caller stolen(receiver.a.session_token);
  stolen.peer = PeerCredentials{1, 4242, 4242};
  CHECK(receiver.manager.BeginImport(stolen, "t", out->header).status().code() ==
        absl::StatusCode::kPermissionDenied);
  Caller peer(receiver.a.session_token);
  peer.peer = stolen.peer;
  peer.peer_daemon = true;
  auto in = receiver.manager.BeginImport(peer, "t", out->header);
  REQUIRE(in.ok());
  receiver.manager.AbortImport(*in);
  CHECK(receiver.manager.BeginImport(Caller("nope"), "t", out->header).status().code() ==
        absl::StatusCode::kNotFound);
  sender.manager.EndExport(*out, false);
}

}  // namespace
}  // namespace cachemgr
