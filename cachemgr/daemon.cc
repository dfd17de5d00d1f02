#include "cachemgr/daemon.h"

#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cachemgr/backend/host_backend.h"
#if defined(CACHEMGR_HAVE_CUDA_BACKEND)
#include "cachemgr/backend/cuda_backend.h"
#include "cachemgr/peers/nccl_row_link.h"
#endif
#include "cachemgr/peers/sequence_sender.h"
#include "cachemgr/peers/socket_row_link.h"
#include "cachemgr/service/peer_service.h"
#include "cachemgr/service/request_errors.h"
#include "cachemgr/service/tcp_security.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/server_posix.h"

namespace cachemgr {
namespace {

constexpr char kVersion[] = "0.1.0";
constexpr char kServiceName[] = "cachemgr.v1.CacheManager";

// Descriptors the daemon needs besides its clients' (about 20 when idle: gRPC's epoll and
// wakeup pipes, the listeners, metrics, logs, lock files), with headroom for transient ones.
constexpr uint64_t kReservedDescriptors = 64;
// Each attached client holds its Compress input buffer's memfd, and may have created a pool
// (one region descriptor).
constexpr uint64_t kDescriptorsPerClient = 2;

// Raises the soft descriptor limit to the hard one (an attach flood must meet the client caps,
// not EMFILE) and checks that max_clients fits under it. Connections are checked softly: a
// limit that cannot hold max_connections as well only gets a warning, since the accept loop
// survives EMFILE (it backs off) and the health probe reports a listener that stays stuck.
absl::Status RaiseDescriptorLimit(const DaemonConfig& config) {
  rlimit limit = {};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return absl::InternalError(absl::StrCat("getrlimit(RLIMIT_NOFILE): ", std::strerror(errno)));
  }
  const rlim_t before = limit.rlim_cur;
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = limit;
    raised.rlim_cur = limit.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  const uint64_t for_clients =
      kReservedDescriptors + kDescriptorsPerClient * uint64_t{config.manager.max_clients};
  const uint64_t with_connections = for_clients + config.max_connections;
  Log(LogLevel::kInfo, "descriptor limit",
      {{"soft_before", static_cast<uint64_t>(before)},
       {"soft", static_cast<uint64_t>(limit.rlim_cur)},
       {"hard", static_cast<uint64_t>(limit.rlim_max)},
       {"needed", with_connections}});
  if (limit.rlim_cur == RLIM_INFINITY) return absl::OkStatus();
  if (limit.rlim_cur < for_clients) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the descriptor limit (RLIMIT_NOFILE ", limit.rlim_cur, ", hard ", limit.rlim_max,
        ") is below the ", for_clients, " that --max_clients=", config.manager.max_clients,
        " needs (", kReservedDescriptors, " + ", kDescriptorsPerClient,
        " per client): raise the limit (systemd: LimitNOFILE=) or lower --max_clients"));
  }
  if (limit.rlim_cur < with_connections) {
    Log(LogLevel::kWarning,
        "the descriptor limit cannot hold --max_connections as well: connections may run out "
        "of descriptors (the socket then waits for free ones, and health reports it)",
        {{"limit", static_cast<uint64_t>(limit.rlim_cur)},
         {"max_clients", config.manager.max_clients},
         {"max_connections", config.max_connections},
         {"needed", with_connections}});
  }
  return absl::OkStatus();
}

// True when something accepts connections on the Unix socket at `path`.
bool SomeoneListens(const std::string& path, int type = SOCK_STREAM) {
  UniqueFd fd(socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  return connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
}

// INVALID_ARGUMENT naming `flag` when the directory `path` goes in does not exist.
absl::Status CheckDirectory(const std::string& path, const char* flag) {
  const std::filesystem::path p(path);
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : ".";
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": directory ", dir.string(), " does not exist"));
  }
  return absl::OkStatus();
}

