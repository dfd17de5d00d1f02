// The read-only daemon commands: health, stats, clients, sequences, sequence, watch.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tools/cachemgrctl/commands.h"
#include "tools/cachemgrctl/daemon_client.h"
#include "tools/cachemgrctl/json_output.h"
#include "tools/cachemgrctl/table.h"

namespace cachemgr::ctl {
namespace {

constexpr char kServiceName[] = "cachemgr.v1.CacheManager";

// "EVENT_TYPE_SEQUENCE_FREED" -> "sequence_freed" for the enum value names of the .proto.
std::string ShortEnumName(const std::string& full, const std::string& prefix) {
  return absl::AsciiStrToLower(absl::StripPrefix(full, prefix));
}

std::string BackendName(v1::Backend backend) {
  return ShortEnumName(v1::Backend_Name(backend), "BACKEND_");
}

// Whole seconds: "0s", "42s", "3h2m1s".
std::string Uptime(uint64_t ms) {
  return ms < 1000 ? "0s" : absl::FormatDuration(absl::Seconds(static_cast<int64_t>(ms / 1000)));
}

int Print(const std::string& text) {
  std::fputs(text.c_str(), stdout);
  return kExitOk;
}

int CallFailed(const char* command, const grpc::Status& status) {
  return ReportError(command, StatusText(status), kExitFailure);
}

// Parses the command line into `var`; on a usage error reports it and returns.
#define PARSE_OR_RETURN(var, args, own, command)                                  \
  absl::StatusOr<DaemonCommandArgs> var = ParseDaemonCommand(args, own, command); \
  if (!var.ok()) return ReportError(command, std::string(var.status().message()), kExitUsage)

grpc::Status GetStats(DaemonClient& client, v1::StatsResponse* stats) {
  auto ctx = client.Context();
  return client.stub().Stats(ctx.get(), v1::StatsRequest(), stats);
}

}  // namespace

int RunHealth(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "health";
  PARSE_OR_RETURN(parsed, args, {}, kCommand);
  DaemonClient client(parsed->options);
  // The server's overall status ("") and the CacheManager service's.
  std::map<std::string, std::string> statuses;
  bool serving = true;
  bool health_off = false;
  for (const std::string& service : {std::string(), std::string(kServiceName)}) {
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    auto ctx = client.Context();
    const grpc::Status status = client.health().Check(ctx.get(), request, &response);
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      health_off = true;
      break;
    }
    if (!status.ok()) return CallFailed(kCommand, status);
    statuses[service] =
        grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
    serving = serving && response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  }
  v1::StatsResponse stats;
  if (const grpc::Status status = GetStats(client, &stats); !status.ok()) {
    return CallFailed(kCommand, status);
  }
  const std::string overall =
      health_off ? "SERVING (health service off)" : (serving ? "SERVING" : "NOT_SERVING");
  if (parsed->options.json) {
    Json services = Json::object();
    for (const auto& [service, status] : statuses) services[service] = status;
    Print(DumpJson({{"status", health_off || serving ? "SERVING" : "NOT_SERVING"},
                    {"health_service", !health_off},
                    {"services", std::move(services)},
                    {"version", stats.version()},
                    {"uptime_ms", stats.uptime_ms()},
                    {"target", parsed->options.target}}));
  } else {
    std::printf("%s  cachemgrd %s at %s, up %s\n", overall.c_str(), stats.version().c_str(),
                parsed->options.target.c_str(), Uptime(stats.uptime_ms()).c_str());
  }
  return health_off || serving ? kExitOk : kExitFailure;
}

