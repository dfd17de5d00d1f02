#include "cachemgr/metrics/metrics_endpoint.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <thread>
#include <utility>

#include "CivetServer.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/unique_fd.h"
#include "civetweb.h"

namespace cachemgr {
namespace {

// While Start() constructs the server on this thread, civetweb's messages (why it cannot bind)
// are collected here for the returned status; otherwise they go to the log.
thread_local std::string* t_startup_messages = nullptr;

int LogCivetwebMessage(const mg_connection*, const char* message) {
  if (t_startup_messages != nullptr) {
    absl::StrAppend(t_startup_messages, t_startup_messages->empty() ? "" : "; ", message);
  } else {
    Log(LogLevel::kWarning, "metrics endpoint: civetweb", {{"message", message}});
  }
  return 1;  // handled: civetweb writes nothing itself
}

// Runs before civetweb routes a request: everything but GET gets 405 here (civetweb would
// answer 404 for a method the exposer's handler does not implement).
int RefuseOtherMethods(mg_connection* conn) {
  const mg_request_info* info = mg_get_request_info(conn);
  if (info != nullptr && info->request_method != nullptr &&
      std::strcmp(info->request_method, "GET") == 0) {
    return 0;
  }
  static constexpr char kBody[] = "only GET /metrics\n";
  mg_printf(conn,
            "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Type: text/plain\r\n"
            "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
            sizeof(kBody) - 1, kBody);
  return 405;
}

// "host:port" -> the IPv4 address to listen on (INADDR_ANY for an empty host).
absl::StatusOr<sockaddr_in> ListeningAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_address must be host:port (got \"", address, "\")"));
  }
  const std::string host = address.substr(0, colon);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.empty() ? "0.0.0.0" : host.c_str(), nullptr, &hints, &found) != 0 ||
      found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_address: cannot resolve ", host));
  }
  sockaddr_in sin{};
  std::memcpy(&sin, found->ai_addr, sizeof(sin));
  ::freeaddrinfo(found);
  sin.sin_port = htons(static_cast<uint16_t>(port));
  return sin;
}

std::string CivetwebPort(const sockaddr_in& sin) {
  char ip[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &sin.sin_addr, ip, sizeof(ip));
  return absl::StrCat(ip, ":", ntohs(sin.sin_port));
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address, std::vector<std::weak_ptr<prometheus::Collectable>> collectables) {
  absl::StatusOr<sockaddr_in> listening = ListeningAddress(address);
  if (!listening.ok()) return listening.status();

  CivetCallbacks callbacks;  // copied by the server
  callbacks.begin_request = RefuseOtherMethods;
  callbacks.log_message = LogCivetwebMessage;
  std::string startup_messages;
  t_startup_messages = &startup_messages;
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(
        std::vector<std::string>{"listening_ports", CivetwebPort(*listening), "num_threads",
                                 absl::StrCat(kMetricsServerThreads), "request_timeout_ms",
                                 absl::StrCat(absl::ToInt64Milliseconds(kMetricsRequestTimeout)),
                                 "enable_keep_alive", "no"},
        &callbacks);
  } catch (const std::exception& e) {
    t_startup_messages = nullptr;
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", address, ": ",
                     startup_messages.empty() ? e.what() : startup_messages));
  }
  t_startup_messages = nullptr;
  const std::vector<int> ports = exposer->GetListeningPorts();
  if (ports.size() != 1) {
    return absl::InternalError(
        absl::StrCat("metrics: expected one listening port, civetweb has ", ports.size()));
  }
  for (const auto& c : collectables) exposer->RegisterCollectable(c);
  sockaddr_in wake = *listening;
  if (wake.sin_addr.s_addr == htonl(INADDR_ANY)) wake.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  wake.sin_port = htons(static_cast<uint16_t>(ports[0]));
  return std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint(std::move(exposer), wake));
}

MetricsEndpoint::MetricsEndpoint(std::unique_ptr<prometheus::Exposer> exposer,
                                 const sockaddr_in& wake_address)
    : exposer_(std::move(exposer)), wake_address_(wake_address) {}

int MetricsEndpoint::port() const { return ntohs(wake_address_.sin_port); }

MetricsEndpoint::~MetricsEndpoint() { Stop(); }

void MetricsEndpoint::Stop() {
  if (exposer_ == nullptr) return;
  // civetweb's listening thread sees the stop request only when its poll() returns, which
  // without traffic takes up to 2 s: connections of our own wake it at once.
  std::atomic<bool> stopped{false};
  std::thread waker([this, &stopped] {
    while (!stopped.load()) {
      UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
      if (fd.valid()) {
        (void)::connect(fd.get(), reinterpret_cast<const sockaddr*>(&wake_address_),
                        sizeof(wake_address_));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  exposer_.reset();
  stopped.store(true);
  waker.join();
}

}  // namespace cachemgr
