// cachemgr_test_kv_client: a separate client process for black-box tests. Attaches, allocates
// one sequence, writes deterministic K/V bytes through the mapped pool, and prints one JSON line
// comparing its own per-layer digests with the daemon's:
//
//   {"client_id":"...","sequence_id":"...","tokens":N,"local_digests":["hex16",...],
//    "daemon_digests":["hex16",...],"used_blocks":U}
//
// U is the used blocks of this client's pool summed over layers (from Stats). Then detaches
// and exits 0, or with --hold keeps the session (no heartbeats) and sleeps until killed.
// Any error prints {"error":"CODE: message"} and exits 2.
//
// Flags (--name=value): --socket (required), --name, --sequence, --tokens, --seed, --layers,
// --q_heads, --kv_heads, --head_dim, --dtype fp32|fp16|bf16, --block_size, --layout fa|fi,
// --num_blocks, --model, --hold, --no_heartbeat.
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/client/client.h"
#include "cachemgr/kernels/kv_digest.h"
#include "cachemgr/kernels/kv_layout.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {
namespace {

struct Flags {
  std::string socket;
  std::string name = "kv-client";
  std::string sequence = "seq-0";
  uint32_t tokens = 37;
  uint64_t seed = 1;
  uint32_t layers = 5;
  uint32_t q_heads = 8;
  uint32_t kv_heads = 4;
  uint32_t head_dim = 8;
  client::DType dtype = client::DType::kFp32;
  uint32_t block_size = 16;
  client::CacheLayout layout = client::CacheLayout::kFlashAttn;
  uint32_t num_blocks = 64;
  std::string model = "stories260K";
  bool hold = false;
  bool no_heartbeat = false;
};

absl::Status ParseU32(const std::string& flag, const std::string& value, uint32_t* out) {
  if (!absl::SimpleAtoi(value, out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", value, " is not a uint32"));
  }
  return absl::OkStatus();
}

absl::Status ParseBool(const std::string& flag, const std::string& value, bool* out) {
  if (value.empty() || value == "true" || value == "1") {
    *out = true;
  } else if (value == "false" || value == "0") {
    *out = false;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", value, " is not a bool"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    const size_t eq = arg.find('=');
    const std::string flag = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (flag == "socket") {
      f.socket = value;
    } else if (flag == "name") {
      f.name = value;
    } else if (flag == "sequence") {
      f.sequence = value;
    } else if (flag == "tokens") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.tokens));
    } else if (flag == "seed") {
      if (!absl::SimpleAtoi(value, &f.seed)) {
        return absl::InvalidArgumentError(absl::StrCat("--seed=", value, " is not a uint64"));
      }
    } else if (flag == "layers") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.layers));
    } else if (flag == "q_heads") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.q_heads));
    } else if (flag == "kv_heads") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.kv_heads));
    } else if (flag == "head_dim") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.head_dim));
    } else if (flag == "block_size") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.block_size));
    } else if (flag == "num_blocks") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.num_blocks));
    } else if (flag == "dtype") {
      if (value == "fp32") {
        f.dtype = client::DType::kFp32;
      } else if (value == "fp16") {
        f.dtype = client::DType::kFp16;
      } else if (value == "bf16") {
        f.dtype = client::DType::kBf16;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--dtype=", value, ": expected fp32, fp16 or bf16"));
      }
    } else if (flag == "layout") {
      if (value == "fa") {
        f.layout = client::CacheLayout::kFlashAttn;
      } else if (value == "fi") {
        f.layout = client::CacheLayout::kFlashInfer;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--layout=", value, ": expected fa or fi"));
      }
    } else if (flag == "model") {
      f.model = value;
    } else if (flag == "hold") {
      RETURN_IF_ERROR(ParseBool(flag, value, &f.hold));
    } else if (flag == "no_heartbeat") {
      RETURN_IF_ERROR(ParseBool(flag, value, &f.no_heartbeat));
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", flag));
    }
  }
  if (f.socket.empty()) return absl::InvalidArgumentError("--socket is required");
  if (f.tokens == 0) return absl::InvalidArgumentError("--tokens must be at least 1");
  return f;
}