int RunStats(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "stats";
  PARSE_OR_RETURN(parsed, args, {}, kCommand);
  DaemonClient client(parsed->options);
  v1::StatsResponse stats;
  if (const grpc::Status status = GetStats(client, &stats); !status.ok()) {
    return CallFailed(kCommand, status);
  }
  if (parsed->options.json) return Print(ToJson(stats));

  std::string out = absl::StrFormat(
      "cachemgrd %s, up %s: %d pools, %d clients, %u sequences, memory %s of %s\n", stats.version(),
      Uptime(stats.uptime_ms()), stats.pools_size(), stats.clients_size(), stats.num_sequences(),
      HumanBytes(stats.memory_used_bytes()), HumanBytes(stats.memory_budget_bytes()));
  if (const v1::PrefixCounters& c = stats.prefix(); c.stored() + c.misses() > 0) {
    absl::StrAppend(&out, absl::StrFormat("prefix store: %u stored, %u hits, %u misses, %u "
                                          "evicted, %u corrupt, %u idle pools reclaimed\n",
                                          c.stored(), c.hits(), c.misses(), c.evictions(),
                                          c.corrupt(), c.pools_reclaimed()));
  }
  // Per device: pools, bytes, blocks used over all layers.
  struct DeviceTotals {
    int pools = 0;
    uint64_t bytes = 0, used = 0, capacity = 0;
  };
  std::map<std::string, DeviceTotals> devices;
  Table pools({"POOL", "MODEL", "BACKEND", "DEVICE", "LAYERS", "BYTES", "CLIENTS", "USED",
               "COMPRESSED", "ARENA", "PREFIXES", "GROUP"});
  for (const v1::PoolStats& p : stats.pools()) {
    uint64_t used = 0, capacity = 0;
    for (const v1::LayerOccupancy& l : p.layers()) {
      used += l.used_blocks();
      capacity += l.capacity_blocks();
    }
    DeviceTotals& d = devices[p.device()];
    ++d.pools;
    d.bytes += p.bytes();
    d.used += used;
    d.capacity += capacity;
    pools.AddRow({p.pool_id(), p.model_name(), BackendName(p.backend()), p.device(),
                  absl::StrCat(p.layers_size()), HumanBytes(p.bytes()), absl::StrCat(p.clients()),
                  capacity == 0 ? "0.0%" : Percent(static_cast<double>(used) / capacity),
                  absl::StrCat(p.compressed_sequences()), HumanBytes(p.arena_bytes()),
                  absl::StrCat(p.prefix_entries()),
                  // A tensor-parallel group's pool: its name and ranks attached of its size.
                  p.group_size() > 1 ? absl::StrCat(p.group_name(), " ", p.group_ranks_attached(),
                                                    "/", p.group_size())
                                     : "-"});
  }
  if (!devices.empty()) {
    Table by_device({"DEVICE", "POOLS", "BYTES", "BLOCKS_USED", "BLOCKS", "USED"});
    for (const auto& [name, d] : devices) {
      by_device.AddRow(
          {name, absl::StrCat(d.pools), HumanBytes(d.bytes), absl::StrCat(d.used),
           absl::StrCat(d.capacity),
           d.capacity == 0 ? "0.0%" : Percent(static_cast<double>(d.used) / d.capacity)});
    }
    absl::StrAppend(&out, "\n", by_device.Render(), "\n", pools.Render());
  }
  for (const v1::PoolStats& p : stats.pools()) {
    Table layers({"LAYER", "CAPACITY", "USED", "FREE", "SHARED", "USED%", "QUARANTINED"});
    for (const v1::LayerOccupancy& l : p.layers()) {
      layers.AddRow({absl::StrCat(l.layer()), absl::StrCat(l.capacity_blocks()),
                     absl::StrCat(l.used_blocks()), absl::StrCat(l.free_blocks()),
                     absl::StrCat(l.shared_blocks()),
                     l.capacity_blocks() == 0
                         ? "0.0%"
                         : Percent(static_cast<double>(l.used_blocks()) / l.capacity_blocks()),
                     absl::StrCat(l.quarantined_blocks())});
    }
    absl::StrAppend(&out, "\npool ", p.pool_id(), " (", p.model_name(), ") on ", p.device(),
                    ", blocks per layer:\n", layers.Render());
  }
  return Print(out);
}