// Refuses to start over a live daemon (one of a version without lock files included); removes
// a stale socket a crashed daemon left behind.
absl::Status PrepareSocketPath(const std::string& path, const char* flag, int type) {
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(flag, ": ", path, " exists and is not a socket; not replacing it"));
    }
    if (SomeoneListens(path, type)) {
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

// The row link kinds of --row_links (validated), in its order; null for none.
absl::StatusOr<std::unique_ptr<RowLinks>> MakeRowLinks(
    const DaemonConfig& config, const std::vector<std::unique_ptr<DeviceBackend>>& backends) {
  if (config.row_links.empty()) return nullptr;
  std::vector<std::unique_ptr<RowLinkKind>> kinds;
  for (const std::string& kind : config.row_links) {
    if (kind == "socket") {
      kinds.push_back(NewSocketRowLinkKind(config.row_link_host));
      continue;
    }
#if defined(CACHEMGR_HAVE_CUDA_BACKEND)
    std::vector<NcclDevice> devices;
    for (const auto& b : backends) {
      if (const auto* cuda = dynamic_cast<const CudaBackend*>(b.get())) {
        devices.push_back(NcclDevice{cuda->ordinal(), cuda->device_name()});
      }
    }
    kinds.push_back(NewNcclRowLinkKind(std::move(devices)));
#else
    (void)backends;
    return absl::InvalidArgumentError(
        "--row_links=nccl needs a CUDA build of cachemgrd (-DCACHEMGR_CUDA=ON)");
#endif
  }
  return std::make_unique<RowLinks>(std::move(kinds), config.row_link_chunk_bytes);
}

// The daemon's devices: the host, or each GPU --cuda_device names (distinct devices).
absl::StatusOr<std::vector<std::unique_ptr<DeviceBackend>>> MakeBackends(
    const DaemonConfig& config) {
  std::vector<std::unique_ptr<DeviceBackend>> backends;
  if (config.backend == "host") {
    backends.push_back(std::make_unique<HostBackend>());
    return backends;
  }
#if defined(CACHEMGR_HAVE_CUDA_BACKEND)
  for (absl::string_view device : absl::StrSplit(config.cuda_device, ',')) {
    CudaBackendOptions options;
    options.device = std::string(device);
    options.share_method =
        config.cuda_share == "ipc_handle" ? ShareMethod::kCudaIpcHandle : ShareMethod::kCudaVmmFd;
    ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(options));
    for (const auto& other : backends) {
      if (other->device_name() == cuda->device_name()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--cuda_device names GPU ", cuda->device_name(), " twice"));
      }
    }
    backends.push_back(std::move(cuda));
  }
  return backends;
#else
  return absl::FailedPreconditionError(
      "--backend=cuda: this cachemgrd was built without CUDA (configure with -DCACHEMGR_CUDA=ON)");
#endif
}

}  // namespace

