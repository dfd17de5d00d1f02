#include "tools/engine/sidecar_cache.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <span>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/kernels/elem_convert.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr::engine {

SidecarCache::SidecarCache(std::vector<std::unique_ptr<client::Session>> sessions,
                           const LlamaConfig& config)
    : sessions_(std::move(sessions)),
      config_(config),
      layout_(sessions_[0]->pool().layout()),
      dtype_(sessions_[0]->model().dtype) {}

absl::StatusOr<std::unique_ptr<SidecarCache>> SidecarCache::Attach(const SidecarOptions& options,
                                                                   const LlamaConfig& config) {
  client::AttachOptions attach;
  attach.client_name = options.client_name;
  attach.model.name = options.model_name;
  attach.model.num_layers = config.num_layers;
  attach.model.num_q_heads = config.num_heads;
  attach.model.num_kv_heads = config.num_kv_heads;
  attach.model.head_dim = config.head_dim();
  attach.model.dtype = options.dtype;
  attach.model.block_size = options.block_size;
  attach.model.layout = options.layout;
  attach.model.rope.style = config.rope_style == RopeStyle::kInterleaved
                                ? client::RopeStyle::kInterleaved
                                : client::RopeStyle::kHalfSplit;
  attach.model.rope.theta = config.rope_theta;
  attach.num_blocks = options.num_blocks;
  attach.input_buffer_bytes = options.input_buffer_bytes;
  const uint32_t tp = std::max<uint32_t>(1, options.tensor_parallel);
  std::vector<std::unique_ptr<client::Session>> sessions;
  for (uint32_t rank = 0; rank < tp; ++rank) {
    if (tp > 1) {  // one group per engine process
      attach.client_name = absl::StrCat(options.client_name, "-rank", rank);
      attach.group_name = absl::StrCat(options.client_name, "-", getpid());
      attach.group_rank = rank;
      attach.group_size = tp;
    }
    ASSIGN_OR_RETURN(std::unique_ptr<client::Session> session,
                     client::Session::Attach(options.socket_path, attach));
    sessions.push_back(std::move(session));
  }
  return std::unique_ptr<SidecarCache>(new SidecarCache(std::move(sessions), config));
}

absl::StatusOr<AppendedRows> SidecarCache::Append(const std::string& seq, uint32_t n) {
  // A one-op Step: the reply lists only the layers that gained blocks or copies, and the slots
  // follow from the block tables kept here.
  const client::StepOp op = client::StepOp::Allocate(seq, n);
  ASSIGN_OR_RETURN(std::vector<client::StepResult> results, session().Step({&op, 1}));
  const client::StepResult& r = results.front();
  RETURN_IF_ERROR(r.status);
  Sequence& s = sequences_[seq];
  s.layers.resize(config_.num_layers);
  for (const client::LayerAllocation& la : r.layers) {
    if (la.layer >= config_.num_layers) {
      return absl::InternalError(absl::StrCat("Step answered for layer ", la.layer));
    }
    Layer& layer = s.layers[la.layer];
    for (const client::BlockCopy& copy : la.copies) {  // copy-on-write of a shared tail
      for (uint32_t& b : layer.blocks) {
        if (b == copy.src_block) b = copy.dst_block;
      }
    }
    layer.blocks.insert(layer.blocks.end(), la.new_block_ids.begin(), la.new_block_ids.end());
    if (la.num_tokens != layer.rows + n) {
      return absl::InternalError(absl::StrCat("layer ", la.layer, " holds ", la.num_tokens,
                                              " rows in the sidecar, ", layer.rows + n, " here"));
    }
  }
  const uint32_t bs = layout_.block_size;
  AppendedRows out;
  out.first_position = r.first_position;
  for (uint32_t l = 0; l < config_.num_layers; ++l) {
    Layer& layer = s.layers[l];
    if (uint64_t{layer.rows} + n > uint64_t{layer.blocks.size()} * bs) {
      return absl::InternalError(absl::StrCat("layer ", l, " has ", layer.blocks.size(),
                                              " blocks here for ", layer.rows + n, " rows"));
    }
    std::vector<int64_t> slots(n);
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t t = layer.rows + i;
      slots[i] = int64_t{layer.blocks[t / bs]} * bs + t % bs;
    }
    out.first_row.push_back(layer.rows);
    out.slots.push_back(std::move(slots));
    layer.rows += n;
  }
  s.positions = r.num_positions;
  return out;
}