int RunClients(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "clients";
  PARSE_OR_RETURN(parsed, args, {}, kCommand);
  DaemonClient client(parsed->options);
  v1::StatsResponse stats;
  if (const grpc::Status status = GetStats(client, &stats); !status.ok()) {
    return CallFailed(kCommand, status);
  }
  if (parsed->options.json) {
    return Print(absl::StrCat("{\"clients\": [",
                              absl::StrJoin(stats.clients(), ", ",
                                            [](std::string* out, const v1::ClientInfo& c) {
                                              out->append(ToJson(c, /*indent=*/false));
                                            }),
                              "]}\n"));
  }
  // RANK: the client's rank when its pool is a tensor-parallel group's.
  std::map<std::string, bool> group_pools;
  for (const v1::PoolStats& p : stats.pools()) group_pools[p.pool_id()] = p.group_size() > 1;
  Table table({"CLIENT", "NAME", "POOL", "SEQUENCES", "LEASE_LEFT", "RANK"});
  for (const v1::ClientInfo& c : stats.clients()) {
    table.AddRow({c.client_id(), c.client_name(), c.pool_id(), absl::StrCat(c.sequences()),
                  absl::StrFormat("%.1f s", c.lease_remaining_ms() / 1000.0),
                  group_pools[c.pool_id()] ? absl::StrCat(c.group_rank()) : "-"});
  }
  return Print(table.Render());
}

int RunPeers(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "peers";
  PARSE_OR_RETURN(parsed, args, {}, kCommand);
  DaemonClient client(parsed->options);
  v1::ListPeersResponse response;
  auto ctx = client.Context();
  if (const grpc::Status status = client.stub().ListPeers(ctx.get(), {}, &response); !status.ok()) {
    return CallFailed(kCommand, status);
  }
  if (parsed->options.json) return Print(ToJson(response));
  std::string out = absl::StrCat("this daemon: node ", response.node_name(), ", boot id ",
                                 response.boot_id(), "\n");
  Table table({"PEER", "ENTRY", "STATE", "NODE", "VERSION", "RTT", "LAST_SEEN", "PROBES_OK",
               "FAILED", "ROW_LINKS", "LAST_ERROR"});
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  for (const v1::PeerInfo& p : response.peers()) {
    absl::string_view state = v1::PeerState_Name(p.state());
    absl::ConsumePrefix(&state, "PEER_STATE_");
    table.AddRow({p.address(), p.source(), absl::AsciiStrToLower(state), p.node_name(), p.version(),
                  p.last_seen_unix_ms() == 0 ? "-" : absl::StrFormat("%.2f ms", p.rtt_ms()),
                  p.last_seen_unix_ms() == 0
                      ? "never"
                      : absl::StrFormat("%.1f s ago", (now_ms - p.last_seen_unix_ms()) / 1000.0),
                  absl::StrCat(p.probes_ok()), absl::StrCat(p.probes_failed()),
                  p.row_links().empty() ? "-" : absl::StrJoin(p.row_links(), ","), p.last_error()});
  }
  return Print(out +
               (response.peers().empty() ? std::string("no peers (--peers)\n") : table.Render()));
}

int RunSequences(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "sequences";
  PARSE_OR_RETURN(parsed, args, {}, kCommand);
  DaemonClient client(parsed->options);
  v1::ListSequencesResponse response;  // every page's sequences
  v1::ListSequencesRequest request;
  do {
    v1::ListSequencesResponse page;
    auto ctx = client.Context();
    if (const grpc::Status status = client.stub().ListSequences(ctx.get(), request, &page);
        !status.ok()) {
      return CallFailed(kCommand, status);
    }
    for (v1::SequenceSummary& s : *page.mutable_sequences()) {
      *response.add_sequences() = std::move(s);
    }
    request.set_page_token(page.next_page_token());
  } while (!request.page_token().empty());
  if (parsed->options.json) return Print(ToJson(response));
  Table table({"SEQUENCE", "CLIENT", "CLIENT_NAME", "POSITIONS", "BLOCKS"});
  for (const v1::SequenceSummary& s : response.sequences()) {
    table.AddRow({s.sequence_id(), s.owner_client_id(), s.owner_client_name(),
                  absl::StrCat(s.num_positions()), absl::StrCat(s.num_blocks())});
  }
  return Print(table.Render());
}

