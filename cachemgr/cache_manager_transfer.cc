// CacheManager's side of transfers between daemons (docs/MULTINODE.md): a sequence leaves with
// BeginExport / EndExport and arrives with BeginImport / CommitImport / AbortImport. The rows
// themselves are read and written outside the lock through SequenceInTransit, the sequence
// marked busy (export) or not yet visible (import) meanwhile.
//
// Sizes: a header's counts are checked against the receiving pool (rows <= the pool's tokens,
// KV heads and head_dim equal to the pool's), so every product below is one an existing pool's
// size check already bounded.
#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/kv_store_digest.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

using cache_manager_internal::CeilDiv;
using cache_manager_internal::CheckNotBusy;
using cache_manager_internal::CheckSequenceId;
using cache_manager_internal::RowSlots;
using cache_manager_internal::ShapeOf;

namespace {

constexpr char kExportBusy[] = "TransferSequence";
constexpr char kImportBusy[] = "ReceiveSequence";

absl::Status CheckRowRange(const SequenceInTransit& s, uint32_t layer, uint32_t first,
                           uint32_t count) {
  if (layer >= s.block_tables.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is out of range (", s.block_tables.size(), " layers)"));
  }
  if (s.header.layers[layer].coded) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " travels as a codebook, not as rows"));
  }
  const uint32_t rows = s.header.layers[layer].num_tokens;
  if (count == 0 || first > rows || count > rows - first) {
    return absl::InvalidArgumentError(absl::StrCat("rows [", first, ", ", uint64_t{first} + count,
                                                   ") of layer ", layer, " are not in [0, ", rows,
                                                   ")"));
  }
  return absl::OkStatus();
}

}  // namespace

uint64_t SequenceImageHeader::PayloadBytes() const {
  uint64_t rows = 0;
  for (const SequenceImageLayer& l : layers) rows += l.coded ? 0 : l.num_tokens;
  return 2 * rows * RowBytes();
}

absl::Status SequenceInTransit::ReadRows(uint32_t layer, uint32_t first, uint32_t count,
                                         std::string* keys, std::string* values) const {
  RETURN_IF_ERROR(CheckRowRange(*this, layer, first, count));
  const std::vector<int64_t> slots =
      RowSlots(block_tables[layer], first, first + count, block_size);
  // The rows as stored: the header's dtype is the pool's.
  const uint64_t bytes = uint64_t{count} * header.RowBytes();
  keys->resize(bytes);
  values->resize(bytes);
  return memory->PackRows(layer, slots, reinterpret_cast<std::byte*>(keys->data()),
                          reinterpret_cast<std::byte*>(values->data()));
}

absl::Status SequenceInTransit::WriteRows(uint32_t layer, uint32_t first, uint32_t count,
                                          absl::string_view keys, absl::string_view values) const {
  RETURN_IF_ERROR(CheckRowRange(*this, layer, first, count));
  const uint64_t bytes = uint64_t{count} * header.RowBytes();
  if (keys.size() != bytes || values.size() != bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows of layer ", layer, " carry ", keys.size(), " key and ", values.size(),
                     " value bytes; ", count, " rows of ", header.num_kv_heads, " heads x ",
                     header.head_dim, " ", DTypeName(header.dtype), " are ", bytes, " each"));
  }
  return memory->UnpackRows(layer, RowSlots(block_tables[layer], first, first + count, block_size),
                            reinterpret_cast<const std::byte*>(keys.data()),
                            reinterpret_cast<const std::byte*>(values.data()));
}

absl::Status SequenceInTransit::ReadRowsInto(uint32_t layer, uint32_t first, uint32_t count,
                                             std::byte* keys, std::byte* values,
                                             bool on_device) const {
  RETURN_IF_ERROR(CheckRowRange(*this, layer, first, count));
  const std::vector<int64_t> slots =
      RowSlots(block_tables[layer], first, first + count, block_size);
  return on_device ? memory->PackRowsOnDevice(layer, slots, keys, values)
                   : memory->PackRows(layer, slots, keys, values);
}

