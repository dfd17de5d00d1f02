// The daemon commands that change state, by hand: free and compress --sequence.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tools/cachemgrctl/commands.h"
#include "tools/cachemgrctl/daemon_client.h"
#include "tools/cachemgrctl/json_output.h"
#include "tools/cachemgrctl/table.h"

namespace cachemgr::ctl {

int RunFree(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "free";
  absl::StatusOr<DaemonCommandArgs> parsed = ParseDaemonCommand(args, {"sequence"}, kCommand);
  if (!parsed.ok())
    return ReportError(kCommand, std::string(parsed.status().message()), kExitUsage);
  absl::StatusOr<std::string> sequence = parsed->flags.Required("sequence");
  if (!sequence.ok()) {
    return ReportError(kCommand, std::string(sequence.status().message()), kExitUsage);
  }
  DaemonClient client(parsed->options);
  v1::FreeRequest request;
  request.set_sequence_id(*sequence);
  v1::FreeResponse response;
  auto ctx = client.Context();
  if (const grpc::Status status = client.stub().Free(ctx.get(), request, &response); !status.ok()) {
    return ReportError(kCommand, StatusText(status), kExitFailure);
  }
  if (parsed->options.json) {
    const std::string json =
        DumpJson({{"sequence_id", *sequence}, {"blocks_released", response.blocks_released()}});
    std::fputs(json.c_str(), stdout);
  } else {
    std::printf("freed %s: %llu blocks released\n", sequence->c_str(),
                static_cast<unsigned long long>(response.blocks_released()));
  }
  return kExitOk;
}

int RunDaemonCompress(const std::vector<std::string>& args) {
  constexpr char kCommand[] = "compress";
  absl::StatusOr<DaemonCommandArgs> parsed = ParseDaemonCommand(
      args, {"sequence", "policy", "reserve_ratio", "byte_ratio", "sinks", "theta_k", "theta_v"},
      kCommand);
  if (!parsed.ok())
    return ReportError(kCommand, std::string(parsed.status().message()), kExitUsage);
  const Flags& flags = parsed->flags;
  absl::StatusOr<std::string> sequence = flags.Required("sequence");
  if (!sequence.ok()) {
    return ReportError(kCommand, std::string(sequence.status().message()), kExitUsage);
  }
  if (flags.Has("reserve_ratio") && flags.Has("byte_ratio")) {
    return ReportError(kCommand, "flags --reserve_ratio and --byte_ratio exclude each other",
                       kExitUsage);
  }
  v1::CompressRequest request;
  request.set_sequence_id(*sequence);
  request.set_input(v1::INPUT_SOURCE_NONE);  // operator calls read no inputs
  request.mutable_policy()->set_preset(flags.Get("policy").value_or(""));
  double ratio = 0.2;
  if (flags.Has("byte_ratio")) {
    if (absl::Status s = flags.GetDouble("byte_ratio", &ratio); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitUsage);
    }
    request.set_byte_ratio(ratio);
  } else {
    if (absl::Status s = flags.GetDouble("reserve_ratio", &ratio); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitUsage);
    }
    request.set_reserve_ratio(ratio);
  }
  if (flags.Has("sinks")) {
    uint32_t sinks = 0;
    if (absl::Status s = flags.GetUint32("sinks", &sinks); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitUsage);
    }
    request.mutable_policy()->set_sinks(sinks);
  }
  for (const char* name : {"theta_k", "theta_v"}) {
    if (!flags.Has(name)) continue;
    float theta = 0;
    if (absl::Status s = flags.GetFloat(name, &theta); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitUsage);
    }
    if (std::string(name) == "theta_k") {
      request.mutable_policy()->set_theta_k(theta);
    } else {
      request.mutable_policy()->set_theta_v(theta);
    }
  }

  DaemonClient client(parsed->options);
  v1::CompressResponse response;
  auto ctx = client.Context();
  if (const grpc::Status status = client.stub().Compress(ctx.get(), request, &response);
      !status.ok()) {
    return ReportError(kCommand, StatusText(status), kExitFailure);
  }
  if (parsed->options.json) {
    std::fputs(ToJson(response).c_str(), stdout);
    return kExitOk;
  }
  std::string out = absl::StrFormat(
      "compressed %s: %s -> %s (honest ratio %.3f, reserve ratio %.3f), %u blocks released\n",
      *sequence, HumanBytes(response.bytes_before()), HumanBytes(response.bytes_after()),
      response.honest_ratio(), response.reserve_ratio(), response.blocks_released());
  Table table({"LAYER", "KEPT_PER_HEAD", "ROWS", "BLOCKS", "STORAGE", "K_CODEBOOK", "V_CODEBOOK",
               "BYTES_HELD"});
  for (const v1::CompressedLayer& l : response.layers()) {
    table.AddRow(
        {absl::StrCat(l.layer()), absl::StrCat(l.kept_per_head()), absl::StrCat(l.num_tokens()),
         absl::StrCat(l.block_ids_size()), l.codebook() ? "codebook" : "blocks",
         l.codebook() ? absl::StrCat(l.key_codebook_size()) : "-",
         l.codebook() ? absl::StrCat(l.value_codebook_size()) : "-", HumanBytes(l.bytes_held())});
  }
  absl::StrAppend(&out, table.Render());
  std::fputs(out.c_str(), stdout);
  return kExitOk;
}

}  // namespace cachemgr::ctl
