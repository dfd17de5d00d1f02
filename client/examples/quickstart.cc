// cachemgr_quickstart: the README's walk through the daemon's main job.
//
//   cachemgr_quickstart --socket /run/cachemgr/cachemgr.sock
//
// Attaches as "quickstart" with a small Llama-like model, allocates a 40-token prompt, writes
// its K/V straight into the mapped pool, appends 3 decode tokens (filling the partial block),
// forks the sequence and appends to the fork (copy on write), then checks per layer that the
// daemon's digest of the KV bytes matches the digest computed here. Prints occupancy before and
// after freeing, frees everything and detaches. Exits non-zero on any error or mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/client/client.h"
#include "cachemgr/kernels/kv_digest.h"
#include "cachemgr/kernels/kv_layout.h"
#include "cachemgr/util/status_macros.h"

namespace {

using cachemgr::client::Allocation;
using cachemgr::client::KvPoolView;
using cachemgr::client::LayerAllocation;
using cachemgr::client::Session;
using cachemgr::kernels::KvLayerLayout;
using cachemgr::kernels::KvPlane;

constexpr char kParent[] = "prompt-0";
constexpr char kChild[] = "prompt-0/beam-1";
constexpr uint32_t kPromptTokens = 40;
constexpr uint32_t kDecodeTokens = 3;

// IEEE half from float (round to nearest even; tiny values flush to zero). Enough for the
// demo's values in [-1, 1].
uint16_t FloatToHalf(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const int exp = static_cast<int>((x >> 23) & 0xffu) - 127 + 15;
  const uint32_t mant = x & 0x7fffffu;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00u;
  uint16_t half = static_cast<uint16_t>(sign | (exp << 10) | (mant >> 13));
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return half;
}

// The value the demo stores for one element. `tag` tells apart tokens written by different
// sequences at the same position (the fork's own tokens).
uint16_t ElementValue(uint32_t tag, uint32_t layer, uint64_t position, KvPlane plane, uint32_t head,
                      uint32_t dim) {
  const double x = 0.37 * static_cast<double>(position) + 1.3 * layer + 0.11 * head + 0.05 * dim +
                   (plane == KvPlane::kValue ? 0.7 : 0.0) + 2.1 * tag;
  return FloatToHalf(static_cast<float>(0.5 * std::sin(x)));
}

// Writes one token's K and V (every head) at `slot` of `layer` through the typed accessors.
absl::Status WriteToken(const KvPoolView& pool, uint32_t layer, int64_t slot, uint32_t tag,
                        uint64_t position) {
  const KvLayerLayout& layout = pool.layout();
  if (slot < 0) return absl::InternalError(absl::StrCat("padding slot for position ", position));
  const uint32_t block = static_cast<uint32_t>(slot / layout.block_size);
  const uint32_t offset = static_cast<uint32_t>(slot % layout.block_size);
  for (uint32_t head = 0; head < layout.num_kv_heads; ++head) {
    if (!pool.Contains(layer, block, offset, head)) {
      return absl::InternalError(
          absl::StrCat("slot ", slot, " of layer ", layer, " is outside the pool"));
    }
    uint16_t* k = pool.key<uint16_t>(layer, block, offset, head);
    uint16_t* v = pool.value<uint16_t>(layer, block, offset, head);
    for (uint32_t d = 0; d < layout.head_dim; ++d) {
      k[d] = ElementValue(tag, layer, position, KvPlane::kKey, head, d);
      v[d] = ElementValue(tag, layer, position, KvPlane::kValue, head, d);
    }
  }
  return absl::OkStatus();
}

absl::Status WriteAllocation(const KvPoolView& pool, const Allocation& alloc, uint32_t tag) {
  for (const LayerAllocation& layer : alloc.layers) {
    for (size_t i = 0; i < layer.slot_mapping.size(); ++i) {
      RETURN_IF_ERROR(
          WriteToken(pool, layer.layer, layer.slot_mapping[i], tag, alloc.first_position + i));
    }
  }
  return absl::OkStatus();
}

// The digest the tokens should have, rebuilt from the generator alone (not from the pool):
// positions below `own_from` carry tag 0 (the prompt), the rest `own_tag`.
uint64_t ExpectedDigest(const KvLayerLayout& pool_layout, uint32_t layer, uint32_t num_tokens,
                        uint32_t own_tag, uint64_t own_from) {
  KvLayerLayout layout = pool_layout;
  layout.num_blocks = (num_tokens + layout.block_size - 1) / layout.block_size;
  std::vector<std::byte> scratch(layout.layer_bytes());
  std::vector<uint32_t> table(layout.num_blocks);
  for (uint32_t b = 0; b < layout.num_blocks; ++b) table[b] = b;
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const uint32_t tag = t < own_from ? 0 : own_tag;
    for (KvPlane plane : {KvPlane::kKey, KvPlane::kValue}) {
      for (uint32_t head = 0; head < layout.num_kv_heads; ++head) {
        auto* row = reinterpret_cast<uint16_t*>(
            scratch.data() +
            layout.head_offset(plane, t / layout.block_size, t % layout.block_size, head));
        for (uint32_t d = 0; d < layout.head_dim; ++d) {
          row[d] = ElementValue(tag, layer, t, plane, head, d);
        }
      }
    }
  }
  return cachemgr::kernels::DigestLayerTokens(layout, scratch.data(), table.data(), num_tokens);
}

