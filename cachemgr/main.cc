// cachemgrd: parses flags, starts the daemon, waits for SIGTERM/SIGINT, shuts down gracefully.
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "cachemgr/config.h"
#include "cachemgr/daemon.h"
#include "cachemgr/service/request_errors.h"
#include "cachemgr/util/log.h"

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread exists so every thread inherits the mask and
  // only the sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // Debian's abseil is built without NDEBUG, so every mutex lock (gRPC's included) would pay
  // for deadlock-cycle bookkeeping: measured at 7-10% of a round trip (docs/PERF.md).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  auto parsed = cachemgr::ParseDaemonCommandLine(std::vector<std::string>(argv + 1, argv + argc));
  if (!parsed.ok()) {
    std::fprintf(stderr, "cachemgrd: %s\n", std::string(parsed.status().message()).c_str());
    return 2;
  }
  if (parsed->exit_now) {
    std::printf("%s\n", parsed->message.c_str());
    return 0;
  }
  cachemgr::SetMinLogLevel(parsed->config.log_level);
  // Protobuf's and gRPC's own messages become JSON log lines like the daemon's.
  cachemgr::RouteLibraryLogsToJson();

  auto daemon = cachemgr::Daemon::Start(parsed->config);
  if (!daemon.ok()) {
    cachemgr::Log(cachemgr::LogLevel::kError, "startup failed",
                  {{"error", daemon.status().ToString()}});
    return 1;
  }
  std::atomic<bool> exiting{false};
  std::thread signal_waiter([&signals, &exiting, d = daemon->get()] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (exiting.load()) return;  // woken by main below, not by a user
    cachemgr::Log(cachemgr::LogLevel::kInfo, "signal received", {{"signal", sig}});
    d->RequestShutdown();
  });
  // Returns after the signal waiter asked for shutdown, or after the health probe found that
  // the daemon cannot serve (with --exit_when_unserving): then exit 3 so a supervisor restarts
  // it, after waking the signal waiter still sitting in sigwait.
  const absl::Status stopped = (*daemon)->Wait();
  if (!stopped.ok()) {
    exiting.store(true);
    pthread_kill(signal_waiter.native_handle(), SIGTERM);
  }
  signal_waiter.join();
  daemon->reset();
  if (!stopped.ok()) {
    cachemgr::Log(cachemgr::LogLevel::kError, "exiting", {{"reason", stopped.ToString()}});
    return 3;
  }
  return 0;
}
