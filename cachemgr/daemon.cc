#include "cachemgr/daemon.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cachemgr/backend/host_backend.h"
#if defined(CACHEMGR_HAVE_CUDA_BACKEND)
#include "cachemgr/backend/cuda_backend.h"
#endif
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace cachemgr {
namespace {

constexpr char kVersion[] = "0.1.0";
constexpr char kServiceName[] = "cachemgr.v1.CacheManager";

// True when something accepts connections on the Unix socket at `path`.
bool SomeoneListens(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  return connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
}

// Refuses to start over a live daemon; removes a stale socket a crashed daemon left behind.
absl::Status PrepareSocketPath(const std::string& path, const char* flag) {
  const std::filesystem::path p(path);
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : ".";
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": directory ", dir.string(), " does not exist"));
  }
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(flag, ": ", path, " exists and is not a socket; not replacing it"));
    }
    if (SomeoneListens(path)) {
      return absl::FailedPreconditionError(
          absl::StrCat(flag, ": another process is serving on ", path));
    }
    unlink(path.c_str());
  }
  return absl::OkStatus();
}

// Linking grpc++_reflection registers its plugin with every ServerBuilder (a static
// initializer), so --reflection=false has to take it out again.
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
      return plugin->name() == "proto_server_reflection";
    });
  }
};

absl::StatusOr<std::unique_ptr<DeviceBackend>> MakeBackend(const DaemonConfig& config) {
  if (config.backend == "host") return std::make_unique<HostBackend>();
#if defined(CACHEMGR_HAVE_CUDA_BACKEND)
  CudaBackendOptions options;
  options.device = config.cuda_device;
  options.share_method =
      config.cuda_share == "ipc_handle" ? ShareMethod::kCudaIpcHandle : ShareMethod::kCudaVmmFd;
  ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(options));
  return std::unique_ptr<DeviceBackend>(std::move(cuda));
#else
  return absl::FailedPreconditionError(
      "--backend=cuda: this cachemgrd was built without CUDA (configure with -DCACHEMGR_CUDA=ON)");
#endif
}

}  // namespace

Daemon::Daemon(const DaemonConfig& config) : config_(config) {}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonConfig& config) {
  std::unique_ptr<Daemon> d(new Daemon(config));
  RETURN_IF_ERROR(PrepareSocketPath(config.socket_path, "--socket"));

  ASSIGN_OR_RETURN(d->backend_, MakeBackend(config));
  d->manager_ =
      std::make_unique<CacheManager>(config.manager, d->backend_.get(), &d->clock_, &d->events_);

  // The share channel calls the resolver on its single serving thread and sends the returned
  // descriptors before the next call, so holding the last batch here keeps them open exactly
  // as long as needed, even if the pool is released meanwhile.
  ASSIGN_OR_RETURN(
      d->share_server_,
      ShareChannelServer::Start(
          config.share_socket_path,
          [daemon = d.get()](const std::string& token) -> absl::StatusOr<std::vector<int>> {
            ASSIGN_OR_RETURN(daemon->shared_fds_in_flight_, daemon->manager_->ShareFds(token));
            std::vector<int> fds;
            for (const UniqueFd& fd : daemon->shared_fds_in_flight_) {
              fds.push_back(fd.get());
            }
            return fds;
          }));

  d->metrics_ = std::make_unique<Metrics>(d->manager_.get(), &d->events_, kVersion);
  d->service_ = std::make_unique<CacheManagerService>(
      d->manager_.get(), &d->events_, config.share_socket_path, config.tcp_token, kVersion,
      config.worker_threads, d->metrics_.get());
  int metrics_port = 0;
  if (!config.metrics_address.empty()) {
    ASSIGN_OR_RETURN(d->metrics_server_,
                     MetricsEndpoint::Start(config.metrics_address, d->metrics_->collectables()));
    metrics_port = d->metrics_server_->port();
  }

  grpc::EnableDefaultHealthCheckService(config.enable_health);
  if (config.enable_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.enable_reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.AddListeningPort("unix:" + config.socket_path, grpc::InsecureServerCredentials());
  int tcp_port = 0;
  if (!config.tcp_address.empty()) {
    // Callers over TCP authenticate with the bearer token (checked per call by the service).
    builder.AddListeningPort(config.tcp_address, grpc::InsecureServerCredentials(), &tcp_port);
  }
  builder.RegisterService(d->service_.get());
  builder.SetMaxReceiveMessageSize(16 << 20);
  // The socket is created inside BuildAndStart: a umask makes it 0600 from its first moment.
  const mode_t old_umask = umask(0177);
  d->server_ = builder.BuildAndStart();
  umask(old_umask);
  if (d->server_ == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("gRPC server failed to listen on unix:", config.socket_path,
                     config.tcp_address.empty() ? "" : " or ", config.tcp_address));
  }
  if (!config.tcp_address.empty() && tcp_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("--tcp_address: cannot listen on ", config.tcp_address));
  }
  chmod(config.socket_path.c_str(), 0600);
  if (config.enable_health) {
    d->server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
    d->server_->GetHealthCheckService()->SetServingStatus(true);
  }
  d->reaper_ = std::thread([daemon = d.get()] { daemon->ReapLeases(); });

  Log(LogLevel::kInfo, "cachemgrd serving",
      {{"version", kVersion},
       {"boot_id", d->manager_->boot_id()},
       {"socket", config.socket_path},
       {"share_socket", config.share_socket_path},
       {"tcp", config.tcp_address.empty() ? std::string("off")
                                          : absl::StrCat(config.tcp_address, " port ", tcp_port)},
       {"metrics", config.metrics_address.empty()
                       ? std::string("off")
                       : absl::StrCat(config.metrics_address, " port ", metrics_port)},
       {"metrics_port", static_cast<uint64_t>(metrics_port)},
       {"backend", config.backend},
       {"device", d->backend_->device_name()},
       {"share_method", d->backend_->share_method() == ShareMethod::kMemfd ? "memfd"
                        : d->backend_->share_method() == ShareMethod::kCudaVmmFd
                            ? "cuda_vmm_fd"
                            : "cuda_ipc_handle"},
       {"memory_budget", config.manager.memory_budget_bytes},
       {"heartbeat_interval_ms", absl::ToInt64Milliseconds(config.manager.heartbeat_interval)},
       {"lease_timeout_ms", absl::ToInt64Milliseconds(config.manager.lease_timeout)},
       {"config", config.config_file.empty() ? std::string("none") : config.config_file}});
  return d;
}