absl::Status SequenceInTransit::WriteRowsFrom(uint32_t layer, uint32_t first, uint32_t count,
                                              const std::byte* keys, const std::byte* values,
                                              bool on_device) const {
  RETURN_IF_ERROR(CheckRowRange(*this, layer, first, count));
  const std::vector<int64_t> slots =
      RowSlots(block_tables[layer], first, first + count, block_size);
  return on_device ? memory->UnpackRowsOnDevice(layer, slots, keys, values)
                   : memory->UnpackRows(layer, slots, keys, values);
}

absl::StatusOr<uint64_t> SequenceInTransit::DigestRows(uint32_t layer) const {
  if (layer >= block_tables.size() || header.layers[layer].coded) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " has no rows to digest (out of range, or coded)"));
  }
  return memory->DigestLayer(layer, block_tables[layer], header.layers[layer].num_tokens,
                             KvDigest::kXxh3);
}

absl::StatusOr<SequenceInTransit> CacheManager::BeginExport(const Caller& caller,
                                                            const std::string& sequence_id) {
  absl::MutexLock lock(&mu_);
  if (!caller.has_session()) {
    return absl::InvalidArgumentError("session_token must name the session of the sequence");
  }
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  ASSIGN_OR_RETURN(Sequence * seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
  RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
  const Pool& pool = *client->pool;
  SequenceInTransit out;
  out.sequence_id = sequence_id;
  out.serial = seq->serial;
  out.memory = pool.memory;
  out.block_size = pool.model.block_size;
  out.shape = ShapeOf(pool.model);
  out.coded.resize(pool.model.num_layers);
  SequenceImageHeader& h = out.header;
  h.num_layers = pool.model.num_layers;
  h.num_kv_heads = pool.model.num_kv_heads;
  h.head_dim = pool.model.head_dim;
  h.dtype = pool.model.dtype;
  h.num_positions = seq->num_positions;
  if (seq->compression != nullptr) {
    h.compressed = true;
    h.compression_policy = seq->compression->policy_name;
    h.compressed_tokens = seq->compression->num_tokens;
  }
  for (uint32_t l = 0; l < seq->layers.size(); ++l) {
    SequenceImageLayer layer;
    layer.num_tokens = seq->layers[l].num_tokens;
    if (seq->compression != nullptr) {
      const Compression::Layer& cl = seq->compression->layers[l];
      if (cl.coded != nullptr) {
        if (!seq->layers[l].parked) {
          return absl::FailedPreconditionError(
              absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " has codebook layer ", l,
                           " fetched: Park it before a transfer (it travels coded)"));
        }
        layer.coded = true;
        out.coded[l] = cl.coded;
      }
      layer.compressed_rows = cl.rows;
      layer.compressed_positions = cl.positions;
    }
    h.layers.push_back(std::move(layer));
    out.block_tables.push_back(seq->layers[l].blocks);
  }
  seq->busy = kExportBusy;
  return out;
}

uint64_t CacheManager::EndExport(const SequenceInTransit& exported, bool release) {
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(exported.sequence_id, exported.serial);
  if (seq == nullptr) return 0;  // freed meanwhile
  seq->busy = nullptr;
  if (!release) return 0;
  Client* owner = seq->owner;
  const uint64_t released = ReleaseSequenceLocked(*seq, std::nullopt);
  std::erase(owner->sequences, exported.sequence_id);
  PublishLocked(EventType::kSequenceFreed, owner->client_id, exported.sequence_id,
                owner->pool->pool_id, absl::StrCat("blocks_released=", released, " moved=1"));
  sequences_.erase(exported.sequence_id);
  return released;
}