Daemon::Daemon(const DaemonConfig& config) : config_(config) {}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonConfig& config) {
  std::unique_ptr<Daemon> d(new Daemon(config));
  RETURN_IF_ERROR(RaiseDescriptorLimit(config));
  // The locks make a second daemon refuse to start instead of taking over a live daemon's
  // sockets (the share socket too, which may be configured apart from the gRPC socket).
  RETURN_IF_ERROR(CheckDirectory(config.socket_path, "--socket"));
  RETURN_IF_ERROR(CheckDirectory(config.share_socket_path, "--share_socket"));
  RETURN_IF_ERROR(CheckDirectory(config.fast_socket_path, "--fast_socket"));
  ASSIGN_OR_RETURN(d->socket_lock_,
                   InstanceLock::Acquire(config.socket_path + ".lock", "--socket"));
  ASSIGN_OR_RETURN(d->share_socket_lock_,
                   InstanceLock::Acquire(config.share_socket_path + ".lock", "--share_socket"));
  ASSIGN_OR_RETURN(d->fast_socket_lock_,
                   InstanceLock::Acquire(config.fast_socket_path + ".lock", "--fast_socket"));
  RETURN_IF_ERROR(PrepareSocketPath(config.socket_path, "--socket", SOCK_STREAM));
  RETURN_IF_ERROR(PrepareSocketPath(config.share_socket_path, "--share_socket", SOCK_SEQPACKET));
  RETURN_IF_ERROR(PrepareSocketPath(config.fast_socket_path, "--fast_socket", SOCK_STREAM));

  ASSIGN_OR_RETURN(d->backends_, MakeBackends(config));
  std::vector<DeviceBackend*> backends;
  for (const auto& b : d->backends_) backends.push_back(b.get());
  d->manager_ =
      std::make_unique<CacheManager>(config.manager, std::move(backends), &d->clock_, &d->events_);
  d->peer_policy_ = std::make_unique<PeerPolicy>(geteuid(), config.allowed_uids, config.socket_gid);

  // The share channel calls the resolver on its single serving thread and sends the returned
  // descriptors before the next call, so holding the last batch here keeps them open exactly
  // as long as needed, even if the pool is released meanwhile.
  ASSIGN_OR_RETURN(
      d->share_server_,
      ShareChannelServer::Start(
          config.share_socket_path, d->peer_policy_.get(),
          [daemon = d.get()](const std::string& token,
                             const PeerCredentials& peer) -> absl::StatusOr<std::vector<int>> {
            Caller caller(token);
            caller.peer = peer;
            ASSIGN_OR_RETURN(daemon->shared_fds_in_flight_, daemon->manager_->ShareFds(caller));
            std::vector<int> fds;
            for (const UniqueFd& fd : daemon->shared_fds_in_flight_) {
              fds.push_back(fd.get());
            }
            return fds;
          }));
  // Both sockets: 0600 by default; 0660 for --socket_group's members; with --allowed_uids
  // 0666, since file modes cannot name single other users: the peer check (PeerPolicy) tells
  // who gets in, and closes everyone else's connections at once.
  const mode_t socket_mode = !config.allowed_uids.empty()    ? 0666
                             : config.socket_gid.has_value() ? 0660
                                                             : 0600;
  if ((config.socket_gid.has_value() &&
       chown(config.share_socket_path.c_str(), -1, *config.socket_gid) != 0) ||
      chmod(config.share_socket_path.c_str(), socket_mode) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot set the mode or group of ", config.share_socket_path, ": ", std::strerror(errno)));
  }
  ASSIGN_OR_RETURN(d->operator_token_,
                   OperatorToken::Create(config.operator_token_file, config.operator_gid));

  PeerListenerOptions listener_options;
  listener_options.path = config.socket_path;
  listener_options.mode = socket_mode;
  listener_options.group = config.socket_gid;
  listener_options.max_connections = config.max_connections;
  listener_options.max_connections_per_uid = config.max_connections_per_uid;
  d->peer_listener_ = std::make_unique<PeerListener>(listener_options, d->peer_policy_.get());
  listener_options.path = config.fast_socket_path;
  d->fast_listener_ = std::make_unique<PeerListener>(listener_options, d->peer_policy_.get());

  d->metrics_ = std::make_unique<Metrics>(d->manager_.get(), &d->events_, kVersion);
  TcpSecurityOptions security;
  security.bearer_token = config.tcp_token;
  security.cert_file = config.tls_cert_file;
  security.key_file = config.tls_key_file;
  security.client_ca_file = config.tls_client_ca_file;
  security.plaintext_loopback = config.tcp_plaintext_loopback;
  PeerDirectoryOptions peer_options;
  peer_options.sources = config.peers;
  peer_options.boot_id = d->manager_->boot_id();
  peer_options.node_name = config.node_name;
  peer_options.probe_interval = config.peer_probe_interval;
  peer_options.probe_deadline = std::min(config.peer_probe_interval, absl::Seconds(1));
  peer_options.bearer_token = config.tcp_token;
  peer_options.tls_server_name = config.peer_tls_server_name;
  if (!config.peers.empty()) {
    ASSIGN_OR_RETURN(peer_options.credentials,
                     MakePeerChannelCredentials(security, config.peer_ca_file));
  }
  d->peers_ = std::make_unique<PeerDirectory>(std::move(peer_options));
  d->service_ = std::make_unique<CacheManagerService>(
      d->manager_.get(), &d->events_, config.share_socket_path, config.fast_socket_path,
      d->peer_listener_.get(), d->operator_token_.get(), kVersion, config.worker_threads,
      d->metrics_.get());
  ASSIGN_OR_RETURN(d->row_links_, MakeRowLinks(config, d->backends_));
  d->service_->set_peers(d->peers_.get(), d->row_links_.get());
  d->peer_service_ = std::make_unique<PeerService>(
      d->manager_->boot_id(), kVersion, config.node_name, d->manager_.get(), d->row_links_.get());
  int metrics_port = 0;
  if (!config.metrics_address.empty()) {
    std::vector<std::weak_ptr<prometheus::Collectable>> collectables = d->metrics_->collectables();
    collectables.push_back(d->peers_->collectable());
    ASSIGN_OR_RETURN(d->metrics_server_,
                     MetricsEndpoint::Start(config.metrics_address, collectables));
    metrics_port = d->metrics_server_->port();
  }

  grpc::EnableDefaultHealthCheckService(config.enable_health);
  if (config.enable_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.enable_reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  int tcp_port = 0;
  if (!config.tcp_address.empty()) {
    ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                     MakeTcpServerCredentials(security));
    builder.AddListeningPort(config.tcp_address, credentials, &tcp_port);
  }
  builder.RegisterService(d->service_.get());
  builder.RegisterService(d->peer_service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(kMaxPeerMessageBytes));
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeUnparseableRequestInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  d->server_ = builder.BuildAndStart();
  if (d->server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("gRPC server failed to start",
                                               config.tcp_address.empty() ? "" : " on ",
                                               config.tcp_address));
  }
  if (!config.tcp_address.empty() && tcp_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("--tcp_address: cannot listen on ", config.tcp_address));
  }
  if (config.enable_health) {
    d->server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
    d->server_->GetHealthCheckService()->SetServingStatus(true);
  }
  d->reaper_ = std::thread([daemon = d.get()] { daemon->ReapLeases(); });
  if (config.health_probe_interval > absl::ZeroDuration()) {
    HealthProbeOptions probe;
    probe.socket_path = config.socket_path;
    probe.interval = config.health_probe_interval;
    probe.deadline = std::max(config.health_probe_interval, absl::Seconds(1));
    probe.failures_to_unserve = config.health_probe_failures;
    d->health_probe_ =
        HealthProbe::Start(probe, [daemon = d.get()](bool serving, const std::string& why) {
          daemon->OnServingChanged(serving, why);
        });
  }

  std::string tcp = "off";
  if (!config.tcp_address.empty()) {
    tcp = absl::StrCat(config.tcp_address, " port ", tcp_port,
                       config.tcp_plaintext_loopback        ? " plaintext (loopback)"
                       : !config.tls_client_ca_file.empty() ? " mutual TLS"
                                                            : " TLS");
  }
  Log(LogLevel::kInfo, "cachemgrd serving",
      {{"version", kVersion},
       {"boot_id", d->manager_->boot_id()},
       {"socket", config.socket_path},
       {"share_socket", config.share_socket_path},
       {"fast_socket", config.fast_socket_path},
       {"allowed_peers", d->peer_policy_->Describe()},
       {"operator_token_file", config.operator_token_file},
       {"tcp", tcp},
       {"node_name", config.node_name},
       {"peers", static_cast<uint64_t>(config.peers.size())},
       {"metrics", config.metrics_address.empty()
                       ? std::string("off")
                       : absl::StrCat(config.metrics_address, " port ", metrics_port)},
       {"metrics_port", static_cast<uint64_t>(metrics_port)},
       {"backend", config.backend},
       {"device", absl::StrJoin(d->backends_, ",",
                                [](std::string* out, const std::unique_ptr<DeviceBackend>& b) {
                                  out->append(b->device_name());
                                })},
       {"share_method", d->backends_[0]->share_method() == ShareMethod::kMemfd ? "memfd"
                        : d->backends_[0]->share_method() == ShareMethod::kCudaVmmFd
                            ? "cuda_vmm_fd"
                            : "cuda_ipc_handle"},
       {"memory_budget", config.manager.memory_budget_bytes},
       {"max_clients", config.manager.max_clients},
       {"max_clients_per_uid", config.manager.max_clients_per_uid},
       {"heartbeat_interval_ms", absl::ToInt64Milliseconds(config.manager.heartbeat_interval)},
       {"lease_timeout_ms", absl::ToInt64Milliseconds(config.manager.lease_timeout)},
       {"config", config.config_file.empty() ? std::string("none") : config.config_file}});
  // The fast path's connections pass the same peer checks.
  ASSIGN_OR_RETURN(d->fast_server_, FastPathServer::Start(d->manager_.get(), d->metrics_.get(),
                                                          config.fast_path_spin));
  RETURN_IF_ERROR(d->fast_listener_->Start([daemon = d.get()](int fd) {
    UniqueFd connection(fd);
    const std::optional<PeerCredentials> peer =
        daemon->fast_listener_->Lookup(absl::StrCat("fd:", fd));
    if (peer.has_value()) daemon->fast_server_->Adopt(std::move(connection), *peer);
  }));
  // The socket appears last, so whoever waits for it finds the line above in the log. Its
  // connections go to gRPC only after the peer checks (PeerListener).
  RETURN_IF_ERROR(d->peer_listener_->Start(
      [server = d->server_.get()](int fd) { grpc::AddInsecureChannelFromFd(server, fd); }));
  return d;
}

