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
// --mode=stall: the same first line (plus "block_ids", layer 0's table), then waits for SIGUSR1
// with heartbeats running. Session events print as {"event":"lost"|"ready","generation":G,
// "status":"CODE: message"} when they happen. At SIGUSR1 it writes other bytes (seed + 1000)
// through the pointers of its allocation without checking the lease (a writer that stalled
// mid-batch), then prints {"event":"after_stall","lease_ok":B,"revoked":B,"call":"CODE: message"}
// (the status of a GetSequence made then) and exits 0.
//
// --mode=loop: a workload that survives daemon restarts. Allocates, writes and checks sequences
// (local digest == daemon digest), keeps --live of them and frees the oldest, and prints
// {"event":"progress","generation":G,"ops":N} every 10 operations, {"event":"outage",...} once
// when calls start failing, {"event":"reattached","generation":G} when it re-attached
// (Session::Reattach; the lost sequences are forgotten, as an engine recomputes them). Stops
// after --seconds, or once it reached generation --until_generation and did --ops_after
// operations there; then checks its live sequences again and prints {"event":"done",
// "generation":G,"ops":N,"outages":O,"digest_mismatches":M,"live_sequences":L,"live_blocks":B,
// "used_blocks":U} (B: blocks its live sequences hold per Get Sequence, U: the pool's used
// blocks per Stats), detaches and exits 0 (2 on a digest mismatch or an unexpected error).
//
// Flags (--name=value): --socket (required), --name, --sequence, --tokens, --seed, --layers,
// --q_heads, --kv_heads, --head_dim, --dtype fp32|fp16|bf16, --block_size, --layout fa|fi,
// --num_blocks, --model, --hold, --no_heartbeat, --mode once|stall|loop, --seconds, --live,
// --until_generation, --ops_after.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
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
  std::string mode = "once";
  uint32_t seconds = 60;
  uint32_t live = 4;
  uint32_t until_generation = 0;  // 0: run for --seconds
  uint32_t ops_after = 20;
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
    } else if (flag == "mode") {
      if (value != "once" && value != "stall" && value != "loop") {
        return absl::InvalidArgumentError(
            absl::StrCat("--mode=", value, ": expected once, stall or loop"));
      }
      f.mode = value;
    } else if (flag == "seconds") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.seconds));
    } else if (flag == "live") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.live));
    } else if (flag == "until_generation") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.until_generation));
    } else if (flag == "ops_after") {
      RETURN_IF_ERROR(ParseU32(flag, value, &f.ops_after));
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

// One line to stdout, whole, even when the heartbeat thread prints an event meanwhile.
void PrintLine(const std::string& line) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::fputs((line + "\n").c_str(), stdout);
  std::fflush(stdout);
}

std::string StatusText(const absl::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

client::AttachOptions MakeAttachOptions(const Flags& flags) {
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
  options.on_event = [](const client::SessionEvent& e) {
    PrintLine(absl::StrCat("{\"event\":\"",
                           e.kind == client::SessionEvent::Kind::kLost ? "lost" : "ready",
                           "\",\"generation\":", e.generation, ",\"status\":\"",
                           JsonEscape(StatusText(e.status)), "\"}"));
  };
  return options;
}

// Allocates `tokens` rows of `sequence` and writes FillRow bytes of `seed` into each; returns the
// rows' addresses (K and V of every row of every layer) when `rows` is given.
absl::StatusOr<client::Allocation> AllocateAndWrite(client::Session& session,
                                                    const std::string& sequence, uint32_t tokens,
                                                    uint64_t seed, std::vector<std::byte*>* rows) {
  ASSIGN_OR_RETURN(client::Allocation alloc, session.Allocate(sequence, tokens));
  const client::KvPoolView& pool = session.pool();
  const kernels::KvLayerLayout& layout = pool.layout();
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
      std::byte* key = pool.key_at_slot<std::byte>(layer.layer, slot);
      std::byte* value = pool.value_at_slot<std::byte>(layer.layer, slot);
      FillRow(key, layout.token_bytes(), seed, layer.layer, position, kernels::KvPlane::kKey);
      FillRow(value, layout.token_bytes(), seed, layer.layer, position, kernels::KvPlane::kValue);
      if (rows != nullptr) {
        rows->push_back(key);
        rows->push_back(value);
      }
    }
  }
  return alloc;
}

