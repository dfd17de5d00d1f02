#include "cachemgr/service/health_probe.h"

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace cachemgr {

HealthProbe::HealthProbe(HealthProbeOptions options, OnChange on_change)
    : options_(std::move(options)), on_change_(std::move(on_change)) {}

std::unique_ptr<HealthProbe> HealthProbe::Start(const HealthProbeOptions& options,
                                                OnChange on_change) {
  std::unique_ptr<HealthProbe> probe(new HealthProbe(options, std::move(on_change)));
  probe->thread_ = std::thread(&HealthProbe::Run, probe.get());
  return probe;
}

HealthProbe::~HealthProbe() { Stop(); }

void HealthProbe::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

std::string HealthProbe::ProbeOnce() const {
  grpc::ChannelArguments args;
  // A new connection every time (not one shared with earlier probes), so the probe exercises
  // accept() the way a new client does.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  auto channel = grpc::CreateCustomChannel("unix:" + options_.socket_path,
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&ctx, request, &response);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
      status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::StrCat(
        "health check over unix:", options_.socket_path, " failed: ",
        status.error_code() == grpc::StatusCode::UNAVAILABLE ? "UNAVAILABLE" : "DEADLINE_EXCEEDED",
        ": ", status.error_message());
  }
  return "";
}

void HealthProbe::Run() {
  uint32_t failures = 0;
  bool serving = true;
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) {
    const std::string failure = ProbeOnce();
    if (stop_.HasBeenNotified()) return;
    if (failure.empty()) {
      failures = 0;
      if (!serving) {
        serving = true;
        on_change_(true, "");
      }
      continue;
    }
    if (++failures >= options_.failures_to_unserve && serving) {
      serving = false;
      on_change_(false, failure);
    }
  }
}

}  // namespace cachemgr