std::string BlockList(const std::vector<uint32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) absl::StrAppend(&out, i ? " " : "", ids[i]);
  return out;
}

absl::Status PrintOccupancy(const std::string& socket, const std::string& pool_id,
                            const char* when) {
  ASSIGN_OR_RETURN(cachemgr::client::Stats stats, cachemgr::client::GetStats(socket));
  std::printf("\noccupancy %s (%u sequences daemon-wide)\n", when, stats.num_sequences);
  for (const auto& pool : stats.pools) {
    if (pool.pool_id != pool_id) continue;
    std::printf("  pool %s  model %s  backend %s  %llu bytes  %u clients\n", pool.pool_id.c_str(),
                pool.model_name.c_str(), pool.backend.c_str(),
                static_cast<unsigned long long>(pool.bytes), pool.clients);
    std::printf("  %-6s %9s %6s %6s %7s\n", "layer", "capacity", "used", "free", "shared");
    for (const auto& l : pool.layers) {
      std::printf("  %-6u %9u %6u %6u %7u\n", l.layer, l.capacity_blocks, l.used_blocks,
                  l.free_blocks, l.shared_blocks);
    }
    return absl::OkStatus();
  }
  return absl::NotFoundError(absl::StrCat("Stats lists no pool ", pool_id));
}

// Compares, per layer, the daemon's digest with the local one over the mapped pool and with
// the one rebuilt from the generator. Returns the number of mismatching layers.
absl::StatusOr<int> CheckDigests(Session& session, const std::string& sequence_id, uint32_t own_tag,
                                 uint64_t own_from) {
  ASSIGN_OR_RETURN(cachemgr::client::SequenceInfo info,
                   session.GetSequence(sequence_id, /*include_kv_digest=*/true));
  const KvPoolView& pool = session.pool();
  std::printf("\ndigests of %s (%llu positions)\n", sequence_id.c_str(),
              static_cast<unsigned long long>(info.num_positions));
  std::printf("  %-6s %7s  %-16s  %-16s  %-16s  %s\n", "layer", "tokens", "daemon", "local",
              "expected", "result");
  int mismatches = 0;
  for (const auto& table : info.layers) {
    const uint32_t bs = pool.layout().block_size;
    if (table.layer >= pool.num_layers() || table.block_ids.size() * bs < table.num_tokens) {
      return absl::InternalError(absl::StrCat("layer ", table.layer, " holds ", table.num_tokens,
                                              " tokens in ", table.block_ids.size(), " blocks"));
    }
    const uint64_t local = cachemgr::kernels::DigestLayerTokens(
        pool.layout(), pool.layer_base(table.layer), table.block_ids.data(), table.num_tokens);
    const uint64_t expected =
        ExpectedDigest(pool.layout(), table.layer, table.num_tokens, own_tag, own_from);
    const bool match = local == table.kv_digest && expected == table.kv_digest;
    if (!match) ++mismatches;
    std::printf("  %-6u %7u  %016llx  %016llx  %016llx  %s\n", table.layer, table.num_tokens,
                static_cast<unsigned long long>(table.kv_digest),
                static_cast<unsigned long long>(local), static_cast<unsigned long long>(expected),
                match ? "MATCH" : "MISMATCH");
  }
  return mismatches;
}