void Daemon::OnServingChanged(bool serving, const std::string& why) {
  if (serving) {
    Log(LogLevel::kInfo, "serving again: the health probe reached the socket");
  } else {
    Log(LogLevel::kError, "cannot serve new clients: the health probe failed",
        {{"consecutive_failures", config_.health_probe_failures},
         {"error", why},
         {"exiting", config_.exit_when_unserving ? "true" : "false"}});
  }
  if (config_.enable_health) {
    server_->GetHealthCheckService()->SetServingStatus(kServiceName, serving);
    server_->GetHealthCheckService()->SetServingStatus(serving);
  }
  if (!serving && config_.exit_when_unserving) {
    stopped_unserving_.store(true);
    RequestShutdown();
  }
}

void Daemon::ReapLeases() {
  // Check often enough that a lease ends within ~10% of its timeout.
  const absl::Duration tick = std::clamp(config_.manager.lease_timeout / 10, absl::Milliseconds(5),
                                         absl::Milliseconds(250));
  const absl::Duration check_every = config_.check_invariants_interval;
  absl::Time next_check = absl::Now() + check_every;
  absl::Time next_report = absl::Now() + absl::Seconds(10);
  absl::Time next_link_sweep = absl::Now() + absl::Seconds(1);
  uint64_t checks = 0;
  while (!shutdown_requested_.WaitForNotificationWithTimeout(std::min(
      tick, check_every > absl::ZeroDuration() ? check_every : absl::InfiniteDuration()))) {
    manager_->ExpireLeases();
    if (row_links_ != nullptr && absl::Now() >= next_link_sweep) {
      // Row links of peers that went down or restarted, and idle ones, are closed.
      next_link_sweep = absl::Now() + absl::Seconds(1);
      std::map<std::string, std::string> up;
      for (const PeerSnapshot& p : peers_->Snapshot()) {
        if (p.state == PeerState::kUp) up.emplace(p.address, p.boot_id);
      }
      row_links_->Sweep(up);
    }
    if (check_every == absl::ZeroDuration() || absl::Now() < next_check) continue;
    next_check = absl::Now() + check_every;
    if (absl::Status s = manager_->CheckInvariants(); !s.ok()) {
      // The books are wrong: stop before a client gets a block that is not free, keeping the
      // state for a core dump.
      Log(LogLevel::kError, "invariant violated", {{"error", s.ToString()}, {"checks", checks}});
      std::abort();
    }
    ++checks;
    if (absl::Now() >= next_report) {
      next_report = absl::Now() + absl::Seconds(10);
      Log(LogLevel::kInfo, "invariants hold", {{"checks", checks}});
    }
  }
  if (check_every > absl::ZeroDuration())
    Log(LogLevel::kInfo, "invariants hold", {{"checks", checks}});
}

