#include "cachemgr/backend/host_backend.h"

#include <unistd.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/kv_store_digest.h"
#include "cachemgr/compress/scoring.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/kernels/kv_digest.h"
#include "cachemgr/util/status_macros.h"
#include "kernels/cpu/block_copy.h"
#include "kernels/cpu/token_rows.h"
#include "kernels/cpu/write_kv.h"

namespace cachemgr {
namespace {

class HostPoolMemory final : public PoolMemory {
 public:
  HostPoolMemory(kernels::KvLayerLayout layout, kernels::KvElemType type, MemfdRegion region,
                 std::vector<LayerPlacement> layers)
      : layout_(layout), type_(type), region_(std::move(region)), layers_(std::move(layers)) {
    RegionInfo info;
    info.bytes = region_.size();
    regions_.push_back(std::move(info));
  }

  const kernels::KvLayerLayout& layout() const override { return layout_; }
  const std::vector<RegionInfo>& regions() const override { return regions_; }
  const std::vector<LayerPlacement>& layers() const override { return layers_; }
  std::vector<int> ShareFds() const override { return {region_.fd()}; }

  absl::Status CopyBlocks(uint32_t layer, absl::Span<const kernels::BlockCopyPair> pairs) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    return kernels::CopyBlocksCpu(layout_, LayerBase(layer), pairs);
  }

  absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* keys,
                            float* values) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    return kernels::GatherTokensF32Cpu(layout_, type_, LayerBase(layer), slots, keys, values);
  }

  absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots, const float* keys,
                             const float* values) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    return kernels::ScatterTokensF32Cpu(layout_, type_, LayerBase(layer), slots, keys, values);
  }

  absl::Status PackRows(uint32_t layer, absl::Span<const int64_t> slots, std::byte* keys,
                        std::byte* values) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    // Every slot a row of the sequence (no padding), then reshape_and_cache's inverse.
    RETURN_IF_ERROR(kernels::ValidateTokenSlots(layout_, type_, slots));
    return kernels::ReadKvBySlotCpu(layout_, LayerBase(layer), keys, values, slots);
  }

  absl::Status UnpackRows(uint32_t layer, absl::Span<const int64_t> slots, const std::byte* keys,
                          const std::byte* values) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    // Every slot a row of the sequence (no padding), then vLLM's reshape_and_cache.
    RETURN_IF_ERROR(kernels::ValidateTokenSlots(layout_, type_, slots));
    return kernels::WriteKvBySlotCpu(layout_, LayerBase(layer), keys, values, slots);
  }

  absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> block_table,
                            uint32_t num_tokens, absl::Span<const uint32_t> kept,
                            uint32_t rows) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    return kernels::CompactHeadsCpu(layout_, LayerBase(layer), block_table, num_tokens, kept, rows);
  }

  absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots,
                                   uint32_t num_q_heads, const float* queries, uint32_t num_queries,
                                   float* sums) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    RETURN_IF_ERROR(
        ValidateScoringArgs(layout_, slots.size(), num_q_heads, queries, num_queries, sums));
    const size_t n = slots.size();
    std::vector<float> keys(n * layout_.num_kv_heads * layout_.head_dim);
    std::vector<float> values(keys.size());
    RETURN_IF_ERROR(kernels::GatherTokensF32Cpu(layout_, type_, LayerBase(layer), slots,
                                                keys.data(), values.data()));
    compress::ModelShape shape;
    shape.num_layers = 1;
    shape.num_q_heads = num_q_heads;
    shape.num_kv_heads = layout_.num_kv_heads;
    shape.head_dim = layout_.head_dim;
    std::vector<float> out;
    compress::AttentionColumnSums(shape, static_cast<uint32_t>(n), keys.data(), queries,
                                  num_queries, &out);
    std::copy(out.begin(), out.end(), sums);
    return absl::OkStatus();
  }

  absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                const compress::CodedRows& coded) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    RETURN_IF_ERROR(ValidateCodedRowsArgs(layout_, slots.size(), coded));
    RETURN_IF_ERROR(kernels::ValidateTokenSlots(layout_, type_, slots));
    std::vector<float> keys, values;
    compress::ReconstructCodedRows(coded, &keys, &values);
    return kernels::ScatterTokensF32Cpu(layout_, type_, LayerBase(layer), slots, keys.data(),
                                        values.data());
  }

  absl::StatusOr<uint64_t> DigestLayer(uint32_t layer, absl::Span<const uint32_t> block_table,
                                       uint32_t num_tokens, KvDigest kind) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    const uint64_t blocks_needed =
        (uint64_t{num_tokens} + layout_.block_size - 1) / layout_.block_size;
    if (block_table.size() < blocks_needed) {
      return absl::InvalidArgumentError("block table shorter than the token count");
    }
    for (uint32_t b : block_table) {
      if (b >= layout_.num_blocks) return absl::InvalidArgumentError("block id out of range");
    }
    return kind == KvDigest::kXxh3
               ? Xxh3LayerTokens(layout_, LayerBase(layer), block_table.data(), num_tokens)
               : kernels::DigestLayerTokens(layout_, LayerBase(layer), block_table.data(),
                                            num_tokens);
  }

 private:
  std::byte* LayerBase(uint32_t layer) const { return region_.data() + layers_[layer].offset; }

  kernels::KvLayerLayout layout_;
  kernels::KvElemType type_;
  MemfdRegion region_;
  std::vector<RegionInfo> regions_;
  std::vector<LayerPlacement> layers_;
};

uint64_t PageBytes() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

}  // namespace

absl::StatusOr<uint64_t> HostBackend::PoolBytes(const kernels::KvLayerLayout& layout,
                                                uint32_t num_layers) const {
  ASSIGN_OR_RETURN(const PoolPlan plan, PlanPool(layout, num_layers, PageBytes()));
  return plan.total_bytes;
}

absl::StatusOr<std::unique_ptr<PoolMemory>> HostBackend::CreatePool(
    const std::string& pool_id, const kernels::KvLayerLayout& layout, kernels::KvElemType type,
    uint32_t num_layers) {
  ASSIGN_OR_RETURN(const PoolPlan plan, PlanPool(layout, num_layers, PageBytes()));
  std::vector<LayerPlacement> layers(num_layers);
  // l * stride < total_bytes, which PlanPool checked.
  for (uint32_t l = 0; l < num_layers; ++l) layers[l] = {0, l * plan.stride, plan.layer_bytes};
  ASSIGN_OR_RETURN(MemfdRegion region,
                   MemfdRegion::Create(absl::StrCat("cachemgr-", pool_id), plan.total_bytes));
  return std::make_unique<HostPoolMemory>(layout, type, std::move(region), std::move(layers));
}

}  // namespace cachemgr