absl::StatusOr<SequenceInTransit> CacheManager::BeginImport(const Caller& caller,
                                                            const std::string& sequence_id,
                                                            const SequenceImageHeader& header) {
  absl::MutexLock lock(&mu_);
  if (!caller.has_session()) {
    return absl::InvalidArgumentError("destination_session_token must not be empty");
  }
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "destination_sequence_id"));
  Pool& pool = *client->pool;
  const ModelSpec& model = pool.model;
  if (header.num_layers != model.num_layers || header.num_kv_heads != model.num_kv_heads ||
      header.head_dim != model.head_dim || header.dtype != model.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "header: the sequence has ", header.num_layers, " layers of ", header.num_kv_heads,
        " KV heads x ", header.head_dim, " ", DTypeName(header.dtype),
        "; the destination's pool (model ", QuoteForMessage(model.name), ") has ", model.num_layers,
        " of ", model.num_kv_heads, " x ", model.head_dim, " ", DTypeName(model.dtype)));
  }
  if (header.layers.size() != model.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("header.layers holds ", header.layers.size(),
                                                   " layers, the model ", model.num_layers));
  }
  const uint32_t bs = model.block_size;
  const uint64_t capacity = uint64_t{pool.num_blocks} * bs;
  const uint32_t hkv = model.num_kv_heads;
  for (uint32_t l = 0; l < model.num_layers; ++l) {
    const SequenceImageLayer& layer = header.layers[l];
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("header.layers[", l, "]: ", what));
    };
    if (layer.num_tokens > capacity) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "header.layers[", l, "] holds ", layer.num_tokens, " rows, more than the whole pool (",
          pool.num_blocks, " blocks of ", bs, " tokens)"));
    }
    if (layer.num_tokens > header.num_positions) {
      return bad(absl::StrCat(layer.num_tokens, " rows for ", header.num_positions, " positions"));
    }
    if (layer.coded && !header.compressed) {
      return bad("only a compressed sequence has coded layers");
    }
    if (!header.compressed) {
      if (layer.num_tokens != header.num_positions || layer.compressed_rows != 0 ||
          !layer.compressed_positions.empty()) {
        return bad(absl::StrCat("an uncompressed sequence holds one row per position (",
                                header.num_positions, ") and no compressed rows"));
      }
      continue;
    }
    if (layer.compressed_rows > layer.num_tokens ||
        header.compressed_tokens > header.num_positions ||
        layer.num_tokens - layer.compressed_rows !=
            header.num_positions - header.compressed_tokens) {
      return bad(absl::StrCat("compressed_rows ", layer.compressed_rows, " of ", layer.num_tokens,
                              " rows do not leave one row per position appended since Compress (",
                              header.num_positions, " positions, ", header.compressed_tokens,
                              " when compressed)"));
    }
    if (layer.compressed_positions.size() != uint64_t{hkv} * layer.compressed_rows) {
      return bad(absl::StrCat("compressed_positions holds ", layer.compressed_positions.size(),
                              " positions, not ", hkv, " heads x ", layer.compressed_rows));
    }
    for (uint32_t h = 0; h < hkv; ++h) {
      for (uint32_t r = 0; r < layer.compressed_rows; ++r) {
        const uint32_t p = layer.compressed_positions[size_t{h} * layer.compressed_rows + r];
        const bool ascending =
            r == 0 || p > layer.compressed_positions[size_t{h} * layer.compressed_rows + r - 1];
        if (p >= header.compressed_tokens || !ascending) {
          return bad(absl::StrCat("compressed_positions of head ", h,
                                  " must ascend strictly below ", header.compressed_tokens));
        }
      }
    }
  }
  if (sequences_.contains(sequence_id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("destination_sequence_id ", QuoteForMessage(sequence_id), " already exists"));
  }
  std::vector<uint32_t> needed(model.num_layers);
  for (uint32_t l = 0; l < model.num_layers; ++l)
    needed[l] = header.layers[l].coded ? 0 : CeilDiv(header.layers[l].num_tokens, bs);
  const uint64_t charge = SequenceChargeBytes(sequence_id, model.num_layers, 0);
  RETURN_IF_ERROR(
      ChargeLocked(charge, absl::StrCat("destination_sequence_id ", QuoteForMessage(sequence_id))));
  MakeRoomLocked(pool, needed);
  for (uint32_t l = 0; l < model.num_layers; ++l) {
    if (needed[l] > pool.allocators[l].num_free()) {
      memory_used_bytes_ -= charge;
      return absl::ResourceExhaustedError(absl::StrCat(
          "layer ", l, " needs ", needed[l], " blocks for ", header.layers[l].num_tokens,
          " rows but ", pool.allocators[l].num_free(), " of ", pool.num_blocks, " are free"));
    }
  }
  auto seq = std::make_unique<Sequence>();
  seq->charge = charge;
  seq->serial = next_sequence_serial_++;
  seq->sequence_id = sequence_id;
  seq->owner = client;
  seq->num_positions = header.num_positions;
  seq->layers.resize(model.num_layers);
  seq->busy = kImportBusy;
  SequenceInTransit out;
  out.sequence_id = sequence_id;
  out.serial = seq->serial;
  out.header = header;
  out.memory = pool.memory;
  out.block_size = bs;
  out.shape = ShapeOf(model);
  for (uint32_t l = 0; l < model.num_layers; ++l) {
    seq->layers[l].blocks = pool.allocators[l].Allocate(needed[l]).value();  // checked above
    seq->layers[l].num_tokens = header.layers[l].num_tokens;
    seq->layers[l].parked = header.layers[l].coded;
    out.block_tables.push_back(seq->layers[l].blocks);
  }
  client->sequences.push_back(sequence_id);
  sequences_.emplace(sequence_id, std::move(seq));
  return out;
}