struct Digests {
  std::vector<std::string> local, daemon;
  uint64_t blocks = 0;  // held by the sequence, summed over layers
  std::vector<uint32_t> layer0_blocks;
};

// The sequence's per-layer digests as this process reads the pool and as the daemon does.
absl::StatusOr<Digests> ReadDigests(client::Session& session, const std::string& sequence) {
  const client::KvPoolView& pool = session.pool();
  const kernels::KvLayerLayout& layout = pool.layout();
  ASSIGN_OR_RETURN(client::SequenceInfo info,
                   session.GetSequence(sequence, /*include_kv_digest=*/true));
  std::vector<client::LayerBlockTable> tables = info.layers;
  std::sort(tables.begin(), tables.end(),
            [](const auto& a, const auto& b) { return a.layer < b.layer; });
  Digests out;
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
    out.local.push_back(Hex16(kernels::DigestLayerTokens(
        layout, pool.layer_base(table.layer), table.block_ids.data(), table.num_tokens)));
    out.daemon.push_back(Hex16(table.kv_digest));
    out.blocks += table.block_ids.size();
    if (table.layer == 0) out.layer0_blocks = table.block_ids;
  }
  return out;
}

// Used blocks of the session's pool summed over layers (from Stats).
absl::StatusOr<uint64_t> PoolUsedBlocks(const std::string& socket, client::Session& session) {
  ASSIGN_OR_RETURN(client::Stats stats, client::GetStats(socket));
  for (const client::PoolStats& p : stats.pools) {
    if (p.pool_id != session.pool_id()) continue;
    uint64_t used = 0;
    for (const client::LayerOccupancy& l : p.layers) used += l.used_blocks;
    return used;
  }
  return absl::NotFoundError(absl::StrCat("Stats lists no pool ", session.pool_id()));
}

absl::Status RunOnce(const Flags& flags, std::vector<std::byte*>* rows,
                     std::unique_ptr<client::Session>* out_session) {
  ASSIGN_OR_RETURN(std::unique_ptr<client::Session> session,
                   client::Session::Attach(flags.socket, MakeAttachOptions(flags)));
  RETURN_IF_ERROR(
      AllocateAndWrite(*session, flags.sequence, flags.tokens, flags.seed, rows).status());
  ASSIGN_OR_RETURN(Digests digests, ReadDigests(*session, flags.sequence));
  ASSIGN_OR_RETURN(uint64_t used_blocks, PoolUsedBlocks(flags.socket, *session));

  auto quoted = [](std::string* out, const std::string& s) { absl::StrAppend(out, "\"", s, "\""); };
  PrintLine(absl::StrCat(
      "{\"client_id\":\"", JsonEscape(session->client_id()), "\",\"sequence_id\":\"",
      JsonEscape(flags.sequence), "\",\"tokens\":", flags.tokens, ",\"local_digests\":[",
      absl::StrJoin(digests.local, ",", quoted), "],\"daemon_digests\":[",
      absl::StrJoin(digests.daemon, ",", quoted), "],\"used_blocks\":", used_blocks,
      ",\"block_ids\":[", absl::StrJoin(digests.layer0_blocks, ","), "]}"));

  if (flags.hold) {
    // Keep the session (and its lease, which lapses without heartbeats) until killed.
    while (true) ::pause();
  }
  if (out_session != nullptr) {
    *out_session = std::move(session);
    return absl::OkStatus();
  }
  return session->Detach();
}

absl::Status RunStall(const Flags& flags) {
  std::vector<std::byte*> rows;
  std::unique_ptr<client::Session> session;
  RETURN_IF_ERROR(RunOnce(flags, &rows, &session));
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  int sig = 0;
  while (sigwait(&usr1, &sig) != 0 || sig != SIGUSR1) {
  }
  // A writer that checked the lease before it stalled and stores now: through its old pointers.
  const size_t bytes = session->pool().layout().token_bytes();
  for (size_t i = 0; i < rows.size(); ++i) {
    FillRow(rows[i], bytes, flags.seed + 1000, 0, i, kernels::KvPlane::kKey);
  }
  const bool lease_ok = session->lease_ok();
  const bool revoked = session->mapping_revoked_at().has_value();
  const absl::Status call = session->GetSequence(flags.sequence).status();
  PrintLine(absl::StrCat("{\"event\":\"after_stall\",\"lease_ok\":", lease_ok ? "true" : "false",
                         ",\"revoked\":", revoked ? "true" : "false",
                         ",\"generation\":", session->generation(), ",\"call\":\"",
                         JsonEscape(StatusText(call)), "\"}"));
  return absl::OkStatus();
}