absl::Status Run(const std::string& socket) {
  cachemgr::client::AttachOptions options;
  options.client_name = "quickstart";
  options.model.name = "demo-llama";
  options.model.num_layers = 4;
  options.model.num_q_heads = 8;
  options.model.num_kv_heads = 4;
  options.model.head_dim = 64;
  options.model.dtype = cachemgr::client::DType::kFp16;
  options.model.block_size = 16;
  options.model.layout = cachemgr::client::CacheLayout::kFlashAttn;
  options.model.rope.style = cachemgr::client::RopeStyle::kInterleaved;
  options.model.rope.theta = 10000.0;
  options.num_blocks = 256;
  ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Attach(socket, options));
  const KvPoolView& pool = session->pool();
  const KvLayerLayout& layout = pool.layout();
  if (layout.elem_bytes != sizeof(uint16_t)) {
    return absl::InternalError(
        absl::StrCat("negotiated element size is ", layout.elem_bytes, " bytes, expected 2"));
  }

  std::printf("attached      client %s to pool %s\n", session->client_id().c_str(),
              session->pool_id().c_str());
  std::printf(
      "model         %s: %u layers, %u/%u q/kv heads, head_dim %u, fp16, block %u, %s\n",
      session->model().name.c_str(), session->model().num_layers, session->model().num_q_heads,
      session->model().num_kv_heads, session->model().head_dim, session->model().block_size,
      layout.order == cachemgr::kernels::KvOrder::kFlashAttn ? "FlashAttention" : "FlashInfer");
  std::printf("pool          %u blocks/layer, %zu bytes/block, %zu bytes/layer, mapped\n",
              session->num_blocks(), layout.block_bytes(), layout.layer_bytes());
  std::printf("lease         heartbeat every %u ms, expires after %u ms\n",
              session->heartbeat_interval_ms(), session->lease_timeout_ms());
  RETURN_IF_ERROR(PrintOccupancy(socket, session->pool_id(), "after attach"));

  // Prefill: one allocation for the whole prompt.
  ASSIGN_OR_RETURN(Allocation prompt, session->Allocate(kParent, kPromptTokens));
  RETURN_IF_ERROR(WriteAllocation(pool, prompt, /*tag=*/0));
  std::printf("\nprefill       %s: %u tokens (created=%s)\n", kParent, kPromptTokens,
              prompt.created ? "yes" : "no");
  for (const LayerAllocation& layer : prompt.layers) {
    std::printf("  layer %-3u blocks [%s]  slots %lld..%lld  tokens %u\n", layer.layer,
                BlockList(layer.new_block_ids).c_str(),
                static_cast<long long>(layer.slot_mapping.front()),
                static_cast<long long>(layer.slot_mapping.back()), layer.num_tokens);
  }

  // Decode: one token at a time; the prompt's last block still has room.
  std::printf("\ndecode        %s: %u tokens, one per step\n", kParent, kDecodeTokens);
  for (uint32_t step = 0; step < kDecodeTokens; ++step) {
    ASSIGN_OR_RETURN(Allocation token, session->Allocate(kParent, 1));
    RETURN_IF_ERROR(WriteAllocation(pool, token, /*tag=*/0));
    const LayerAllocation& l0 = token.layers.front();
    const int64_t slot = l0.slot_mapping.front();
    std::printf("  position %-4llu slot %-6lld block %-4lld offset %-3lld %s\n",
                static_cast<unsigned long long>(token.first_position), static_cast<long long>(slot),
                static_cast<long long>(slot / layout.block_size),
                static_cast<long long>(slot % layout.block_size),
                l0.new_block_ids.empty() ? "(fills the partial block)" : "(new block)");
  }

  // Fork: the child shares every block; its first append copies the shared partial tail.
  ASSIGN_OR_RETURN(cachemgr::client::SequenceInfo child, session->Fork(kParent, kChild));
  const uint64_t fork_positions = child.num_positions;
  std::printf("\nfork          %s -> %s: %llu positions shared\n", kParent, kChild,
              static_cast<unsigned long long>(fork_positions));
  for (const auto& table : child.layers) {
    std::printf("  layer %-3u blocks [%s]\n", table.layer, BlockList(table.block_ids).c_str());
  }
  ASSIGN_OR_RETURN(Allocation child_token, session->Allocate(kChild, 1));
  RETURN_IF_ERROR(WriteAllocation(pool, child_token, /*tag=*/1));
  std::printf("\nappend        %s: 1 token at position %llu\n", kChild,
              static_cast<unsigned long long>(child_token.first_position));
  size_t copies = 0;
  for (const LayerAllocation& layer : child_token.layers) {
    std::string copied;
    for (const auto& c : layer.copies)
      absl::StrAppend(&copied, " ", c.src_block, "->", c.dst_block);
    copies += layer.copies.size();
    std::printf("  layer %-3u slot %-6lld copy-on-write:%s\n", layer.layer,
                static_cast<long long>(layer.slot_mapping.front()),
                copied.empty() ? " none" : copied.c_str());
  }
  std::printf("  %zu block copies reported\n", copies);

  ASSIGN_OR_RETURN(int parent_bad, CheckDigests(*session, kParent, 0, 0));
  ASSIGN_OR_RETURN(int child_bad, CheckDigests(*session, kChild, 1, fork_positions));

  RETURN_IF_ERROR(PrintOccupancy(socket, session->pool_id(), "before free"));
  ASSIGN_OR_RETURN(uint64_t child_released, session->Free(kChild));
  ASSIGN_OR_RETURN(uint64_t parent_released, session->Free(kParent));
  std::printf("\nfree          %s released %llu blocks, %s released %llu blocks\n", kChild,
              static_cast<unsigned long long>(child_released), kParent,
              static_cast<unsigned long long>(parent_released));
  RETURN_IF_ERROR(PrintOccupancy(socket, session->pool_id(), "after free"));

  RETURN_IF_ERROR(session->Detach());
  std::printf("\ndetached\n");
  if (parent_bad + child_bad > 0) {
    return absl::DataLossError(
        absl::StrCat(parent_bad + child_bad, " layer digests did not match"));
  }
  std::printf("all digests MATCH\n");
  return absl::OkStatus();
}

}  // namespace

constexpr char kUsage[] =
    "usage: cachemgr_quickstart --socket PATH\n"
    "Walks through a running cachemgrd's main job as an engine would: attach, allocate, write\n"
    "K/V into the mapped pool, append, fork with copy-on-write, compare KV digests with the\n"
    "daemon's, free and detach. Exits non-zero on any error or mismatch.\n";

int main(int argc, char** argv) {
  std::string socket;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--socket" && i + 1 < argc) {
      socket = argv[++i];
    } else if (arg.rfind("--socket=", 0) == 0) {
      socket = arg.substr(9);
    } else {
      socket.clear();
      break;
    }
  }
  if (socket.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const absl::Status status = Run(socket);
  std::fflush(stdout);
  if (!status.ok()) {
    std::fprintf(stderr, "quickstart failed: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
