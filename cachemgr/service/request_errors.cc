#include "cachemgr/service/request_errors.h"

#include <atomic>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "cachemgr/util/log.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/stubs/logging.h"
#include "grpc/support/log.h"
#include "grpcpp/support/interceptor.h"

namespace cachemgr {
namespace {

using grpc::experimental::InterceptionHookPoints;

// "/cachemgr.v1.CacheManager/Attach" -> "cachemgr.v1.AttachRequest" (the method's input type in
// the generated descriptor pool); empty when the method is unknown.
std::string RequestTypeName(absl::string_view grpc_method) {
  if (!absl::ConsumePrefix(&grpc_method, "/")) return "";
  std::string full(grpc_method);
  const size_t slash = full.find('/');
  if (slash == std::string::npos) return "";
  full[slash] = '.';
  const google::protobuf::MethodDescriptor* method =
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(full);
  return method == nullptr ? "" : method->input_type()->full_name();
}

class UnparseableRequestInterceptor final : public grpc::experimental::Interceptor {
 public:
  // gRPC creates the interceptor on one thread and may run its hook points on others, ordered
  // by gRPC's own code, which sanitizers do not see. The release store publishes what the
  // constructor wrote to every later acquire load, wherever it runs: the handoff is visible.
  explicit UnparseableRequestInterceptor(const char* method) : method_(method) {
    unparseable_.store(false, std::memory_order_release);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    bool unparseable = unparseable_.load(std::memory_order_acquire);
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      unparseable = true;
      unparseable_.store(true, std::memory_order_release);
    }
    if (unparseable &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status sent = methods->GetSendStatus();
      // Only the status gRPC's handler substitutes for the failed deserialization.
      if (sent.error_code() == grpc::StatusCode::UNIMPLEMENTED && sent.error_message().empty()) {
        const std::string type = RequestTypeName(method_);
        methods->ModifySendStatus(
            grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, UnparseableRequestMessage(type)));
        Log(LogLevel::kDebug, "unparseable request", {{"method", method_}});
      }
    }
    methods->Proceed();
  }

 private:
  const char* const method_;
  std::atomic<bool> unparseable_;
};

class UnparseableRequestInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    if (info->method() == nullptr || !absl::StartsWith(info->method(), "/cachemgr.")) {
      return nullptr;
    }
    return new UnparseableRequestInterceptor(info->method());
  }
};

void ProtobufLogHandler(google::protobuf::LogLevel level, const char* filename, int line,
                        const std::string& message) {
  const LogLevel ours = level == google::protobuf::LOGLEVEL_INFO      ? LogLevel::kInfo
                        : level == google::protobuf::LOGLEVEL_WARNING ? LogLevel::kWarning
                                                                      : LogLevel::kError;
  Log(ours, message,
      {{"source", "protobuf"}, {"file", filename == nullptr ? "" : filename}, {"line", line}});
}

void GrpcLogFunction(gpr_log_func_args* args) {
  const LogLevel ours = args->severity == GPR_LOG_SEVERITY_DEBUG  ? LogLevel::kDebug
                        : args->severity == GPR_LOG_SEVERITY_INFO ? LogLevel::kInfo
                                                                  : LogLevel::kError;
  Log(ours, args->message == nullptr ? "" : args->message,
      {{"source", "grpc"},
       {"file", args->file == nullptr ? "" : args->file},
       {"line", args->line}});
}

}  // namespace

std::string UnparseableRequestMessage(absl::string_view request_type) {
  return absl::StrCat("request is not a valid ",
                      request_type.empty() ? "request message" : request_type,
                      " (the bytes do not parse as that protobuf message, or a string field is "
                      "not valid UTF-8)");
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeUnparseableRequestInterceptorFactory() {
  return std::make_unique<UnparseableRequestInterceptorFactory>();
}

void RouteLibraryLogsToJson() {
  google::protobuf::SetLogHandler(&ProtobufLogHandler);
  gpr_set_log_function(&GrpcLogFunction);
}

}  // namespace cachemgr