int RunSequence(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "sequence";
  PARSE_OR_RETURN(parsed, args, (std::vector<std::string>{"id", "digest", "all_blocks"}), kCommand);
  absl::StatusOr<std::string> id = parsed->flags.Required("id");
  if (!id.ok()) return ReportError(kCommand, std::string(id.status().message()), kExitUsage);
  bool digest = false, all_blocks = false;
  for (const auto& [name, value] : {std::pair{"digest", &digest}, {"all_blocks", &all_blocks}}) {
    if (absl::Status s = parsed->flags.GetBool(name, value); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitUsage);
    }
  }
  DaemonClient client(parsed->options);
  v1::GetSequenceRequest request;
  request.set_sequence_id(*id);
  request.set_include_kv_digest(digest);
  v1::GetSequenceResponse response;
  auto ctx = client.Context();
  if (const grpc::Status status = client.stub().GetSequence(ctx.get(), request, &response);
      !status.ok()) {
    return CallFailed(kCommand, status);
  }
  const v1::SequenceInfo& s = response.sequence();
  if (parsed->options.json) return Print(ToJson(s));

  std::string out =
      absl::StrCat("sequence ", s.sequence_id(), " of client ", s.owner_client_id(), ": ",
                   s.num_positions(), " positions, ", s.layers_size(), " layers\n");
  if (!s.parent_sequence_id().empty()) {
    absl::StrAppend(&out, "forked from ", s.parent_sequence_id(), "\n");
  }
  absl::StrAppend(&out, "compression: ",
                  s.compressed() ? absl::StrCat("compressed by ", s.compression_policy()) : "none",
                  "\n");
  if (!s.busy().empty()) absl::StrAppend(&out, "busy: ", s.busy(), " in progress\n");
  std::vector<std::string> headers = {"LAYER",   "TOKENS",     "BLOCKS",     "KEPT",
                                      "STORAGE", "K_CODEBOOK", "V_CODEBOOK", "ARENA"};
  if (digest) headers.push_back("KV_DIGEST");
  headers.push_back("BLOCK_IDS");
  Table table(headers);
  constexpr int kShownBlocks = 12;
  for (int i = 0; i < s.layers_size(); ++i) {
    const v1::LayerBlockTable& l = s.layers(i);
    std::vector<uint32_t> ids(l.block_ids().begin(), l.block_ids().end());
    std::string id_text;
    if (!all_blocks && ids.size() > kShownBlocks) {
      id_text = absl::StrCat(absl::StrJoin(ids.begin(), ids.begin() + kShownBlocks, ","), ",... (",
                             ids.size(), ")");
    } else {
      id_text = absl::StrJoin(ids, ",");
    }
    const std::string storage =
        l.codebook() ? (l.parked() ? "codebook, parked" : "codebook") : "blocks";
    std::vector<std::string> row = {
        absl::StrCat(l.layer()),
        absl::StrCat(l.num_tokens()),
        absl::StrCat(l.block_ids_size()),
        i < s.kept_per_layer_size() ? absl::StrCat(s.kept_per_layer(i)) : "-",
        storage,
        l.codebook() ? absl::StrCat(l.key_codebook_size()) : "-",
        l.codebook() ? absl::StrCat(l.value_codebook_size()) : "-",
        HumanBytes(l.arena_bytes())};
    if (digest) row.push_back(absl::StrFormat("%016x", l.kv_digest()));
    row.push_back(id_text.empty() ? "-" : id_text);
    table.AddRow(std::move(row));
  }
  absl::StrAppend(&out, table.Render());
  return Print(out);
}