void Daemon::RequestShutdown() {
  if (!shutdown_requested_.HasBeenNotified()) shutdown_requested_.Notify();
}

absl::Status Daemon::Wait() {
  shutdown_requested_.WaitForNotification();
  Shutdown();
  if (stopped_unserving_.load()) {
    return absl::UnavailableError("stopped: the health probe found the daemon cannot serve");
  }
  return absl::OkStatus();
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
  // Before health turns NOT_SERVING, so the probe cannot turn it back.
  if (health_probe_ != nullptr) health_probe_->Stop();
  if (config_.enable_health) {
    server_->GetHealthCheckService()->SetServingStatus(false);
  }
  // Refuse new calls, end Watch streams, let in-flight calls deliver their status; then close
  // every connection at once (an idle client connection would otherwise hold Shutdown until
  // its deadline).
  service_->BeginDrain();
  if (fast_server_ != nullptr) fast_server_->BeginDrain();
  manager_->BeginShutdown();  // Compress / Fetch / Park in flight stop at their next layer
  events_.Close();
  const bool idle = service_->WaitIdle(config_.shutdown_grace);
  if (!idle) Log(LogLevel::kWarning, "grace period over: cancelling calls still in flight");
  // No connection may be handed to a server that is shutting down.
  peer_listener_->Stop();
  if (fast_listener_ != nullptr) fast_listener_->Stop();
  if (fast_server_ != nullptr) fast_server_->Stop();
  // gRPC's shutdown waits for every call, and a call writing to a client that stopped reading
  // (a stopped process with a full socket) would wait for that client: its socket is shut down
  // first, which fails such writes.
  if (const size_t shut = peer_listener_->ShutdownConnections(); shut > 0) {
    Log(LogLevel::kInfo, "client connections shut down", {{"connections", shut}});
  }
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  share_server_->Stop();
  if (metrics_server_ != nullptr) metrics_server_->Stop();
  if (reaper_.joinable()) reaper_.join();
  const StatsSnapshot before = manager_->Stats();
  manager_->Shutdown();
  operator_token_.reset();  // removes the file
  Log(LogLevel::kInfo, "cachemgrd stopped",
      {{"clients_detached", static_cast<uint64_t>(before.clients.size())},
       {"bytes_released", before.memory_used_bytes}});
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace cachemgr
