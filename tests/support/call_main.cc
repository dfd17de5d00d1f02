// cachemgr_test_call: makes one gRPC call to a running cachemgrd and prints its outcome, so that
// black-box tests can call from another process (another uid, see ChildProcess::SpawnAs) and
// send what no typed client would (garbage bytes, a stolen token).
//
//   cachemgr_test_call --socket=PATH --method=Free --request='sequence_id: "a"'
//       [--operator_token_file=FILE] [--metadata=KEY=VALUE]
//   cachemgr_test_call --socket=PATH --method=/cachemgr.v1.CacheManager/Attach --raw_hex=ffff
//
// --method is a cachemgr.v1.CacheManager method name or a full "/package.Service/Method" path;
// --request is the request message in protobuf text format (looked up from the method's
// descriptor), --raw_hex sends those bytes instead. Prints two lines on stdout:
//   <STATUS_CODE> <message>
//   <response in one-line text format, or the escaped bytes for an unknown type>
// Exit status 0 when the call completed (whatever its status), 2 for bad flags.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/dynamic_message.h"
#include "google/protobuf/text_format.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"

namespace {

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

int Usage(const std::string& why) {
  std::fprintf(stderr, "cachemgr_test_call: %s\n", why.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // Link the descriptors the tool looks methods up in.
  (void)cachemgr::v1::AttachRequest::descriptor();
  (void)grpc::health::v1::HealthCheckRequest::descriptor();

  std::string socket, method, request_text, raw_hex, operator_token_file, metadata;
  bool have_request = false;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(
          "usage: cachemgr_test_call --socket=PATH --method=NAME|/pkg.Service/Method\n"
          "  [--request=TEXT_PROTO | --raw_hex=HEX] [--operator_token_file=FILE]\n"
          "  [--metadata=KEY=VALUE]\n"
          "Makes one gRPC call to a running cachemgrd and prints its status line, then the\n"
          "response in one-line text format (a tool for the black-box tests).\n",
          stdout);
      return 0;
    }
    const size_t eq = arg.find('=');
    if (!absl::StartsWith(arg, "--") || eq == absl::string_view::npos) {
      return Usage(absl::StrCat("unexpected argument \"", arg, "\""));
    }
    const std::string name(arg.substr(2, eq - 2));
    const std::string value(arg.substr(eq + 1));
    if (name == "socket") {
      socket = value;
    } else if (name == "method") {
      method = value;
    } else if (name == "request") {
      request_text = value;
      have_request = true;
    } else if (name == "raw_hex") {
      raw_hex = value;
    } else if (name == "operator_token_file") {
      operator_token_file = value;
    } else if (name == "metadata") {
      metadata = value;
    } else {
      return Usage(absl::StrCat("unknown flag --", name));
    }
  }
  if (socket.empty() || method.empty()) return Usage("--socket and --method are required");
  if (!absl::StartsWith(method, "/")) method = absl::StrCat("/cachemgr.v1.CacheManager/", method);

  // "/pkg.Service/Method" -> the method's descriptor (for the message types).
  std::string full = method.substr(1);
  full[full.find('/')] = '.';
  const google::protobuf::MethodDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(full);
  google::protobuf::DynamicMessageFactory factory;
  std::string payload;
  if (!raw_hex.empty()) {
    payload = absl::HexStringToBytes(raw_hex);
  } else if (descriptor != nullptr) {
    std::unique_ptr<google::protobuf::Message> request(
        factory.GetPrototype(descriptor->input_type())->New());
    if (have_request &&
        !google::protobuf::TextFormat::ParseFromString(request_text, request.get())) {
      return Usage(
          absl::StrCat("--request does not parse as ", descriptor->input_type()->full_name()));
    }
    payload = request->SerializeAsString();
  } else if (have_request) {
    return Usage(absl::StrCat("unknown method ", method, "; use --raw_hex"));
  }

  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  grpc::GenericStub stub(
      grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!operator_token_file.empty()) {
    std::ifstream in(operator_token_file);
    std::stringstream token;
    token << in.rdbuf();
    if (!in) return Usage(absl::StrCat("cannot read ", operator_token_file));
    ctx.AddMetadata("x-cachemgr-operator", std::string(absl::StripAsciiWhitespace(token.str())));
  }
  if (!metadata.empty()) {
    const size_t eq = metadata.find('=');
    if (eq == std::string::npos) return Usage("--metadata must be KEY=VALUE");
    ctx.AddMetadata(metadata.substr(0, eq), metadata.substr(eq + 1));
  }
  grpc::Slice slice(payload);
  grpc::ByteBuffer request_bytes(&slice, 1);
  grpc::ByteBuffer response_bytes;
  grpc::Status status;
  // Completed on this thread through a completion queue (the callback API would finish it on a
  // gRPC thread, a handoff ThreadSanitizer cannot see inside uninstrumented libgrpc).
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&ctx, method, request_bytes, &cq);
  call->StartCall();
  call->Finish(&response_bytes, &status, &cq);
  void* tag = nullptr;
  bool ok = false;
  if (!cq.Next(&tag, &ok) || tag != &cq || !ok) {
    std::fprintf(stderr, "the call did not complete\n");
    return 1;
  }

  std::string response;
  if (status.ok()) {
    std::vector<grpc::Slice> slices;
    (void)response_bytes.Dump(&slices);
    std::string bytes;
    for (const grpc::Slice& s : slices) bytes.append(s.begin(), s.end());
    if (descriptor != nullptr) {
      std::unique_ptr<google::protobuf::Message> message(
          factory.GetPrototype(descriptor->output_type())->New());
      message->ParseFromString(bytes);
      response = message->ShortDebugString();
    } else {
      response = absl::CEscape(bytes);
    }
  }
  std::printf("%s %s\n%s\n", CodeName(status.error_code()), status.error_message().c_str(),
              response.c_str());
  return 0;
}