void SidecarCache::Write(uint32_t layer, absl::Span<const int64_t> slots, const float* keys,
                         const float* values) {
  // Rank r holds heads [r * H / tp, (r + 1) * H / tp): a contiguous part of each row.
  const size_t part = size_t{layout_.num_kv_heads} * layout_.head_dim;
  const size_t row = part * sessions_.size();
  const bool bf16 = dtype_ == client::DType::kBf16;
  for (size_t r = 0; r < sessions_.size(); ++r) {
    const client::KvPoolView& pool = sessions_[r]->pool();
    for (size_t i = 0; i < slots.size(); ++i) {
      kernels::FromF32(keys + i * row + r * part, layout_.elem_bytes, bf16, part,
                       reinterpret_cast<std::byte*>(pool.key_at_slot<uint8_t>(layer, slots[i])));
      kernels::FromF32(values + i * row + r * part, layout_.elem_bytes, bf16, part,
                       reinterpret_cast<std::byte*>(pool.value_at_slot<uint8_t>(layer, slots[i])));
    }
  }
}

absl::Status SidecarCache::WriteInputs(const std::vector<float>& input, size_t outer_per_layer,
                                       size_t inner) {
  const size_t tp = sessions_.size();
  const size_t heads = config_.num_heads, part = heads / tp;
  const size_t outer = size_t{config_.num_layers} * outer_per_layer;
  for (size_t r = 0; r < tp; ++r) {
    std::span<float> buffer = sessions_[r]->input_buffer();
    if (input.size() / tp > buffer.size()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "Compress inputs of ", input.size() / tp * 4, " bytes per rank do not fit the ",
          buffer.size() * 4, "-byte input buffer (attach with a larger input_buffer_bytes)"));
    }
    for (size_t o = 0; o < outer; ++o) {
      std::memcpy(buffer.data() + o * part * inner, input.data() + (o * heads + r * part) * inner,
                  part * inner * sizeof(float));
    }
  }
  return absl::OkStatus();
}

uint32_t SidecarCache::Read(const std::string& seq, uint32_t layer, std::vector<float>* keys,
                            std::vector<float>* values) const {
  const Layer& l = sequences_.at(seq).layers[layer];
  const size_t part = size_t{layout_.num_kv_heads} * layout_.head_dim;
  const size_t row = part * sessions_.size();
  keys->resize(l.rows * row);
  values->resize(l.rows * row);
  const bool bf16 = dtype_ == client::DType::kBf16;
  const uint32_t bs = layout_.block_size;
  for (size_t rank = 0; rank < sessions_.size(); ++rank) {
    const client::KvPoolView& pool = sessions_[rank]->pool();
    for (uint32_t r = 0; r < l.rows; ++r) {
      const int64_t slot = int64_t{l.blocks[r / bs]} * bs + r % bs;
      kernels::ToF32(reinterpret_cast<const std::byte*>(pool.key_at_slot<uint8_t>(layer, slot)),
                     layout_.elem_bytes, bf16, part, keys->data() + r * row + rank * part);
      kernels::ToF32(reinterpret_cast<const std::byte*>(pool.value_at_slot<uint8_t>(layer, slot)),
                     layout_.elem_bytes, bf16, part, values->data() + r * row + rank * part);
    }
  }
  return l.rows;
}

uint32_t SidecarCache::rows(const std::string& seq, uint32_t layer) const {
  auto it = sequences_.find(seq);
  return it == sequences_.end() ? 0 : it->second.layers[layer].rows;
}

uint64_t SidecarCache::positions(const std::string& seq) const {
  auto it = sequences_.find(seq);
  return it == sequences_.end() ? 0 : it->second.positions;
}

uint64_t SidecarCache::ResidentBytes(const std::string& seq) const {
  uint64_t blocks = 0;
  for (const Layer& l : sequences_.at(seq).layers) blocks += l.blocks.size();
  return blocks * layout_.block_bytes() * sessions_.size();  // every rank's shard
}

