#include "kernels/cpu/block_copy.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/layout_check.h"

namespace cachemgr::kernels {

absl::Status ValidateBlockCopyPairs(const KvLayerLayout& layout,
                                    absl::Span<const BlockCopyPair> pairs) {
  if (absl::Status s = CheckKvLayerLayout(layout); !s.ok()) return s;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const BlockCopyPair& p = pairs[i];
    if (p.src >= layout.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("copy pair ", i, ": src block ", p.src,
                                                     " >= num_blocks ", layout.num_blocks));
    }
    if (p.dst >= layout.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("copy pair ", i, ": dst block ", p.dst,
                                                     " >= num_blocks ", layout.num_blocks));
    }
    if (p.src == p.dst) {
      return absl::InvalidArgumentError(
          absl::StrCat("copy pair ", i, ": src and dst are both block ", p.src));
    }
  }
  // (dst block, pair index), sorted by block then index: duplicates are adjacent.
  std::vector<std::pair<uint32_t, size_t>> dsts;
  dsts.reserve(pairs.size());
  for (size_t i = 0; i < pairs.size(); ++i) dsts.emplace_back(pairs[i].dst, i);
  std::sort(dsts.begin(), dsts.end());
  for (size_t k = 1; k < dsts.size(); ++k) {
    if (dsts[k].first == dsts[k - 1].first) {
      return absl::InvalidArgumentError(absl::StrCat("copy pair ", dsts[k].second, ": dst block ",
                                                     dsts[k].first, " is also the dst of pair ",
                                                     dsts[k - 1].second));
    }
  }
  for (size_t i = 0; i < pairs.size(); ++i) {
    auto it = std::lower_bound(dsts.begin(), dsts.end(), std::make_pair(pairs[i].src, size_t{0}));
    if (it != dsts.end() && it->first == pairs[i].src) {
      return absl::InvalidArgumentError(absl::StrCat("copy pair ", it->second, ": dst block ",
                                                     it->first, " is also the src of pair ", i,
                                                     " (result would depend on copy order)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CopyBlocksCpu(const KvLayerLayout& layout, std::byte* layer_base,
                           absl::Span<const BlockCopyPair> pairs) {
  if (absl::Status s = ValidateBlockCopyPairs(layout, pairs); !s.ok()) return s;
  if (pairs.empty()) return absl::OkStatus();
  if (layer_base == nullptr) return absl::InvalidArgumentError("CopyBlocksCpu: layer_base is null");
  const size_t plane_bytes = layout.plane_block_bytes();
  for (const BlockCopyPair& p : pairs) {
    for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
      std::memcpy(layer_base + layout.block_offset(plane, p.dst),
                  layer_base + layout.block_offset(plane, p.src), plane_bytes);
    }
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::kernels
