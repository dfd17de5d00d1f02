#include "tools/cachemgrctl/daemon_client.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "cachemgr/service/operator_token.h"
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
  return {"socket", "address",     "token_file",    "timeout",      "json",
          "tls",    "tls_ca_file", "tls_cert_file", "tls_key_file", "operator_token_file"};
}

// The first line of `path`, whitespace stripped; INVALID_ARGUMENT naming `flag`.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path, const char* flag) {
  std::ifstream in(path);
  std::string token;
  if (!in || !std::getline(in, token)) {
    return absl::InvalidArgumentError(absl::StrCat("flag --", flag, ": cannot read ", path));
  }
  absl::StripAsciiWhitespace(&token);
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("flag --", flag, ": ", path, " is empty"));
  }
  return token;
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
    absl::StatusOr<std::string> token = ReadTokenFile(*flags.Get("token_file"), "token_file");
    if (!token.ok()) return token.status();
    options.token = *std::move(token);
  }
  if (absl::Status s = flags.GetBool("tls", &options.tls); !s.ok()) return s;
  for (const auto& [flag, pem] : {std::pair{"tls_ca_file", &options.tls_ca_pem},
                                  std::pair{"tls_cert_file", &options.tls_cert_pem},
                                  std::pair{"tls_key_file", &options.tls_key_pem}}) {
    if (!flags.Has(flag)) continue;
    std::ifstream in(*flags.Get(flag));
    std::stringstream buf;
    buf << in.rdbuf();
    *pem = buf.str();
    if (pem->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", flag, ": cannot read ", *flags.Get(flag)));
    }
    options.tls = true;
  }
  if (options.tls && !flags.Has("address")) {
    return absl::InvalidArgumentError("TLS flags apply to --address (TCP) only");
  }
  if (flags.Has("tls_cert_file") != flags.Has("tls_key_file")) {
    return absl::InvalidArgumentError("flags --tls_cert_file and --tls_key_file go together");
  }
  if (flags.Has("operator_token_file")) {
    absl::StatusOr<std::string> token =
        ReadTokenFile(*flags.Get("operator_token_file"), "operator_token_file");
    if (!token.ok()) return token.status();
    options.operator_token = *std::move(token);
  } else if (!flags.Has("address")) {
    // The daemon's default place; a user who cannot read it simply has no operator rights.
    absl::StatusOr<std::string> token =
        ReadTokenFile(DefaultOperatorTokenPath(options.target.substr(5)), "operator_token_file");
    if (token.ok()) options.operator_token = *std::move(token);
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
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_ca_pem;
    ssl.pem_cert_chain = options.tls_cert_pem;
    ssl.pem_private_key = options.tls_key_pem;
    credentials = grpc::SslCredentials(ssl);
  }
  std::shared_ptr<grpc::Channel> channel = grpc::CreateChannel(options.target, credentials);
  stub_ = v1::CacheManager::NewStub(channel);
  health_ = grpc::health::v1::Health::NewStub(channel);
}

std::unique_ptr<grpc::ClientContext> DaemonClient::Context(bool deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (deadline) ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  if (!options_.operator_token.empty()) {
    ctx->AddMetadata(kOperatorMetadataKey, options_.operator_token);
  }
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