void Daemon::ReapLeases() {
  // Check often enough that a lease ends within ~10% of its timeout.
  const absl::Duration tick = std::clamp(config_.manager.lease_timeout / 10, absl::Milliseconds(5),
                                         absl::Milliseconds(250));
  while (!shutdown_requested_.WaitForNotificationWithTimeout(tick)) {
    manager_->ExpireLeases();
  }
}

void Daemon::RequestShutdown() {
  if (!shutdown_requested_.HasBeenNotified()) shutdown_requested_.Notify();
}

void Daemon::Wait() {
  shutdown_requested_.WaitForNotification();
  Shutdown();
}

void Daemon::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  RequestShutdown();
  if (server_ == nullptr) {
    // Start() failed before listening: nothing of ours is on the socket path (it may well be
    // another daemon's), so only the members' destructors have work to do.
    if (reaper_.joinable()) reaper_.join();
    return;
  }
  Log(LogLevel::kInfo, "shutting down",
      {{"grace_ms", absl::ToInt64Milliseconds(config_.shutdown_grace)}});
  if (config_.enable_health) {
    server_->GetHealthCheckService()->SetServingStatus(false);
  }
  // Refuse new calls, end Watch streams, let in-flight calls deliver their status; then close
  // every connection at once (an idle client connection would otherwise hold Shutdown until
  // its deadline).
  service_->BeginDrain();
  manager_->BeginShutdown();  // Compress / Fetch / Park in flight stop at their next layer
  events_.Close();
  const bool idle = service_->WaitIdle(config_.shutdown_grace);
  if (!idle) Log(LogLevel::kWarning, "grace period over: cancelling calls still in flight");
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  share_server_->Stop();
  if (metrics_server_ != nullptr) metrics_server_->Stop();
  if (reaper_.joinable()) reaper_.join();
  const StatsSnapshot before = manager_->Stats();
  manager_->Shutdown();
  unlink(config_.socket_path.c_str());
  Log(LogLevel::kInfo, "cachemgrd stopped",
      {{"clients_detached", static_cast<uint64_t>(before.clients.size())},
       {"bytes_released", before.memory_used_bytes}});
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace cachemgr