absl::Status SidecarCache::Refresh(const std::string& seq) {
  ASSIGN_OR_RETURN(client::SequenceInfo info, session().GetSequence(seq));
  Sequence& s = sequences_[seq];
  s.layers.resize(config_.num_layers);
  s.positions = info.num_positions;
  for (uint32_t l = 0; l < config_.num_layers; ++l) {
    s.layers[l].blocks = info.layers[l].block_ids;
    s.layers[l].rows = info.layers[l].num_tokens;
  }
  return absl::OkStatus();
}

absl::Status SidecarCache::Fork(const std::string& parent, const std::string& child) {
  RETURN_IF_ERROR(session().Fork(parent, child).status());
  return Refresh(child);
}

absl::Status SidecarCache::Free(const std::string& seq) {
  RETURN_IF_ERROR(session().Free(seq).status());
  sequences_.erase(seq);
  return absl::OkStatus();
}

absl::StatusOr<client::CompressResult> SidecarCache::Compress(
    const std::string& seq, const client::CompressOptions& options) {
  ASSIGN_OR_RETURN(client::CompressResult r, session().Compress(seq, options));
  if (!r.pending) RETURN_IF_ERROR(Refresh(seq));
  return r;
}

absl::StatusOr<client::CompressResult> SidecarCache::FinishCompress(const std::string& seq,
                                                                    bool wait) {
  ASSIGN_OR_RETURN(client::CompressResult r, session().FinishCompress(seq, wait));
  if (!r.pending) RETURN_IF_ERROR(Refresh(seq));
  return r;
}

absl::StatusOr<std::vector<client::FetchedLayer>> SidecarCache::Fetch(const std::string& seq) {
  ASSIGN_OR_RETURN(std::vector<client::FetchedLayer> r, session().Fetch(seq));
  RETURN_IF_ERROR(Refresh(seq));
  return r;
}

absl::StatusOr<std::vector<client::ParkedLayer>> SidecarCache::Park(const std::string& seq) {
  ASSIGN_OR_RETURN(std::vector<client::ParkedLayer> r, session().Park(seq));
  RETURN_IF_ERROR(Refresh(seq));
  return r;
}

absl::Status SidecarCache::Adopt(const std::string& seq) { return Fetch(seq).status(); }

absl::Status SidecarCache::Recover(const absl::Status& why, absl::Duration timeout) {
  // Every rank's session comes back (a group's rank 0 owns the sequences; the others must be
  // attached again for their shards to be written).
  for (size_t rank = 1; rank < sessions_.size(); ++rank) {
    client::Session& s = *sessions_[rank];
    const absl::Time deadline = absl::Now() + timeout;
    while (!s.lease_ok() || !s.Heartbeat().ok()) {
      if (!s.lease_ok() && s.Reattach().ok()) break;
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "cachemgrd was not back within ", absl::FormatDuration(timeout), " for rank ", rank,
            " after ", why.ToString(), "; the session: ", s.status().ToString()));
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  }
  client::Session& s = session();
  const absl::StatusCode code = why.code();
  const bool transport = code == absl::StatusCode::kUnavailable ||
                         code == absl::StatusCode::kDeadlineExceeded ||
                         code == absl::StatusCode::kCancelled || code == absl::StatusCode::kAborted;
  // Another code is the sidecar's fault only if the session is gone (a heartbeat tells: a token
  // of an earlier boot, say, marks the session lost).
  if (!transport && s.lease_ok() && s.Heartbeat().ok()) return why;
  const uint64_t generation = s.generation();
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (!s.lease_ok()) {
      if (s.Reattach().ok()) break;
    } else if (s.Heartbeat().ok()) {
      break;  // the daemon answers in the same session
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("cachemgrd was not back within ", absl::FormatDuration(timeout), " after ",
                       why.ToString(), "; the session: ", s.status().ToString()));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  // What the session holds of our sequences may be half done: start clean.
  if (s.generation() == generation) {
    for (const auto& [seq, unused] : sequences_) (void)s.Free(seq);
  }
  sequences_.clear();
  layout_ = s.pool().layout();
  return absl::OkStatus();
}

}  // namespace cachemgr::engine