std::string JsonEscape(std::string_view text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned char>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string Hex16(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016" PRIx64, value);
  return text;
}

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The bytes of one token row: a pure function of (seed, layer, position, plane).
void FillRow(std::byte* row, size_t bytes, uint64_t seed, uint32_t layer, uint64_t position,
             kernels::KvPlane plane) {
  uint64_t state = seed * 0x9e3779b97f4a7c15ull;
  state ^= (uint64_t{layer} + 1) * 0xc2b2ae3d27d4eb4full;
  state ^= (position + 1) * 0x165667b19e3779f9ull;
  state ^= (static_cast<uint64_t>(plane) + 1) * 0xd6e8feb86659fd93ull;
  for (size_t i = 0; i < bytes; i += 8) {
    const uint64_t word = SplitMix64(&state);
    std::memcpy(row + i, &word, std::min<size_t>(8, bytes - i));
  }
}

absl::Status Run(const Flags& flags) {
  client::AttachOptions options;
  options.client_name = flags.name;
  options.model.name = flags.model;
  options.model.num_layers = flags.layers;
  options.model.num_q_heads = flags.q_heads;
  options.model.num_kv_heads = flags.kv_heads;
  options.model.head_dim = flags.head_dim;
  options.model.dtype = flags.dtype;
  options.model.block_size = flags.block_size;
  options.model.layout = flags.layout;
  options.num_blocks = flags.num_blocks;
  options.auto_heartbeat = !flags.hold && !flags.no_heartbeat;
  ASSIGN_OR_RETURN(std::unique_ptr<client::Session> session,
                   client::Session::Attach(flags.socket, options));
  const client::KvPoolView& pool = session->pool();
  const kernels::KvLayerLayout& layout = pool.layout();

  ASSIGN_OR_RETURN(client::Allocation alloc, session->Allocate(flags.sequence, flags.tokens));
  for (const client::LayerAllocation& layer : alloc.layers) {
    if (layer.layer >= pool.num_layers()) {
      return absl::InternalError(
          absl::StrCat("allocation names layer ", layer.layer, " of ", pool.num_layers()));
    }
    for (size_t i = 0; i < layer.slot_mapping.size(); ++i) {
      const int64_t slot = layer.slot_mapping[i];
      if (slot < 0) continue;
      if (static_cast<uint64_t>(slot) >= uint64_t{layout.num_blocks} * layout.block_size) {
        return absl::InternalError(
            absl::StrCat("layer ", layer.layer, " slot ", slot, " is outside the pool"));
      }
      const uint64_t position = alloc.first_position + i;
      FillRow(pool.key_at_slot<std::byte>(layer.layer, slot), layout.token_bytes(), flags.seed,
              layer.layer, position, kernels::KvPlane::kKey);
      FillRow(pool.value_at_slot<std::byte>(layer.layer, slot), layout.token_bytes(), flags.seed,
              layer.layer, position, kernels::KvPlane::kValue);
    }
  }

  ASSIGN_OR_RETURN(client::SequenceInfo info,
                   session->GetSequence(flags.sequence, /*include_kv_digest=*/true));
  std::vector<client::LayerBlockTable> tables = info.layers;
  std::sort(tables.begin(), tables.end(),
            [](const auto& a, const auto& b) { return a.layer < b.layer; });
  std::vector<std::string> local, daemon;
  for (const client::LayerBlockTable& table : tables) {
    const size_t needed = (size_t{table.num_tokens} + layout.block_size - 1) / layout.block_size;
    if (table.layer >= pool.num_layers() || table.block_ids.size() < needed) {
      return absl::InternalError(absl::StrCat("layer ", table.layer, " holds ", table.num_tokens,
                                              " tokens in ", table.block_ids.size(), " blocks"));
    }
    for (const uint32_t block : table.block_ids) {
      if (block >= layout.num_blocks) {
        return absl::InternalError(
            absl::StrCat("layer ", table.layer, " block ", block, " is outside the pool"));
      }
    }
    local.push_back(Hex16(kernels::DigestLayerTokens(layout, pool.layer_base(table.layer),
                                                     table.block_ids.data(), table.num_tokens)));
    daemon.push_back(Hex16(table.kv_digest));
  }

  ASSIGN_OR_RETURN(client::Stats stats, client::GetStats(flags.socket));
  const client::PoolStats* mine = nullptr;
  for (const client::PoolStats& p : stats.pools) {
    if (p.pool_id == session->pool_id()) mine = &p;
  }
  if (mine == nullptr) {
    return absl::NotFoundError(absl::StrCat("Stats lists no pool ", session->pool_id()));
  }
  uint64_t used_blocks = 0;
  for (const client::LayerOccupancy& l : mine->layers) used_blocks += l.used_blocks;

  auto quoted = [](std::string* out, const std::string& s) { absl::StrAppend(out, "\"", s, "\""); };
  const std::string line = absl::StrCat(
      "{\"client_id\":\"", JsonEscape(session->client_id()), "\",\"sequence_id\":\"",
      JsonEscape(flags.sequence), "\",\"tokens\":", flags.tokens, ",\"local_digests\":[",
      absl::StrJoin(local, ",", quoted), "],\"daemon_digests\":[",
      absl::StrJoin(daemon, ",", quoted), "],\"used_blocks\":", used_blocks, "}\n");
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);

  if (flags.hold) {
    // Keep the session (and its lease, which lapses without heartbeats) until killed.
    while (true) ::pause();
  }
  return session->Detach();
}

}  // namespace
}  // namespace cachemgr

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(
          "usage: cachemgr_test_kv_client --socket=PATH [--name=N] [--sequence=ID] [--tokens=37]\n"
          "  [--seed=1] [--layers=5] [--q_heads=8] [--kv_heads=4] [--head_dim=8]\n"
          "  [--dtype=fp32|fp16|bf16] [--block_size=16] [--layout=fa|fi] [--num_blocks=64]\n"
          "  [--model=stories260K] [--hold] [--no_heartbeat]\n"
          "A client process for black-box tests: attaches, writes deterministic K/V to one\n"
          "sequence through the mapped pool and prints one JSON line with its own and the\n"
          "daemon's per-layer digests; --hold keeps the session (no heartbeats) until killed.\n",
          stdout);
      return 0;
    }
  }
  absl::Status status;
  absl::StatusOr<cachemgr::Flags> flags = cachemgr::ParseFlags(argc, argv);
  status = flags.ok() ? cachemgr::Run(*flags) : flags.status();
  if (!status.ok()) {
    std::printf("{\"error\":\"%s\"}\n",
                cachemgr::JsonEscape(
                    absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message()))
                    .c_str());
    std::fflush(stdout);
    return 2;
  }
  return 0;
}