absl::StatusOr<SequenceSnapshot> CacheManager::CommitImport(
    const SequenceInTransit& imported,
    const std::vector<std::shared_ptr<const compress::CodedLayer>>& coded) {
  const SequenceImageHeader& header = imported.header;
  for (uint32_t l = 0; l < header.layers.size(); ++l) {
    const compress::CodedLayer* layer = l < coded.size() ? coded[l].get() : nullptr;
    if (header.layers[l].coded != (layer != nullptr) ||
        (layer != nullptr && (layer->rows() != header.layers[l].num_tokens ||
                              layer->num_kv_heads() != header.num_kv_heads))) {
      return absl::InvalidArgumentError(absl::StrCat("coded layer ", l,
                                                     header.layers[l].coded
                                                         ? " is missing or has other rows than "
                                                           "the header's"
                                                         : " was not announced by the header"));
    }
  }
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(imported.sequence_id, imported.serial);
  if (seq == nullptr) {
    return absl::AbortedError(absl::StrCat("destination_sequence_id ",
                                           QuoteForMessage(imported.sequence_id),
                                           " was freed while it was received"));
  }
  const SequenceImageHeader& h = imported.header;
  if (h.compressed) {
    auto compression = std::make_shared<Compression>();
    compression->policy_name = h.compression_policy;
    compression->policy.name = h.compression_policy;
    compression->num_tokens = h.compressed_tokens;
    compression->layers.resize(h.layers.size());
    for (uint32_t l = 0; l < h.layers.size(); ++l) {
      compression->layers[l].rows = h.layers[l].compressed_rows;
      compression->layers[l].positions = h.layers[l].compressed_positions;
      if (l < coded.size()) compression->layers[l].coded = coded[l];
    }
    seq->compression = std::move(compression);
  }
  seq->busy = nullptr;
  uint64_t blocks = 0;
  for (const auto& t : seq->layers) blocks += t.blocks.size();
  PublishLocked(EventType::kSequenceAllocated, seq->owner->client_id, seq->sequence_id,
                seq->owner->pool->pool_id,
                absl::StrCat("received positions=", seq->num_positions, " blocks=", blocks));
  return SnapshotLocked(*seq);
}

uint64_t CacheManager::AbortImport(const SequenceInTransit& imported) {
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindSerialLocked(imported.sequence_id, imported.serial);
  if (seq == nullptr) return 0;
  Client* owner = seq->owner;
  const uint64_t released = ReleaseSequenceLocked(*seq, std::nullopt);
  std::erase(owner->sequences, imported.sequence_id);
  sequences_.erase(imported.sequence_id);
  return released;
}

}  // namespace cachemgr
