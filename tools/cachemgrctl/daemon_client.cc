#include "tools/cachemgrctl/daemon_client.h"

#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace cachemgr::ctl {
namespace {

constexpr char kDefaultSocket[] = "/run/cachemgr/cachemgr.sock";

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

}  // namespace

std::vector<std::string> DaemonFlagNames() {
  return {"socket", "address", "token_file", "timeout", "json"};
}

absl::StatusOr<DaemonOptions> ParseDaemonOptions(const Flags& flags) {
  DaemonOptions options;
  if (flags.Has("socket") && flags.Has("address")) {
    return absl::InvalidArgumentError("flags --socket and --address exclude each other");
  }
  if (flags.Has("address")) {
    options.target = *flags.Get("address");
    if (options.target.empty()) return absl::InvalidArgumentError("flag --address is empty");
    if (!flags.Has("token_file")) {
      return absl::InvalidArgumentError(
          "flag --address needs --token_file (TCP callers authenticate with a bearer token)");
    }
  } else {
    std::string socket = kDefaultSocket;
    if (const char* env = std::getenv("CACHEMGR_SOCKET"); env != nullptr && *env != '\0') {
      socket = env;
    }
    if (flags.Has("socket")) socket = *flags.Get("socket");
    if (socket.empty()) return absl::InvalidArgumentError("flag --socket is empty");
    options.target = "unix:" + socket;
  }
  if (flags.Has("token_file")) {
    const std::string path = *flags.Get("token_file");
    std::ifstream in(path);
    if (!in || !std::getline(in, options.token)) {
      return absl::InvalidArgumentError(absl::StrCat("flag --token_file: cannot read ", path));
    }
    absl::StripAsciiWhitespace(&options.token);
    if (options.token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("flag --token_file: ", path, " is empty"));
    }
  }
  double timeout_s = 10;
  if (absl::Status s = flags.GetDouble("timeout", &timeout_s); !s.ok()) return s;
  if (!(timeout_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --timeout must be > 0 seconds, got ", *flags.Get("timeout")));
  }
  options.timeout = absl::Seconds(timeout_s);
  if (absl::Status s = flags.GetBool("json", &options.json); !s.ok()) return s;
  return options;
}

absl::StatusOr<DaemonCommandArgs> ParseDaemonCommand(const std::vector<std::string>& args,
                                                     std::vector<std::string> own,
                                                     const std::string& command) {
  for (std::string& name : DaemonFlagNames()) own.push_back(std::move(name));
  absl::StatusOr<Flags> flags = Flags::Parse(args, own, command);
  if (!flags.ok()) return flags.status();
  absl::StatusOr<DaemonOptions> options = ParseDaemonOptions(*flags);
  if (!options.ok()) return options.status();
  return DaemonCommandArgs{*std::move(flags), *std::move(options)};
}

DaemonClient::DaemonClient(const DaemonOptions& options) : options_(options) {
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(options.target, grpc::InsecureChannelCredentials());
  stub_ = v1::CacheManager::NewStub(channel);
  health_ = grpc::health::v1::Health::NewStub(channel);
}

std::unique_ptr<grpc::ClientContext> DaemonClient::Context(bool deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (deadline) ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  return ctx;
}

std::string StatusText(const grpc::Status& status) {
  return absl::StrCat(CodeName(status.error_code()), ": ", status.error_message());
}

std::string ToJson(const google::protobuf::Message& message, bool indent) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = indent;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!indent) {
    return out;
  }
  if (out.empty() || out.back() != '\n') out += '\n';
  return out;
}

}  // namespace cachemgr::ctl