int RunWatch(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "watch";
  PARSE_OR_RETURN(parsed, args, (std::vector<std::string>{"types", "count", "for"}), kCommand);
  v1::WatchRequest request;
  if (std::optional<std::string> types = parsed->flags.Get("types"); types.has_value()) {
    for (absl::string_view name : absl::StrSplit(*types, ',', absl::SkipEmpty())) {
      v1::EventType type;
      if (!v1::EventType_Parse(absl::StrCat("EVENT_TYPE_", absl::AsciiStrToUpper(name)), &type) ||
          type == v1::EVENT_TYPE_UNSPECIFIED) {
        std::vector<std::string> known;
        for (int t = 1; v1::EventType_IsValid(t); ++t) {
          known.push_back(
              ShortEnumName(v1::EventType_Name(static_cast<v1::EventType>(t)), "EVENT_TYPE_"));
        }
        return ReportError(kCommand,
                           absl::StrCat("flag --types: unknown event type \"", name,
                                        "\" (known: ", absl::StrJoin(known, ", "), ")"),
                           kExitUsage);
      }
      request.add_types(type);
    }
  }
  uint32_t count = 0;  // 0: until the stream ends
  if (absl::Status s = parsed->flags.GetUint32("count", &count); !s.ok()) {
    return ReportError(kCommand, std::string(s.message()), kExitUsage);
  }
  double for_seconds = 0;  // 0: no limit
  if (absl::Status s = parsed->flags.GetDouble("for", &for_seconds); !s.ok()) {
    return ReportError(kCommand, std::string(s.message()), kExitUsage);
  }
  if (for_seconds < 0) {
    return ReportError(kCommand, "flag --for must be >= 0 seconds", kExitUsage);
  }

  DaemonClient client(parsed->options);
  auto ctx = client.Context(/*deadline=*/false);
  if (for_seconds > 0) {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(for_seconds)));
  }
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader = client.stub().Watch(ctx.get(), request);
  const bool json = parsed->options.json;
  if (!json) {
    std::printf("%-12s %8s  %-20s %-34s %-24s %s\n", "TIME", "SEQ", "TYPE", "CLIENT", "SEQUENCE",
                "DETAIL");
    std::fflush(stdout);
  }
  uint32_t received = 0;
  v1::Event event;
  while ((count == 0 || received < count) && reader->Read(&event)) {
    ++received;
    if (json) {
      std::printf("%s\n", ToJson(event, /*indent=*/false).c_str());
    } else {
      const absl::Time t = absl::FromUnixMicros(static_cast<int64_t>(event.unix_micros()));
      std::printf("%-12s %8llu  %-20s %-34s %-24s %s\n",
                  absl::FormatTime("%H:%M:%E3S", t, absl::LocalTimeZone()).c_str(),
                  static_cast<unsigned long long>(event.seq()),
                  ShortEnumName(v1::EventType_Name(event.type()), "EVENT_TYPE_").c_str(),
                  event.client_id().c_str(), event.sequence_id().c_str(), event.detail().c_str());
    }
    std::fflush(stdout);
  }
  if (count != 0 && received == count) {
    ctx->TryCancel();
    reader->Finish();
    return kExitOk;
  }
  const grpc::Status status = reader->Finish();
  // The stream ends when the daemon shuts down (OK) or when --for runs out.
  if (status.ok() ||
      (for_seconds > 0 && status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)) {
    return count == 0 ? kExitOk
                      : ReportError(
                            kCommand,
                            absl::StrCat("stream ended after ", received, " of ", count, " events"),
                            kExitFailure);
  }
  return CallFailed(kCommand, status);
}

}  // namespace cachemgr::ctl