// Codes a call gets while the daemon is down or has just restarted (before the heartbeat thread
// declared the session lost): the loop waits and retries.
bool IsOutage(absl::StatusCode code) {
  return code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kAborted ||
         code == absl::StatusCode::kNotFound || code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kDeadlineExceeded;
}

absl::Status RunLoop(const Flags& flags) {
  ASSIGN_OR_RETURN(std::unique_ptr<client::Session> session,
                   client::Session::Attach(flags.socket, MakeAttachOptions(flags)));
  const absl::Time end = absl::Now() + absl::Seconds(flags.seconds);
  std::deque<std::string> live;
  uint64_t ops = 0, ops_in_generation = 0, outages = 0, mismatches = 0, serial = 0;
  bool in_outage = false;
  auto outage = [&](const absl::Status& why) {
    if (in_outage) return;
    in_outage = true;
    ++outages;
    PrintLine(absl::StrCat("{\"event\":\"outage\",\"generation\":", session->generation(),
                           ",\"status\":\"", JsonEscape(StatusText(why)), "\"}"));
  };
  while (absl::Now() < end) {
    if (flags.until_generation > 0 && session->generation() >= flags.until_generation &&
        ops_in_generation >= flags.ops_after) {
      break;
    }
    if (!session->lease_ok()) {
      outage(session->status());
      absl::StatusOr<uint64_t> generation = session->Reattach();
      if (!generation.ok()) {
        absl::SleepFor(absl::Milliseconds(20));
        continue;
      }
      live.clear();  // gone with the old session: an engine would recompute them
      in_outage = false;
      ops_in_generation = 0;
      PrintLine(absl::StrCat("{\"event\":\"reattached\",\"generation\":", *generation, "}"));
      continue;
    }
    const uint64_t n = serial++;
    const std::string sequence = absl::StrCat("w", session->generation(), "-", n);
    absl::Status status = AllocateAndWrite(*session, sequence, 1 + n % 40, n, nullptr).status();
    if (status.ok()) {
      absl::StatusOr<Digests> digests = ReadDigests(*session, sequence);
      status = digests.status();
      if (status.ok() && digests->local != digests->daemon) ++mismatches;
    }
    if (status.ok()) {
      live.push_back(sequence);
      while (live.size() > flags.live && status.ok()) {
        status = session->Free(live.front()).status();
        if (status.ok()) live.pop_front();
      }
    }
    if (!status.ok()) {
      if (!IsOutage(status.code())) return status;
      outage(status);
      absl::SleepFor(absl::Milliseconds(20));
      continue;
    }
    in_outage = false;
    ++ops;
    if (++ops_in_generation % 10 == 0) {
      PrintLine(absl::StrCat("{\"event\":\"progress\",\"generation\":", session->generation(),
                             ",\"ops\":", ops, "}"));
    }
  }
  uint64_t live_blocks = 0;
  for (const std::string& sequence : live) {
    ASSIGN_OR_RETURN(Digests digests, ReadDigests(*session, sequence));
    if (digests.local != digests.daemon) ++mismatches;
    live_blocks += digests.blocks;
  }
  ASSIGN_OR_RETURN(uint64_t used_blocks, PoolUsedBlocks(flags.socket, *session));
  PrintLine(absl::StrCat("{\"event\":\"done\",\"generation\":", session->generation(),
                         ",\"ops\":", ops, ",\"outages\":", outages,
                         ",\"digest_mismatches\":", mismatches, ",\"live_sequences\":", live.size(),
                         ",\"live_blocks\":", live_blocks, ",\"used_blocks\":", used_blocks, "}"));
  RETURN_IF_ERROR(session->Detach());
  if (mismatches > 0) {
    return absl::DataLossError(absl::StrCat(mismatches, " digest mismatches"));
  }
  return absl::OkStatus();
}

absl::Status Run(const Flags& flags) {
  if (flags.mode == "stall") return RunStall(flags);
  if (flags.mode == "loop") return RunLoop(flags);
  return RunOnce(flags, nullptr, nullptr);
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
  // --mode=stall waits for SIGUSR1 with sigwait: blocked before any thread starts, so every
  // thread inherits the mask and the signal is left for sigwait.
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, nullptr);
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
